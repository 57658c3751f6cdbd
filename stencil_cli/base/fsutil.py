"""Durable file writes: temp file in the same folder, fsync, then os.replace."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from stencil_cli.base.errors import BadInputError, DiskFullError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def current_umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from `open()`: 0666 minus the umask."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode a new folder gets from `mkdir`: 0777 minus the umask."""
    return 0o777 & ~current_umask()


# How a full disk reads where a library reports it in its own exception: Rust's io::Error (safetensors:
# "I/O error: No space left on device (os error 28)") and the strerror texts of the errnos above.
_ERRNO_ALTERNATIVES = "|".join(str(number) for number in sorted(DISK_FULL_ERRNOS))
_DISK_FULL_TEXT = re.compile(
    rf"\(os error (?:{_ERRNO_ALTERNATIVES})\)|No space left on device|File too large|Disk quota exceeded"
)


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and the exceptions it was raised from or while handling (each once)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_disk_full(error: BaseException) -> bool:
    """True when a full disk, a quota or a file-size limit (``ulimit -f``) caused `error`.

    Besides the OSErrors (ENOSPC, EFBIG, EDQUOT), this recognises the shapes other libraries give them:
    safetensors' ``SafetensorError("... (os error 28)")``, and torch's ``RuntimeError("[enforce fail at
    inline_container.cc ...]")`` raised while handling the OSError of a Python file it was writing to.
    """
    for link in _chain(error):
        if isinstance(link, OSError) and link.errno in DISK_FULL_ERRNOS:
            return True
        if not isinstance(link, OSError) and _DISK_FULL_TEXT.search(str(link)):
            return True
    return False


@contextlib.contextmanager
def disk_full_as_error(path: Path | str) -> Iterator[None]:
    """Turn an error that a full disk caused (see `is_disk_full`) raised inside into `DiskFullError(path)`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if is_disk_full(error):
            raise DiskFullError(path) from error
        raise


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success fsync it and move it over `target`.

    The file gets the mode any new file gets (0666 minus the umask), not mkstemp's 0600. A full disk or a
    file-size limit becomes `DiskFullError(target)`, and the old `target` (if any) is left as it was.
    """
    target = Path(target)
    _refuse_special(target)
    with disk_full_as_error(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        with disk_full_as_error(target):
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.chmod(tmp, file_mode())
            os.replace(tmp, target)
            _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _refuse_special(target: Path) -> None:
    """Never rename a file over a folder, device, FIFO or socket (as root, /dev/null would become a file)."""
    try:
        mode = os.lstat(target).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise BadInputError(f"{target} is not a regular file: stencil will not replace it; pick another path")


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write `data` to `target` atomically: readers see the old file or the whole new one."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_with(target: Path, writer: Callable[[Path], None]) -> None:
    """Call `writer(tmp_path)` and atomically move the result to `target`."""
    with atomic_path(target) as tmp:
        writer(tmp)


def is_within(path: Path, root: Path) -> bool:
    """True if `path` resolves to a location inside `root` (guards deletions)."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True


def crash_point(name: str) -> None:
    """Kill this process here if ``STENCIL_CRASH_AT`` names this point (tests of crash safety)."""
    if os.environ.get("STENCIL_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def folder_has_version(folder: Path, version: str) -> bool:
    """Whether `folder` holds a complete build of `version` (its VERSION file, written last, says so)."""
    try:
        return (Path(folder) / "VERSION").read_text(encoding="utf-8").strip() == version
    except OSError:
        return False


def build_folder_once(folder: Path, version: str, build: Callable[[Path], object]) -> Path:
    """Make `folder` by calling `build(staging)` unless it already holds `version`; safe across processes.

    The build goes to a staging folder beside `folder`, gets a VERSION file, and is renamed into place, so a
    reader never sees a half-built folder; when two processes race, the first complete build wins.
    """
    folder = Path(folder)
    if folder_has_version(folder, version):
        return folder
    with disk_full_as_error(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-build-", dir=folder.parent))
    try:
        os.chmod(staging, folder_mode())  # mkdtemp makes 0700: the built folder should honour the umask
        with disk_full_as_error(folder):
            build(staging)
        (staging / "VERSION").write_text(version + "\n", encoding="utf-8")
        if folder.is_symlink() or folder.exists():
            if folder_has_version(folder, version):  # another process finished first
                return folder
            if folder.is_symlink() or folder.is_file():
                folder.unlink()
            else:
                shutil.rmtree(folder)
        try:
            os.replace(staging, folder)
        except OSError:
            if not folder_has_version(folder, version):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder
