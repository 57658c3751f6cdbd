"""Upkeep: what crashed commands and lost databases leave behind (`stencil store clean`, `store repair`,
`doctor`): files no row refers to, photo rows whose file is gone, subject folders without a row.

Nothing here deletes outside the store root, follows a symbolic link, or touches a folder the database does
not know unless the user named it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from stencil_cli.base import locks
from stencil_cli.base.errors import BadInputError, NotFoundError
from stencil_cli.store import layout
from stencil_cli.store.connection import translate_errors
from stencil_cli.store.records import NAME_PATTERN, now
from stencil_cli.store.subjects import SubjectQueries


class Upkeep(SubjectQueries):
    """Finding and clearing leftovers, and indexing subject folders again after a lost database."""

    @translate_errors
    def unindexed_folders(self) -> list[str]:
        """Names of folders under subjects/ that have no subject row (e.g. after the database was lost).

        `clean` never deletes them unless named; `repair` indexes their photos again.
        """
        subjects_root = layout.subjects_folder(self.root)
        if not subjects_root.is_dir() or subjects_root.is_symlink():
            return []
        known = set(self.subject_names())
        return sorted(
            entry.name
            for entry in subjects_root.iterdir()
            if entry.name not in known and (entry.is_dir() or entry.is_symlink())
        )

    @translate_errors
    def missing_files(self, name: str | None = None) -> list[dict[str, Any]]:
        """Photo rows whose file is gone (of subject `name`, or of every subject), each with its `subject`."""
        if name is not None:
            subject = self.get_subject(name)
            rows = self.db.query(
                "select i.*, s.name as subject from images i join subjects s on s.id = i.subject_id "
                "where s.id = ? order by i.id",
                [subject.id],
            )
        else:
            rows = self.db.query(
                "select i.*, s.name as subject from images i join subjects s on s.id = i.subject_id "
                "order by s.name, i.id"
            )
        missing = []
        for row in rows:
            view = self._image_view(row)
            if not os.path.isfile(view["file"]):
                missing.append(view)
        return missing

    # -- clean --------------------------------------------------------------------------------

    @translate_errors
    def clean(self, min_age_s: float = 300.0, *, remove_unindexed: Iterable[str] = ()) -> list[Path]:
        """Remove what crashed commands left behind (files no row refers to); return what was removed.

        That is: photos no image row refers to, run folders with no run row, and generated images / drafts
        (PNG) no generation row points to (contact sheets are kept: `grid.png`, `contact-sheet.png`), all
        inside folders of subjects that have a row. A subject folder WITHOUT a row is never removed unless
        its name is in `remove_unindexed` (the user named it): a lost or emptied database must not cost the
        photos, weights and images (see `unindexed_folders` and `repair`). Anything modified in the last
        `min_age_s` seconds is left alone: it may belong to a command still running in another process, and
        so is every subject that a command (gen, train, caption, eval) holds now.
        Symbolic links are removed as links, never followed.
        """
        self._require_writable()
        cutoff = time.time() - min_age_s
        named = set(remove_unindexed)
        unindexed = set(self.unindexed_folders())
        self._check_named_unindexed(named, unindexed)
        referenced = self._referenced_files()
        removed: list[Path] = []
        subjects_root = layout.subjects_folder(self.root)
        if not subjects_root.is_dir() or subjects_root.is_symlink():
            return removed
        for folder in sorted(subjects_root.iterdir()):
            if folder.name in unindexed:
                if folder.name in named and _stale(folder, cutoff):
                    self._remove_leftover(folder, removed)
                continue
            if folder.is_symlink() or not folder.is_dir():
                continue
            try:
                # a running gen writes its drafts before their rows: a subject in use keeps its new files
                with locks.subject_in_use(self.root, folder.name, exclusive=True):
                    for path in self._leftovers(folder, referenced):
                        if _stale(path, cutoff):
                            self._remove_leftover(path, removed)
            except locks.SubjectInUseError:
                continue
        return removed

    def _check_named_unindexed(self, named: set[str], unindexed: set[str]) -> None:
        """Refuse a folder name given to `clean` that is a subject with a row, or no folder at all."""
        for folder_name in sorted(named):
            if folder_name not in unindexed:
                if self.find_subject(folder_name) is not None:
                    raise BadInputError(
                        f"subject {folder_name!r} has a database row: "
                        f"remove it with `stencil rm {folder_name}`"
                    )
                raise NotFoundError(f"there is no subject folder {folder_name!r} without a row to remove")

    def _referenced_files(self) -> dict[str, set[str]]:
        """What the rows refer to: photo files, run ids (as folder names), generated images and drafts."""
        return {
            "photos": {row["file"] for row in self.db.query("select file from images")},
            "runs": {str(row["id"]) for row in self.db.query("select id from runs")},
            "generated": {
                row[key]
                for row in self.db.query("select image_file, draft_file from generations")
                for key in ("image_file", "draft_file")
                if row[key]
            },
        }

    def _leftovers(self, folder: Path, referenced: dict[str, set[str]]) -> list[Path]:
        """The files and run folders in a subject's `folder` that no row refers to (contact sheets kept)."""
        candidates: list[Path] = []
        images_dir = folder / layout.IMAGES_DIR
        if images_dir.is_dir() and not images_dir.is_symlink():
            candidates += [f for f in images_dir.iterdir() if self._lexical(f) not in referenced["photos"]]
        runs_dir = folder / layout.RUNS_DIR
        if runs_dir.is_dir() and not runs_dir.is_symlink():
            candidates += [
                d
                for d in runs_dir.iterdir()
                if (d.is_dir() or d.is_symlink()) and d.name not in referenced["runs"]
            ]
        generations_dir = folder / layout.GENERATIONS_DIR
        if generations_dir.is_dir() and not generations_dir.is_symlink():
            candidates += [
                f
                for f in generations_dir.rglob("*.png")
                if (f.is_file() or f.is_symlink())
                and f.name not in layout.SHEET_NAMES
                and self._lexical(f) not in referenced["generated"]
            ]
        return candidates

    def _lexical(self, path: Path) -> str:
        """The store-relative form of `path`, lexically: never resolves a (dangling) link."""
        return path.relative_to(self.root).as_posix()

    def _remove_leftover(self, path: Path, removed: list[Path]) -> None:
        """Remove `path` (a link, dangling or not, goes as a link, never what it points to) and note it."""
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            self._delete_tree(path)
        removed.append(path)

    # -- repair -------------------------------------------------------------------------------

    @translate_errors
    def repair(self) -> dict[str, Any]:
        """Index again the photos found in subject folders that no row refers to (after a lost database).

        Creates a subject row for each folder without one (folder names that are not valid subject names are
        skipped), and an image row (no caption) for each `<sha256>.jpg|png` photo Pillow can read. Training
        runs and generations are not re-indexed: for a subject it creates, their folders move to
        `subjects/<name>/recovered/` (which `clean` never touches), so nothing is lost; train and generate
        again as needed. Folders without photos are left as they are. Returns
        `{"subjects": [names created], "images": count indexed, "skipped": [(path, reason)]}`.
        """
        self._require_writable()
        report: dict[str, Any] = {"subjects": [], "images": 0, "skipped": []}
        subjects_root = layout.subjects_folder(self.root)
        if not subjects_root.is_dir() or subjects_root.is_symlink():
            return report
        referenced = {row["file"] for row in self.db.query("select file from images")}
        for folder in sorted(subjects_root.iterdir()):
            if folder.is_symlink() or not folder.is_dir():
                report["skipped"].append((str(folder), "not a folder (a symbolic link or a file)"))
                continue
            if not NAME_PATTERN.fullmatch(folder.name):
                report["skipped"].append((str(folder), "not a valid subject name"))
                continue
            found = _unindexed_photos(folder, referenced, report["skipped"])
            if not found:
                if self.find_subject(folder.name) is None:
                    report["skipped"].append((str(folder), "no photos to index"))
                continue
            self._index_photos(folder, found, report)
        return report

    def _index_photos(self, folder: Path, found: list[dict[str, Any]], report: dict[str, Any]) -> None:
        """Add the image rows `found` in a subject's `folder`, creating its subject row if it has none."""
        with self.write():
            row = next(iter(self.db.query("select id from subjects where name = ?", [folder.name])), None)
            if row is None:
                subject_id = self._insert_subject(folder.name, phrase=None, class_word=None)
                report["subjects"].append(folder.name)
                _set_aside_unindexed_outputs(folder)
            else:
                subject_id = row["id"]
            for record in found:
                self.db["images"].insert({**record, "subject_id": subject_id}, ignore=True)
                report["images"] += self.db.execute("select changes()").fetchone()[0]


def _stale(path: Path, cutoff: float) -> bool:
    """Whether nothing in `path` (a file, or a folder and everything in it) was modified since `cutoff`."""
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        times += [child.lstat().st_mtime for child in path.rglob("*")]
    return max(times) < cutoff


def _unindexed_photos(
    folder: Path, referenced: set[str], skipped: list[tuple[str, str]]
) -> list[dict[str, Any]]:
    """Image rows (without subject id) for the readable stored photos in `folder` that no row refers to;
    the files it cannot take go to `skipped` with the reason."""
    found: list[dict[str, Any]] = []
    images_dir = folder / layout.IMAGES_DIR
    usable = images_dir.is_dir() and not images_dir.is_symlink()
    for photo in sorted(images_dir.iterdir()) if usable else []:
        relative = layout.photo_relative(folder.name, photo.name)
        if relative in referenced:
            continue
        if photo.is_symlink() or not layout.PHOTO_FILE.fullmatch(photo.name):
            skipped.append((str(photo), "not a photo stored by stencil"))
            continue
        try:
            with Image.open(photo) as opened:
                opened.load()
                width, height = opened.size
        except Exception as error:  # noqa: BLE001 - any unreadable file is skipped and named
            skipped.append((str(photo), f"unreadable ({type(error).__name__})"))
            continue
        found.append(
            {
                "sha256": photo.name.split(".")[0],
                "file": relative,
                "original_name": photo.name,
                "width": width,
                "height": height,
                "caption": None,
                "caption_source": None,
                "added": now(),
            }
        )
    return found


def _set_aside_unindexed_outputs(folder: Path) -> None:
    """Move a re-created subject's runs and generations (no rows for them) to `recovered/`."""
    for part in (layout.RUNS_DIR, layout.GENERATIONS_DIR):
        source = folder / part
        if source.exists() or source.is_symlink():
            target = folder / layout.RECOVERED_DIR / part
            target.parent.mkdir(exist_ok=True)
            if target.exists():
                target = folder / layout.RECOVERED_DIR / f"{part}-{int(time.time())}"
            os.replace(source, target)
