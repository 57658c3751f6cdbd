"""Which commands are using a subject: shared locks for users (gen, train, caption, eval), exclusive for rm.

A lock is an OS file lock (``flock``) on ``<store>/locks/<name>.lock``, a file outside the subject's folder so
that it outlives `rm` and a later subject of the same name. The OS releases it when its process dies (also on
SIGKILL), so a crash never leaves a stale lock. On Windows (no shared locks) every lock is exclusive.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from stencil_cli.base.errors import StencilError

LOCKS_DIR = "locks"
POLL_S = 0.1


class SubjectInUseError(StencilError):
    """Another stencil command holds the subject (e.g. `rm` while a `gen` runs)."""


def lock_path(root: Path, name: str) -> Path:
    """The lock file of subject `name` in the store at `root` (the name must be valid already)."""
    return Path(root) / LOCKS_DIR / f"{name}.lock"


@contextmanager
def subject_in_use(
    root: Path,
    name: str,
    *,
    exclusive: bool = False,
    wait_s: float = 0.0,
    purpose: str = "",
) -> Iterator[None]:
    """Hold subject `name` for the block: shared (many users at once) or exclusive (no one else).

    Waits up to `wait_s` seconds for a conflicting holder to finish, then raises SubjectInUseError. `purpose`
    (e.g. "removing") only shapes the message. The lock is released when the block ends or the process dies.
    """
    path = lock_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle: IO[bytes] = open(path, "a+b")  # noqa: SIM115 - held for the whole block
    try:
        deadline = time.monotonic() + max(wait_s, 0.0)
        while not _try_lock(handle, exclusive):
            if time.monotonic() >= deadline:
                doing = f" for {purpose}" if purpose else ""
                if exclusive:
                    what = (
                        f"subject {name!r} is in use by another stencil command (gen, train, caption or eval)"
                    )
                else:
                    what = f"subject {name!r} is being removed or changed by another stencil command"
                waited = f" (waited {wait_s:g} s)" if wait_s > 0 else ""
                raise SubjectInUseError(
                    f"{what}, so it cannot be locked{doing}{waited}",
                    hint="wait for that command to finish (or stop it with Ctrl-C), then try again",
                )
            time.sleep(POLL_S)
        yield
    finally:
        handle.close()  # closing releases the lock


def is_in_use(root: Path, name: str) -> bool:
    """Whether any command holds subject `name` now (a quick, non-blocking probe)."""
    path = lock_path(root, name)
    if not path.exists():
        return False
    with open(path, "a+b") as handle:
        if _try_lock(handle, exclusive=True):
            return False
    return True


def _try_lock(handle: IO[bytes], exclusive: bool) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows: msvcrt has exclusive byte-range locks only
        import msvcrt

        handle.seek(0)
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        fcntl.flock(handle.fileno(), mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without flock (ENOLCK, EOPNOTSUPP): do not block every command on it
        return True
    return True
