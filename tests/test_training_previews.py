"""Training previews: `stencil train --sample-every N --sample-prompt TEXT` renders into runs/ID/samples/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from photos import add_subject
from PIL import Image

from stencil_cli.base.pngmeta import read_png_parameters
from stencil_cli.store.db import open_store

TINY = ("--subject-model", "tiny", "--batch-size", "1")


def _captioned(cli: Any, tmp_path: Path) -> None:
    add_subject(cli, tmp_path)
    assert cli("caption", "robot", "--captioner", "template").exit_code == 0


def _train(cli: Any, *args: Any) -> dict[str, Any]:
    result = cli("train", "robot", *TINY, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_previews_are_rendered_every_n_steps_and_after_the_last(
    cli: Any, tmp_path: Path, tiny_preset: Path
) -> None:
    _captioned(cli, tmp_path)
    run = _train(
        cli, "--steps", "5", "--lr", "0.01", "--sample-every", "2",
        "--sample-prompt", "on a beach", "--sample-prompt", "{} in the snow", "--sample-steps", "3",
    )  # fmt: skip
    samples = Path(run["weights_file"]).parent / "samples"
    names = sorted(path.name for path in samples.iterdir())
    assert names == [f"step-{step:06d}-p{i}.png" for step in (2, 4, 5) for i in (0, 1)]
    meta = read_png_parameters(samples / "step-000004-p0.png")
    assert meta["prompt"] == "a toy robot on a beach"  # through the prompt rules
    assert meta["step"] == 4 and meta["seed"] == 0 and meta["sample_steps"] == 3
    assert read_png_parameters(samples / "step-000005-p1.png")["prompt"] == "toy robot in the snow"
    # one seed throughout: the pictures change because the weights do
    assert np.abs(_pixels(samples / "step-000002-p0.png") - _pixels(samples / "step-000005-p0.png")).max() > 0
    params = open_store().get_run("robot", run["id"]).params
    assert params["sample_every"] == 2 and params["sample_steps"] == 3
    assert params["sample_prompts"] == ["on a beach", "{} in the snow"]
    paths = cli("runs", "robot", "--paths")
    assert f"samples:      {samples}" in paths.stdout


def test_previews_do_not_change_the_training(cli: Any, tmp_path: Path, tiny_preset: Path) -> None:
    _captioned(cli, tmp_path)
    plain = _train(cli, "--steps", "4")
    options = ("--sample-every", "1", "--sample-prompt", "x", "--sample-steps", "2")
    previewed = _train(cli, "--steps", "4", *options)
    assert previewed["losses"] == plain["losses"]
    assert not (Path(plain["weights_file"]).parent / "samples").exists()  # nothing without the option
    assert len(list((Path(previewed["weights_file"]).parent / "samples").iterdir())) == 4


def test_a_prompt_alone_renders_after_the_last_step_only(cli: Any, tmp_path: Path, tiny_preset: Path) -> None:
    _captioned(cli, tmp_path)
    run = _train(cli, "--steps", "3", "--sample-prompt", "on a beach", "--sample-steps", "2")
    samples = Path(run["weights_file"]).parent / "samples"
    assert sorted(path.name for path in samples.iterdir()) == ["step-000003-p0.png"]


def test_bad_preview_options_are_refused_before_the_model_loads(cli: Any, tmp_path: Path) -> None:
    _captioned(cli, tmp_path)  # no tiny preset here: loading the model would fail with another error
    cases = [
        (("--sample-every", "0", "--sample-prompt", "x"), "--sample-every must be at least 1"),
        (("--sample-every", "3"), "--sample-every needs at least one --sample-prompt"),
        (("--sample-steps", "4"), "--sample-steps needs at least one --sample-prompt"),
        (("--sample-prompt", "x", "--sample-steps", "0"), "--sample-steps must be in [1, 1000]"),
        (("--sample-prompt", "x", "--sample-steps", "1001"), "--sample-steps must be in [1, 1000]"),
        (("--sample-prompt", " "), "--sample-prompt must not be empty"),
        (("--sample-prompt", "x", "--masks-only"), "do not go together"),
    ]
    for args, message in cases:
        result = cli("train", "robot", "--subject-model", "tiny", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.stderr.split()), (args, result.stderr)
    assert open_store().list_runs("robot") == []


def test_a_resumed_run_keeps_its_preview_settings(
    cli: Any, tmp_path: Path, tiny_preset: Path, monkeypatch: Any
) -> None:
    from stencil_cli.core import weights

    _captioned(cli, tmp_path)
    real_save = weights.save_trained_weights

    def crash_before_saving(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "save_trained_weights", crash_before_saving)
    args = ("--steps", "4", "--checkpoint-every", "2", "--sample-every", "2", "--sample-prompt", "x")
    interrupted = cli("train", "robot", *TINY, *args, "--sample-steps", "2")
    assert interrupted.exit_code == 130, interrupted.output
    monkeypatch.setattr(weights, "save_trained_weights", real_save)
    run = _train(cli, "--resume", "--steps", "6")
    samples = Path(run["weights_file"]).parent / "samples"
    assert sorted(path.name for path in samples.iterdir()) == [
        f"step-{step:06d}-p0.png" for step in (2, 4, 6)
    ]
    assert read_png_parameters(samples / "step-000006-p0.png")["sample_steps"] == 2
