"""The loss curve each finished run writes beside its weights, and `stencil runs --paths` naming it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from photos import add_subject
from PIL import Image

from stencil_cli.verbs.charts import loss_curve_png


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
        assert image.format == "PNG" and image.size == (640, 320)
        colours = {colour for _, colour in image.getcolors(maxcolors=100_000)}
    assert (30, 90, 200) in colours  # the curve was drawn
    listed = json.loads(cli("runs", "robot", "--json").stdout)
    assert listed[0]["loss_curve"] == str(curve)
    paths = cli("runs", "robot", "--paths")
    assert f"loss_curve:   {curve}" in paths.stdout


def test_the_curve_draws_a_single_step_and_no_steps() -> None:
    for losses in ([], [0.5], [float("nan"), 0.3, 0.2]):
        data = loss_curve_png(losses)
        assert data.startswith(b"\x89PNG")
