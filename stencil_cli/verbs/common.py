"""What every verb shares: the progress hook, a device-synchronised clock, the per-subject lock."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from stencil_cli.errors import StencilError
from stencil_cli.store import Store

Progress = Callable[[str, int, int | None, dict[str, Any]], None]
LOCK_NAME = ".train.lock"


def no_progress(stage: str, step: int, total: int | None, extra: dict[str, Any]) -> None:
    """The default progress hook: report nothing."""


def synced_clock(device: Any) -> float:
    """`time.perf_counter()` after the device's queued work is done (CUDA runs asynchronously)."""
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return time.perf_counter()


@contextlib.contextmanager
def subject_lock(store: Store, name: str) -> Iterator[None]:
    """Hold an exclusive lock on the subject's training (released by the OS if the process dies)."""
    path = store.subject_dir(name) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    handle: IO[str] = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole block
    try:
        handle.seek(0)  # "a+" opens at the end; msvcrt.locking locks from the current position (byte 0)
        if not _try_lock(handle):
            handle.seek(0)
            holder = handle.read().strip()
            who = f"by process {holder}" if holder else "by another process"
            raise StencilError(
                f"subject {name!r} is already being trained {who}; wait for it to finish "
                "or stop it with Ctrl-C"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock


def _try_lock(handle: IO[str]) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True
