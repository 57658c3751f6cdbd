"""Damaged JSON in a row's `params`, `losses` or `scores` (a hand edit, a bad restore): each command names the
damaged row and keeps the other rows usable; `gen` with a run whose settings are damaged is one clear line."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from photos import add_subject
from storecheck import check_store

from stencil_cli.store.db import Store, open_store


def _run(store: Store) -> int:
    import numpy as np
    from safetensors.numpy import save_file

    run = store.create_run("robot", {"subject_model": "tiny", "resolution": 64}, base_model="tiny")
    weights = store.run_dir("robot", run.id) / "weights.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({"up_blocks.0.weight": np.zeros(4, dtype=np.float32)}, str(weights))
    store.finish_run(run.id, "done", weights_file=weights, losses=[0.5, 0.4], step=2)
    return run.id


@pytest.fixture
def damaged(cli: Any, tmp_path: Path) -> Store:
    """`robot` with two done runs and two images; run 2's params and losses, image 2's params and scores
    damaged in the database (run 1 and image 1 sound)."""
    store = add_subject(cli, tmp_path)
    subject = store.get_subject("robot")
    store.set_captions("robot", {image["id"]: "a photo of a toy robot" for image in subject.images}, "manual")
    for _ in range(2):
        run_id = _run(store)
        image = store.subject_dir("robot") / "generations" / f"{run_id}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(subject.images[0]["file"], image)
        generation = store.add_generation(
            store.get_subject("robot"),
            {"run_id": run_id, "prompt": "x", "seed": 1, "tau": 0.5, "params": {}, "image_file": image},
        )
        store.set_generation_scores(generation.id, {"dino": 0.5})
    store.close()
    db = sqlite3.connect(store.root / "stencil.db")
    db.execute("update runs set params = '{\"steps\": 3', losses = '[0.5, oops]' where id = 2")
    db.execute("update generations set params = 'not json', scores = '[1, 2]' where id = 2")
    db.commit()
    db.close()
    return open_store()


def _warning(stderr: str) -> str:
    text = " ".join(stderr.split())
    assert "Traceback" not in stderr and "unexpected" not in stderr, stderr
    return text


def test_show_and_listings_name_the_damaged_rows_and_list_the_others(damaged: Store, cli: Any) -> None:
    for args in (["show", "robot"], ["show", "robot", "--json"], ["runs", "robot"], ["images", "robot"]):
        result = cli(*args)
        assert result.exit_code == 0, result.output
        text = _warning(result.stderr)
        assert "damaged data in the store database" in text, (args, text)
    runs = json.loads(cli("runs", "robot", "--json").stdout)
    by_run = {run["id"]: run for run in runs}
    assert by_run[1]["final_loss"] == 0.4 and by_run[1]["damaged"] == []
    assert by_run[2]["final_loss"] is None and by_run[2]["damaged"] == ["params", "losses"]
    images = json.loads(cli("images", "robot", "--json").stdout)
    by_id = {image["id"]: image for image in images}
    assert by_id[1]["scores"] == {"dino": 0.5} and by_id[1]["damaged"] == []
    assert by_id[2]["scores"] is None and by_id[2]["damaged"] == ["params", "scores"]
    assert "run 2 params and losses" in _warning(cli("runs", "robot").stderr)
    assert "image 2 params and scores" in _warning(cli("images", "robot").stderr)
    assert cli("view", "robot", "--no-open").exit_code == 0
    assert check_store(damaged.root) == []


def test_gen_with_a_run_whose_settings_are_damaged_is_one_line(damaged: Store, cli: Any) -> None:
    result = cli("gen", "robot", "on the moon", "--run", "2")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "run 2 of 'robot' has damaged settings" in " ".join(result.stderr.split())
    assert damaged.list_generations("robot")[-1].id == 2  # nothing new
    assert check_store(damaged.root) == []
