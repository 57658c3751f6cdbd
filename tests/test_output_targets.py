"""Where `gen -o` may write: checked before any model loads or any draft is drawn (the export and view targets
are tested in test_export_cli.py and test_view.py), and never over a device, FIFO or socket."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from photos import add_subject
from storecheck import check_store

from stencil_cli import models
from stencil_cli.base import fsutil
from stencil_cli.base.errors import BadInputError
from stencil_cli.store.db import Store


def _no_model(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a model was loaded")


def _done_run(store: Store) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    run = store.create_run("robot", {"subject_model": "tiny", "resolution": 64}, base_model="tiny")
    weights = store.run_dir("robot", run.id) / "weights.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({"up_blocks.0.weight": np.zeros(4, dtype=np.float32)}, str(weights))
    store.finish_run(run.id, "done", weights_file=weights)


@pytest.fixture
def trained(cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """`robot` with captions and a done run; loading a model fails the test."""
    monkeypatch.setattr(models, "load_subject_pipeline", _no_model)
    monkeypatch.setattr(models, "load_context_pipeline", _no_model)
    store = add_subject(cli, tmp_path)
    subject = store.get_subject("robot")
    store.set_captions("robot", {image["id"]: "a photo of a toy robot" for image in subject.images}, "manual")
    _done_run(store)
    return store


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("", "-o is empty: give a folder"),
        ("{store}/subjects/robot/images", "is inside the store"),
        ("{store}", "is inside the store"),
        ("/dev/null", "-o /dev/null is a character device"),
        ("/sys/kernel", "-o /sys/kernel: cannot write in the folder /sys/kernel"),
        ("/proc", "-o /proc: cannot write in the folder /proc"),
    ],
)
def test_gen_refuses_an_unusable_output_before_any_model_loads_or_draft_is_drawn(
    trained: Store, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str, message: str
) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    result = cli("gen", "robot", "on the moon", "-o", output.format(store=trained.root))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in " ".join(result.stderr.split()), result.stderr
    assert list(work.iterdir()) == []
    assert not (trained.subject_dir("robot") / "generations").exists()  # no draft drawn, nothing orphaned
    assert check_store(trained.root) == []


@pytest.mark.parametrize("kind", ["fifo", "socket", "folder"])
def test_an_atomic_write_never_replaces_a_fifo_socket_or_folder(tmp_path: Path, kind: str) -> None:
    import socket

    target = tmp_path / "image.png"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "socket":
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(target))
    else:
        target.mkdir()
    before = os.lstat(target)
    with pytest.raises(BadInputError, match="is not a regular file"):
        fsutil.atomic_write_bytes(target, b"png")
    assert os.lstat(target).st_mode == before.st_mode and sorted(tmp_path.iterdir()) == [target]
