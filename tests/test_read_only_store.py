"""A read-only store, made read-only for real: a read-only bind mount of the store over itself in a private
mount namespace (`unshare -m`), so that not even root may write it. Every command that would change the store
says "the store ... is read-only" before any work; a committed WAL is read, not ignored."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from photos import add_subject
from storecheck import check_store

from stencil_cli.store.db import Store

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def _namespaces_available() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount --bind /tmp /tmp && mount -o remount,ro,bind /tmp /tmp"],
        capture_output=True,
    )
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(
    not _namespaces_available(), reason="needs root and mount namespaces (unshare -m) for a read-only mount"
)


def _read_only_stencil(root: Path, *args: str) -> subprocess.CompletedProcess:
    """Run `stencil ARGS` with the store at `root` bind-mounted read-only over itself."""
    command = " ".join(f"'{arg}'" for arg in args)
    script = (
        f"mount --bind '{root}' '{root}' && mount -o remount,ro,bind '{root}' '{root}' && "
        f"exec {sys.executable} -m stencil_cli {command}"
    )
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        cwd=PACKAGE_ROOT,
        env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)},
        text=True,
        capture_output=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


@pytest.fixture
def trained(cli: Any, tmp_path: Path, tiny_preset: Path) -> Store:
    """`robot` with captions, a done run (a small weights file) and a generation row, the store closed."""
    import numpy as np
    from safetensors.numpy import save_file

    store = add_subject(cli, tmp_path)
    subject = store.get_subject("robot")
    store.set_captions("robot", {image["id"]: "a photo of a toy robot" for image in subject.images}, "manual")
    run = store.create_run("robot", {"subject_model": "tiny", "resolution": 64}, base_model="tiny")
    weights = store.run_dir("robot", run.id) / "weights.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({"up_blocks.0.weight": np.zeros(4, dtype=np.float32)}, str(weights))
    store.finish_run(run.id, "done", weights_file=weights)
    image = store.subject_dir("robot") / "generations" / "1.png"
    image.parent.mkdir(parents=True)
    shutil.copy(subject.images[0]["file"], image)
    store.add_generation(
        store.get_subject("robot"),
        {"run_id": run.id, "prompt": "x", "seed": 1, "tau": 0.5, "params": {}, "image_file": image},
    )
    store.close()
    return store


@pytest.mark.parametrize(
    "args",
    [
        ["train", "robot", "--subject-model", "tiny", "--steps", "1"],
        ["gen", "robot", "on the moon"],
        ["rm", "robot", "--run", "1", "--yes"],
        ["store", "prune", "--keep", "0"],
        ["show", "robot", "--masks"],
        ["eval", "robot", "--eval-models", "tiny"],
    ],
    ids=["train", "gen", "rm-run", "prune", "show-masks", "eval"],
)
def test_a_command_that_would_change_a_read_only_store_says_so_before_any_work(
    trained: Store, args: list[str]
) -> None:
    before = _snapshot(trained.root)
    result = _read_only_stencil(trained.root, *args)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    text = " ".join(result.stderr.split())
    assert len(lines) == 1 and f"error: the store {trained.root} is read-only" in text, result.stderr
    assert "Errno" not in text and "unexpected" not in text and "loading" not in text
    assert _snapshot(trained.root) == before
    assert check_store(trained.root) == []


def test_a_read_only_store_with_a_committed_wal_shows_the_committed_data(
    trained: Store, tmp_path: Path
) -> None:
    db = trained.root / "stencil.db"
    writer = sqlite3.connect(db)
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("PRAGMA wal_autocheckpoint = 0")  # the change stays in the WAL, as after a crash
    writer.execute("update subjects set description = 'a small red robot' where name = 'robot'")
    writer.commit()
    saved = tmp_path / "saved"
    saved.mkdir()
    for suffix in ("", "-wal"):  # what a backup or a crashed writer leaves: the database and its WAL
        shutil.copy(f"{db}{suffix}", saved / f"stencil.db{suffix}")
    writer.close()
    for suffix in ("", "-wal"):
        shutil.copy(saved / f"stencil.db{suffix}", f"{db}{suffix}")
    Path(f"{db}-shm").unlink(missing_ok=True)
    assert Path(f"{db}-wal").stat().st_size > 0
    result = _read_only_stencil(trained.root, "show", "robot", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["description"] == "a small red robot"


def test_reading_commands_still_work_on_a_read_only_store(trained: Store) -> None:
    for args in (["store", "prune", "--dry-run", "--json"], ["ls", "--json"], ["runs", "robot", "--json"]):
        result = _read_only_stencil(trained.root, *args)
        assert result.returncode == 0, result.stderr
        assert result.stderr == "" and json.loads(result.stdout) is not None
    assert check_store(trained.root) == []
