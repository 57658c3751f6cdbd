"""What every verb shares: the seed range, a device-synchronised clock, the per-subject lock.

Progress hooks and their events live in `base/events.py` (the ML core reports through them too).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import IO, Any

from stencil_cli.base import locks
from stencil_cli.base.errors import StencilError, StoreReadOnlyError
from stencil_cli.store.db import Store
from stencil_cli.store.layout import TRAIN_LOCK_NAME

MAX_SEED = 2**63 - 1  # seeds are stored as SQLite INTEGERs (signed 64-bit); gen and train share the range


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
    store.require_writable(f"lock {name!r}")
    path = store.subject_dir(name) / TRAIN_LOCK_NAME
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


def using_subject(store: Store, name: str) -> contextlib.AbstractContextManager[None]:
    """Hold subject `name` shared for a command that reads or adds to it (gen, caption, eval, train):
    `rm` waits for (or refuses while) any such command runs."""
    store.subject_dir(name)  # a valid name, and not a symbolic link, before a lock file is named after it
    store.require_writable(f"change {name!r}")  # every user of a subject stores what it makes
    return locks.subject_in_use(store.root, name)


def removing_subject(store: Store, name: str, wait_s: float) -> contextlib.AbstractContextManager[None]:
    """Hold subject `name` exclusively to remove it, waiting up to `wait_s` seconds for its users."""
    store.subject_dir(name)
    if store.read_only:
        raise StoreReadOnlyError(
            f"the store {store.root} is read-only: cannot remove {name!r}",
            hint="commands that only read (ls, show, doctor) work; make the folder writable to change it",
        )
    return locks.subject_in_use(store.root, name, exclusive=True, wait_s=wait_s, purpose="removing")


def refuse_missing_photos(store: Store, name: str) -> None:
    """Refuse to work on a subject whose photo files were deleted by hand (naming them and the fix)."""
    missing = store.missing_files(name)
    if not missing:
        return
    ids = ", ".join(str(image["id"]) for image in missing[:8]) + (", ..." if len(missing) > 8 else "")
    paths = ", ".join(image["file"] for image in missing[:3]) + (", ..." if len(missing) > 3 else "")
    raise StencilError(
        f"photo(s) {ids} of {name!r} are missing their files ({paths})",
        hint=f"add the same photos again with `stencil add {name} PHOTOS...` to restore them, "
        f"or remove them with `stencil rm {name} {{rm.image=ID}}`",
        fields=("rm.image",),
    )
