"""`stencil view` in a real browser: headless Chromium shows the draft/result pairs on the first screen.

Skipped when no Chromium is installed (`apt-get install -y chromium`). Each draft and each result is a picture
of one colour of its own, so the screenshot tells which of them a person would see without scrolling.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from photos import add_subject
from PIL import Image
from test_history import done_run

from stencil_cli.store.db import Store
from stencil_cli.store.layout import LOSS_CURVE_NAME
from stencil_cli.verbs.charts import loss_curve_png

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from browser import find_chromium, screenshot  # noqa: E402

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="no chromium installed")

SCREEN = (1280, 900)
# (draft, result) colours of the newest prompt's three images: one row of pairs at 1280 px
FIRST = [((230, 20, 20), (20, 160, 40)), ((30, 30, 230), (230, 0, 230)), ((0, 200, 220), (240, 180, 0))]
OLDER = ((90, 60, 30), (60, 90, 30))


def coloured(store: Store, run: Any, prompt: str, seed: int, colours: tuple[Any, Any], batch: str) -> None:
    """An image row whose draft and result are each one colour."""
    folder = store.generation_dir("robot") / batch
    folder.mkdir(parents=True, exist_ok=True)
    draft, image = folder / f"draft-{seed}.png", folder / f"{seed}.png"
    Image.new("RGB", (64, 64), colours[0]).save(draft)
    Image.new("RGB", (64, 64), colours[1]).save(image)
    store.add_generation(
        store.get_subject("robot"),
        {
            "run_id": run.id,
            "prompt": prompt,
            "seed": seed,
            "tau": 60.0,
            "params": {"mode": "context", "batch": batch},
            "image_file": image,
            "draft_file": draft,
        },
    )


def shown(picture: Image.Image, colour: tuple[int, int, int]) -> int:
    """How many pixels of the screenshot are (within rounding) `colour`."""
    pixels = np.asarray(picture.convert("RGB"), dtype=np.int16)
    return int((np.abs(pixels - np.array(colour)).max(axis=2) <= 8).sum())


def test_the_pairs_of_the_newest_prompt_are_on_the_first_screen(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    for index in range(6):  # six runs with their loss curves: the old page put the images below them
        run = done_run(store, lr=1e-5 * (index + 1))
        curve = store.run_dir("robot", run.id) / LOSS_CURVE_NAME
        curve.write_bytes(loss_curve_png([1 / (step + 1) for step in range(50)], f"run {run.id}"))
    for prompt in range(5):
        for seed in range(3):
            coloured(store, run, f"an older prompt {prompt}", 100 * prompt + seed, OLDER, f"old{prompt}")
    for seed, colours in enumerate(FIRST):
        coloured(store, run, "on the moon", seed, colours, "newest")
    page = Path(cli("view", "robot", "--no-open").stdout.strip())
    shot = tmp_path / "first-screen.png"
    assert screenshot(page, shot, SCREEN)
    with Image.open(shot) as picture:
        assert picture.size == SCREEN
        for draft, result in FIRST:
            for colour in (draft, result):
                # each picture at least 150 x 150 px on the screen
                assert shown(picture, colour) >= 150 * 150, (colour, shown(picture, colour))
