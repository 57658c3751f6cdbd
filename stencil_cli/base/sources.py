"""Where photos come from: files, folders (with their sub-folders on request) and `.zip` files of photos.

`find_photos` turns the paths a person gives into photo sources, refusals (each naming the file and the fix)
and counts of what was passed over (hidden files such as macOS `._*` AppleDouble files and `.DS_Store`, and
files of no photo format). A zip is read in memory, member by member: nothing is extracted to disk, and
members with unsafe names (absolute, `..`), links, encrypted members and oversized or bomb-like members are
refused, as is a zip with too many members or too many bytes in all.
"""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from stencil_cli.base.errors import Wording
from stencil_cli.base.formats import photo_suffixes

ZIP_SUFFIX = ".zip"
MAX_ZIP_MEMBERS = 10_000  # entries in one zip (folders included)
MAX_MEMBER_BYTES = 256 * 1024 * 1024  # one member, uncompressed
MAX_ZIP_BYTES = 4 * 1024 * 1024 * 1024  # every member of one zip, uncompressed
MAX_RATIO = 100  # uncompressed / compressed above this (for members over RATIO_FLOOR) is a zip bomb
RATIO_FLOOR = 1024 * 1024  # small members may compress well (a flat PNG) without being a threat
HIDDEN_FOLDERS = frozenset({"__MACOSX"})  # macOS zips keep their AppleDouble files there
APPLE_DOUBLE_PREFIX = "._"  # macOS's resource-fork twin of a file on a non-Mac disk


@dataclass(frozen=True)
class PhotoSource:
    """One photo to read: `path` names it in messages (a zip member as `album.zip/2024/01.jpg`); `read`
    returns its bytes when it is not a plain file."""

    path: Path
    read: Callable[[], bytes] | None = None


@dataclass(frozen=True)
class RejectedImage:
    """A file that could not be taken, and why (the reason says how to fix it)."""

    source: Path
    reason: str


@dataclass
class FoundPhotos:
    """What the given paths hold: photo sources, refusals, and what was passed over."""

    sources: list[PhotoSource] = field(default_factory=list)
    rejected: list[RejectedImage] = field(default_factory=list)
    hidden: int = 0  # hidden files and folders (`._*`, `.DS_Store`, `__MACOSX`) passed over
    other: int = 0  # files of no photo format (videos, text, ...) passed over inside folders and zips


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is hidden (dot files, AppleDouble `._*`, macOS `__MACOSX`)."""
    return name.startswith(".") or name in HIDDEN_FOLDERS


def find_photos(paths: list[Path], *, recursive: bool = False) -> FoundPhotos:
    """Expand files, folders (sub-folders only when `recursive`) and zips into photo sources, in order."""
    found = FoundPhotos()
    suffixes = photo_suffixes()
    for path in paths:
        path = Path(path)
        if path.is_dir():
            _walk_folder(path, found, suffixes, recursive)
        elif path.is_file() and path.suffix.lower() == ZIP_SUFFIX:
            _read_zip(path, found, suffixes)
        elif path.is_file() and path.name.startswith(APPLE_DOUBLE_PREFIX):
            found.hidden += 1  # a macOS resource file, never a photo, even when named (`find ... | xargs`)
        elif path.is_file():
            found.sources.append(PhotoSource(path))
        else:
            found.rejected.append(RejectedImage(path, "no such file or folder; check the path"))
    return found


def _walk_folder(root: Path, found: FoundPhotos, suffixes: frozenset[str], recursive: bool) -> None:
    """Add the photos (and zips) in `root`, sorted by path; sub-folders' photos only when `recursive`."""
    nested: list[Path] = []  # photos in sub-folders, when not recursive
    files: list[Path] = []
    for folder, subfolders, names in os.walk(root):  # links to folders are not followed (no loops)
        here = Path(folder)
        looked_at = here == root or recursive  # the rest is only searched for photos to mention
        found.hidden += sum(is_hidden(name) for name in subfolders) if looked_at else 0
        subfolders[:] = sorted(name for name in subfolders if not is_hidden(name))
        for name in sorted(names):
            file = here / name
            wanted = file.suffix.lower() in suffixes or file.suffix.lower() == ZIP_SUFFIX
            if is_hidden(name):
                found.hidden += looked_at
            elif not wanted:
                found.other += looked_at
            elif looked_at:
                files.append(file)
            else:
                nested.append(file)
    for file in sorted(files):
        if file.suffix.lower() == ZIP_SUFFIX:
            _read_zip(file, found, suffixes)
        elif file.is_file():
            found.sources.append(PhotoSource(file))
    if nested:
        folders = sorted({str(file.parent.relative_to(root)) for file in nested})
        shown = ", ".join(folders[:3]) + (", ..." if len(folders) > 3 else "")
        reason = Wording(
            f"{len(nested)} photo(s) in {len(folders)} sub-folder(s) ({shown}); pass {{recursive}} "
            "to add them too",
            ("recursive",),
        )
        found.rejected.append(RejectedImage(root, reason))


def _read_zip(path: Path, found: FoundPhotos, suffixes: frozenset[str]) -> None:
    """Add the photos in zip `path` (all its folders) as in-memory sources; refuse what is unsafe."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        found.rejected.append(RejectedImage(path, f"not a readable zip file ({error}); zip it again"))
        return
    if len(members) > MAX_ZIP_MEMBERS:
        found.rejected.append(
            RejectedImage(path, f"a zip of {len(members)} entries (at most {MAX_ZIP_MEMBERS}); split it")
        )
        return
    total = sum(member.file_size for member in members)
    if total > MAX_ZIP_BYTES:
        found.rejected.append(
            RejectedImage(
                path,
                f"a zip of {total // 2**20} MiB unpacked (at most {MAX_ZIP_BYTES // 2**30} GiB); split it",
            )
        )
        return
    for member in sorted(members, key=lambda info: info.filename):
        _zip_member(path, member, found, suffixes)


def _zip_member(path: Path, member: zipfile.ZipInfo, found: FoundPhotos, suffixes: frozenset[str]) -> None:
    """Sort one zip member into a source, a refusal, or a hidden/other count."""
    name = member.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    shown = path / name.lstrip("/")
    if member.is_dir():
        return
    if name.startswith("/") or ".." in parts or (parts and parts[0].endswith(":")):
        found.rejected.append(
            RejectedImage(shown, "an unsafe path in the zip (absolute or with '..'); not read")
        )
        return
    if any(is_hidden(part) for part in parts):
        found.hidden += 1
        return
    if PurePosixPath(name).suffix.lower() not in suffixes:
        found.other += 1
        return
    reason = _unsafe_member(member)
    if reason:
        found.rejected.append(RejectedImage(shown, reason))
        return
    found.sources.append(PhotoSource(shown, read=_member_reader(path, member.filename)))


def _unsafe_member(member: zipfile.ZipInfo) -> str | None:
    """Why a zip member is not read (a link, encrypted, too large, a bomb), or None."""
    if stat.S_ISLNK(member.external_attr >> 16):
        return "a link inside the zip; not followed (zip the photo itself)"
    if member.flag_bits & 0x1:
        return "encrypted inside the zip; unzip it with its password and add the photo"
    if member.file_size > MAX_MEMBER_BYTES:
        return f"{member.file_size // 2**20} MiB unpacked (at most {MAX_MEMBER_BYTES // 2**20} MiB per photo)"
    if member.file_size > RATIO_FLOOR and member.file_size > MAX_RATIO * max(member.compress_size, 1):
        return (
            f"packed {member.file_size // max(member.compress_size, 1)}:1 in the zip (a zip bomb?); "
            "not unpacked; add the photo itself"
        )
    return None


def _member_reader(path: Path, name: str) -> Callable[[], bytes]:
    """A function that reads member `name` of zip `path` into memory, at most MAX_MEMBER_BYTES of it."""

    def read() -> bytes:
        with zipfile.ZipFile(path) as archive, archive.open(name) as member:
            data = member.read(MAX_MEMBER_BYTES + 1)
        if len(data) > MAX_MEMBER_BYTES:
            raise ValueError(f"over {MAX_MEMBER_BYTES // 2**20} MiB unpacked")
        return data

    return read
