"""Where a command may write what the user named (`export -o`, `gen -o`, `view --out`), checked up front.

- never inside the store (its own files are not the user's to overwrite by accident);
- never over a device, FIFO or socket, and over a folder only when stencil wrote it (an earlier export);
- only into a folder this process can really create a file in (probed: a read-only mount, `/proc`, `/sys`
  and a folder of another user all fail here, also for root, before a model loads).
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from stencil_cli.base.errors import FieldError
from stencil_cli.base.fsutil import is_within

KINDS = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
}


def file_kind(path: Path) -> str | None:
    """What `path` is when it is neither a regular file, a folder nor a symbolic link (None otherwise)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    return KINDS.get(stat.S_IFMT(mode))


def refuse_special_file(path: Path, field: str) -> None:
    """Refuse to write over a device, FIFO or socket at `path` (replacing one would break the system)."""
    kind = file_kind(path)
    if kind is not None:
        raise FieldError(
            field,
            f"{{}} {path} is {kind}: stencil writes only regular files (and folders it made); "
            "pick another path",
        )


def refuse_inside_store(path: Path, store_root: Path, field: str) -> None:
    """Refuse an output path inside the store: it could replace the store's own photos, weights or images."""
    path = Path(path)
    if is_within(path, store_root) or is_within(path.parent, store_root):
        raise FieldError(
            field,
            f"{{}} {path} is inside the store {store_root}: stencil keeps its own files there; "
            "pick a path outside it",
        )


def check_replaceable(
    path: Path, *, force: bool, field: str, force_field: str = "force", ours: Callable[[Path], bool]
) -> None:
    """Refuse an existing `path` unless `force`, and even then anything but a regular file (or a link) or a
    folder that `ours(path)` says stencil wrote."""
    refuse_special_file(path, field)
    if not (path.exists() or path.is_symlink()):
        return
    if not force:
        raise FieldError(force_field, f"{path} already exists: pick another path, or replace it with {{}}")
    if path.is_dir() and not path.is_symlink() and not ours(path):
        raise FieldError(
            (field, force_field),
            f"{{0}} {path} is a folder that stencil did not write: {{1}} replaces only an earlier export; "
            "pick another path",
        )


def probe_writable_folder(folder: Path, field: str, path: Path | None = None) -> None:
    """Refuse `folder` unless a file can really be created in it (a temp file, removed at once)."""
    shown = path if path is not None else folder
    try:
        handle, name = tempfile.mkstemp(prefix=".stencil-probe-", dir=folder)
    except OSError as error:
        reason = error.strerror or str(error)
        raise FieldError(field, f"{{}} {shown}: cannot write in the folder {folder} ({reason})") from None
    os.close(handle)
    os.unlink(name)
