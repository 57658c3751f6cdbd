"""A full disk or a file-size limit while writing safetensors files and checkpoints, with real mechanisms:
the file-size limit (``RLIMIT_FSIZE``, as ``ulimit -f`` sets it) and a small tmpfs in a mount namespace."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from photos import add_subject
from storecheck import check_store

from stencil_cli.base import fsutil
from stencil_cli.base.errors import DiskFullError
from stencil_cli.store.db import open_store
from stencil_cli.store.layout import CHECKPOINT_NAME, WEIGHTS_NAME

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
LIMIT = 1024 * 1024  # over the database and photos of a tiny subject, under its trained weights (~1.6 MB)


def _file_size_limit(limit: int) -> Callable[[], None]:
    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return lower


def _stencil(*args: str, limit: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stencil_cli", *args],
        cwd=PACKAGE_ROOT,
        env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)},
        text=True,
        capture_output=True,
        timeout=300,
        preexec_fn=_file_size_limit(limit) if limit is not None else None,
    )


def _captioned(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    subject = store.get_subject("robot")
    captions = {image["id"]: f"a photo of a toy robot, view {image['id']}" for image in subject.images}
    store.set_captions("robot", captions, "manual")
    store.close()


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr and "unexpected" not in stderr, stderr
    return " ".join(" ".join(lines[lines.index(errors[0]) :]).split())


def test_safetensors_and_torch_disk_full_shapes_are_recognised(tmp_path: Path) -> None:
    import safetensors.torch
    import torch

    from stencil_cli.core import training

    tensors = {"a": torch.zeros(64 * 1024)}
    limit = _file_size_limit(16 * 1024)
    saved = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        limit()
        with pytest.raises(DiskFullError, match="disk full at"):
            fsutil.atomic_write_with(
                tmp_path / "w.safetensors", lambda tmp: safetensors.torch.save_file(tensors, str(tmp))
            )
        with pytest.raises(DiskFullError, match="disk full at"):
            fsutil.atomic_write_with(
                tmp_path / "c.pt", lambda tmp: training._save_through_python_file(tensors, tmp)
            )
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, saved)
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


def test_a_file_size_limit_at_the_weights_records_every_trained_step(
    cli: Any, tiny_preset: Path, tmp_path: Path, stencil_home: Path
) -> None:
    _captioned(cli, tmp_path)
    result = _stencil(
        "train", "robot", "--subject-model", "tiny", "--steps", "2", "--batch-size", "2", limit=LIMIT
    )
    assert result.returncode == 1, result.stderr
    store = open_store()
    (run,) = store.list_runs("robot")
    weights = store.run_dir("robot", run.id) / WEIGHTS_NAME
    line = _one_line(result.stderr)
    assert line.startswith(f"error: disk full at {weights}"), line
    assert "nothing could be kept" in line  # the checkpoint (fp32 and the optimiser's state) is larger still
    assert run.status == "failed" and run.step == 2 and len(run.losses) == 2
    assert not weights.exists() and not list(store.run_dir("robot", run.id).glob("*.tmp"))
    assert check_store(stencil_home) == []


def test_a_file_size_limit_at_a_periodic_checkpoint_warns_and_training_goes_on(
    cli: Any, tiny_preset: Path, tmp_path: Path, stencil_home: Path
) -> None:
    _captioned(cli, tmp_path)
    result = _stencil(
        "train", "robot", "--subject-model", "tiny", "--steps", "2", "--batch-size", "2",
        "--checkpoint-every", "1", "--save-dtype", "fp16", limit=LIMIT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    store = open_store()
    (run,) = store.list_runs("robot")
    checkpoint = store.run_dir("robot", run.id) / CHECKPOINT_NAME
    assert f"disk full at {checkpoint}" in " ".join(result.stderr.split())
    assert run.status == "done" and run.step == 2 and Path(run.weights_file).is_file()
    assert check_store(stencil_home) == []


def _small_filesystem_available() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True
    )
    return probe.returncode == 0


def _trained_sizes(pipe: Any) -> tuple[int, int]:
    """Bytes of a full-decoder run's fp32 weights and of its checkpoint (params and Adam's two moments)."""
    from stencil_cli.core.training import TrainConfig, trainable_names

    params = dict(pipe.unet.named_parameters())
    weights = sum(params[name].numel() * 4 for name in trainable_names(pipe.unet, TrainConfig().train))
    return weights, 3 * weights


@pytest.mark.skipif(not _small_filesystem_available(), reason="needs root and mount namespaces (unshare -m)")
def test_a_full_small_disk_at_the_weights_keeps_the_checkpoint_and_resume_finds_it(
    cli: Any, tiny_preset: Path, tmp_path: Path, stencil_home: Path, tiny_subject_pipe: Any
) -> None:
    _captioned(cli, tmp_path)
    weights_bytes, checkpoint_bytes = _trained_sizes(tiny_subject_pipe)
    files = [path for path in stencil_home.rglob("*") if path.is_file() and not path.is_symlink()]
    used = sum(path.stat().st_size for path in files)
    # room for the store, masks, the checkpoint at the last step and its temp copy's metadata, not the weights
    size = used + checkpoint_bytes + weights_bytes // 2 + 256 * 1024
    copy = tmp_path / "store-copy"
    shutil.copytree(stencil_home, copy, symlinks=True)
    args = " ".join(["train", "robot", "--subject-model", "tiny", "--steps", "2", "--batch-size", "2",
                     "--checkpoint-every", "2"])  # fmt: skip
    script = (
        f"mount -t tmpfs -o size={size} tmpfs {stencil_home} && cp -a {copy}/. {stencil_home}/ && "
        f"{sys.executable} -m stencil_cli {args}; code=$?; rm -rf {copy}/subjects {copy}/stencil.db*; "
        f"cp -a {stencil_home}/stencil.db* {stencil_home}/subjects {copy}/; exit $code"
    )
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], cwd=PACKAGE_ROOT, text=True, capture_output=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)},
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    shutil.rmtree(stencil_home)
    shutil.copytree(copy, stencil_home, symlinks=True)
    store = open_store()
    runs = store.list_runs("robot")
    assert len(runs) == 1, result.stderr
    (run,) = runs
    checkpoint = store.run_dir("robot", run.id) / CHECKPOINT_NAME
    line = _one_line(result.stderr)
    assert line.startswith(f"error: disk full at {store.run_dir('robot', run.id) / WEIGHTS_NAME}"), line
    assert f"the 2 trained steps are kept in the checkpoint {checkpoint}" in line
    assert run.status == "failed" and run.step == 2 and checkpoint.is_file()
    resumed = cli("train", "robot", "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["status"] == "done"
    assert check_store(stencil_home) == []


def test_the_first_build_of_the_tiny_models_on_a_full_disk_says_disk_full(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    code = (
        "import sys\nfrom stencil_cli.models import ensure_tiny\n"
        "from stencil_cli.base.errors import DiskFullError\n"
        f"try:\n    ensure_tiny({str(target)!r})\n"
        "except DiskFullError as error:\n    print(error); sys.exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PACKAGE_ROOT, text=True, capture_output=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}, preexec_fn=_file_size_limit(LIMIT),
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert result.stdout.startswith(f"disk full at {target}")
    assert not target.exists() and list(tmp_path.iterdir()) == []
