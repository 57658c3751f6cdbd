"""Freeing space: `stencil rm NAME --run ID`, `store prune`, `store du`; --json on the store commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from photos import add_subject
from test_history import done_run, fake_image

from stencil_cli.store.db import open_store
from stencil_cli.store.layout import TRAIN_LOCK_NAME
from stencil_cli.verbs import common


def tree_bytes(path: Path) -> int:
    """The bytes of the files under `path`, but the lock file a removal leaves (it holds a process id)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != TRAIN_LOCK_NAME)


def test_rm_run_removes_its_weights_masks_and_images_and_frees_what_it_says(
    cli: Any, tmp_path: Path, stencil_home: Path
) -> None:
    store = add_subject(cli, tmp_path)
    keep, gone = done_run(store, size=1000), done_run(store, size=5000)
    masks = store.run_dir("robot", gone.id) / "masks"
    masks.mkdir()
    (masks / "1.png").write_bytes(b"m" * 300)
    kept_image = fake_image(store, "robot", keep, "on the moon", 1)
    gone_image = fake_image(store, "robot", gone, "on a boat", 2)
    gone_file = store.get_generation(gone_image).image_file
    before = tree_bytes(stencil_home / "subjects")
    result = cli("rm", "robot", "--run", str(gone.id), "--yes", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["run_id"] == gone.id and report["images"] == [gone_image]
    assert before - tree_bytes(stencil_home / "subjects") == report["bytes"] > 5300
    assert not store.run_dir("robot", gone.id).exists() and not gone_file.exists()
    assert [run.id for run in store.list_runs("robot")] == [keep.id]
    assert [g.id for g in store.list_generations("robot")] == [kept_image]


def test_rm_run_asks_refuses_without_a_terminal_and_while_training(
    cli: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    store = add_subject(cli, tmp_path)
    run = done_run(store)
    piped = cli("rm", "robot", "--run", str(run.id))
    assert piped.exit_code == 2 and f"refusing to remove run {run.id} of 'robot'" in piped.stderr
    assert store.run_dir("robot", run.id).is_dir()
    unknown = cli("rm", "robot", "--run", "999", "--yes")
    assert unknown.exit_code == 1 and "stencil runs robot" in unknown.stderr
    both = cli("rm", "robot", "--run", str(run.id), "--image", "1", "--yes")
    assert both.exit_code == 2 and "do not go together" in both.stderr
    with common.subject_lock(store, "robot"):  # a training holds the lock
        monkeypatch.setattr(common, "_try_lock", lambda handle: False)
        busy = cli("rm", "robot", "--run", str(run.id), "--yes")
    assert busy.exit_code == 1 and "being trained" in busy.stderr
    assert store.run_dir("robot", run.id).is_dir() and store.list_runs("robot")


def test_prune_keeps_the_newest_done_runs_and_frees_the_bytes_it_reported(
    cli: Any, tmp_path: Path, stencil_home: Path
) -> None:
    store = add_subject(cli, tmp_path)
    add_subject(cli, tmp_path, "cat", "cat")
    old, middle, newest = (done_run(store, size=size) for size in (1000, 2000, 4000))
    checkpoint = store.run_dir("robot", old.id) / "checkpoint.pt"
    checkpoint.write_bytes(b"c" * 500)
    cat_run = done_run(store, "cat", size=700)
    image = fake_image(store, "robot", old, "on the moon", 1)
    dry = cli("store", "prune", "--keep", "2", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    planned = json.loads(dry.stdout)
    assert [run["run_id"] for run in planned["runs"]] == [old.id] and planned["bytes"] == 1500
    assert checkpoint.is_file()  # a dry run deletes nothing
    before = tree_bytes(stencil_home / "subjects")
    done = cli("store", "prune", "--keep", "1")
    assert done.exit_code == 0, done.output
    assert "2 run(s): freed 3.5 kB (3500 bytes)" in done.stdout
    assert before - tree_bytes(stencil_home / "subjects") == 3500
    assert store.get_run("robot", newest.id).weights_file.is_file()
    assert store.get_run("cat", cat_run.id).weights_file.is_file()
    assert not store.get_run("robot", middle.id).weights_file.is_file()
    assert store.get_generation(image).image_file.is_file()  # images and rows stay
    gen = cli("gen", "robot", "on the moon", "--run", str(old.id))
    assert gen.exit_code == 1 and "weights" in gen.stderr
    again = json.loads(cli("store", "prune", "--json").stdout)
    assert again["runs"] == [] and again["bytes"] == 0
    assert cli("store", "prune", "--keep", "-1").exit_code == 2


def test_du_shows_each_subjects_size(cli: Any, tmp_path: Path, stencil_home: Path) -> None:
    store = add_subject(cli, tmp_path)
    add_subject(cli, tmp_path, "cat", "cat")
    done_run(store, size=50_000)
    rows = {row["subject"]: row for row in json.loads(cli("store", "du", "--json").stdout)}
    robot = stencil_home / "subjects" / "robot"
    assert rows["robot"]["runs"] == 50_000 and rows["robot"]["total"] == tree_bytes(robot)
    assert rows["robot"]["photos"] == tree_bytes(robot / "images") > 0
    assert rows["cat"]["runs"] == 0
    table = cli("store", "du")
    assert table.exit_code == 0 and table.stdout.splitlines()[1].split()[0] == "robot"


def test_store_commands_and_rm_speak_json(cli: Any, tmp_path: Path, stencil_home: Path) -> None:
    add_subject(cli, tmp_path)
    assert json.loads(cli("store", "path", "--json").stdout) == {"path": str(stencil_home)}
    assert json.loads(cli("store", "clean", "--json").stdout) == {"removed": []}
    photo = json.loads(cli("rm", "robot", "--image", "1", "--json", "--yes").stdout)
    assert photo["removed"] == "photo" and photo["photo"]["id"] == 1
    removed = json.loads(cli("rm", "robot", "--yes", "--json").stdout)
    assert removed == {"subject": "robot", "removed": "subject"}
    assert open_store().find_subject("robot") is None
