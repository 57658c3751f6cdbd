"""The SD1.5 subject + SD3 draft path gives the very same images as before subject-model families existed.

The hashes were recorded on main's code (before `core.families`), same seeds, the tiny preset, one thread.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import load_file

from tests.photos import make_photo

# recorded on main (05abaed) before the SDXL family: train tiny 3 steps, gen 3 steps / 2 inner / 2 draft
WEIGHTS_SHA256 = "5305095ae1fac3a2b650302e43d32564570c9fe8d2ba656dd5c00dff2b0b3bce"
IMAGE_SHA256 = "868ad70f915f2a95fa6a9b2a638367cdc35ee09f43ccb7eea3f2812937f97fbc"
DRAFT_SHA256 = "477ff4f85dc6b7dcc6b12d5b4a0b4bef667513c09ad4100fd4308f86ef82e6b5"


def _pixels_sha256(path: Path) -> str:
    return hashlib.sha256(np.asarray(Image.open(path).convert("RGB")).tobytes()).hexdigest()


def _weights_sha256(path: Path) -> str:
    state = load_file(str(path))
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].float().numpy().tobytes())
    return digest.hexdigest()


def test_sd15_train_and_gen_with_the_sd3_draft_are_bit_identical_to_before(
    cli, tiny_preset: Path, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    for i in range(2):
        make_photo(photos / f"{i}.png", (320, 288), seed=i)
    assert cli("add", "robot", photos, "--phrase", "toy robot").exit_code == 0
    assert cli("caption", "robot", "--captioner", "template").exit_code == 0
    trained = cli("train", "robot", "--subject-model", "tiny", "--steps", "3", "--batch-size", "2", "--json")
    assert trained.exit_code == 0, trained.output
    weights = Path(json.loads(trained.stdout)["weights_file"])
    generated = cli(
        "gen",
        "robot",
        "on the moon",
        "--subject-model",
        "tiny",
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
        "--json",
    )
    assert generated.exit_code == 0, generated.output
    record = json.loads(generated.stdout.splitlines()[0])
    got = {
        "weights": _weights_sha256(weights),
        "image": _pixels_sha256(Path(record["image_file"])),
        "draft": _pixels_sha256(Path(record["draft_file"])),
    }
    assert got == {"weights": WEIGHTS_SHA256, "image": IMAGE_SHA256, "draft": DRAFT_SHA256}
