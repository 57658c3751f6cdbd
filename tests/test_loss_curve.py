"""The loss curve each finished run writes beside its weights, and `stencil runs --paths` naming it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from photos import add_subject
from PIL import Image


def test_a_finished_run_has_a_loss_curve_beside_its_weights(
    cli: Any, tmp_path: Path, tiny_preset: Path
) -> None:
    add_subject(cli, tmp_path)
    assert cli("caption", "robot", "--captioner", "template").exit_code == 0
    trained = cli("train", "robot", "--subject-model", "tiny", "--steps", "6", "--batch-size", "1", "--json")
    assert trained.exit_code == 0, trained.output
    run = json.loads(trained.stdout)
    curve = Path(run["weights_file"]).parent / "loss.png"
    with Image.open(curve) as image:
        assert image.format == "PNG" and image.size == (720, 360)
        colours = {colour for _, colour in image.getcolors(maxcolors=100_000)}
    near = [c for c in colours if sum(abs(a - b) for a, b in zip(c[:3], (30, 90, 200), strict=True)) < 40]
    assert near  # the running mean was drawn (its colour #1e5ac8, antialiased)
    listed = json.loads(cli("runs", "robot", "--json").stdout)
    assert listed[0]["loss_curve"] == str(curve)
    paths = cli("runs", "robot", "--paths")
    assert f"loss_curve:   {curve}" in paths.stdout
