"""The whole flow on real DreamBench photos (tiny preset): add -> caption -> train -> gen -> eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "dreambench"

pytestmark = pytest.mark.skipif(
    not (DREAMBENCH / "backpack").is_dir(), reason="shared/dreambench is not present"
)


def test_real_photos_through_every_command(cli, tiny_preset: Path, tmp_path: Path) -> None:
    tiny = ("--subject-model", "tiny")
    added = cli("add", "backpack", DREAMBENCH / "backpack", "--class", "backpack", "--json")
    assert added.exit_code == 0, added.output
    assert len(json.loads(added.stdout)["added"]) >= 4

    captioned = cli("caption", "backpack", "--captioner", "template", "--json")
    assert captioned.exit_code == 0, captioned.output

    trained = cli("train", "backpack", *tiny, "--steps", "4", "--batch-size", "2", "--json")
    assert trained.exit_code == 0, trained.output
    run = json.loads(trained.stdout)
    assert run["status"] == "done" and Path(run["weights_file"]).is_file()

    masks = cli("show", "backpack", "--masks")
    assert masks.exit_code == 0 and masks.stdout.count(".png") >= 4

    out = tmp_path / "out"
    generated = cli(
        "gen",
        "backpack",
        "on the beach",
        *tiny,
        "--context-model",
        "tiny",
        "--steps",
        "3",
        "--inner-steps",
        "2",
        "--draft-steps",
        "2",
        "--seed",
        "7",
        "-o",
        out,
        "--json",
    )
    assert generated.exit_code == 0, generated.output
    records = [json.loads(line) for line in generated.stdout.splitlines()]
    assert len(records) == 1
    image = Image.open(records[0]["image_file"])
    assert image.size == (64, 64)
    assert image.text["stencil:prompt"] == "a backpack on the beach"
    assert list(out.glob("*.png"))

    scored = cli("eval", "backpack", "--eval-models", "tiny", "--json")
    assert scored.exit_code == 0, scored.output
    scores = json.loads(scored.stdout)["generations"][0]["scores"]
    assert all(-1.0 <= scores[key] <= 1.0 for key in ("dino", "clip_i", "clip_t"))
