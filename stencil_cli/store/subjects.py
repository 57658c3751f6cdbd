"""Subjects and their photos: find, list, add (files first, then rows), caption, remove.

A long-running command pins the id of the subject it started with (`subject_id_of`) and checks it before each
row it writes (`check_subject`): a subject removed, or removed and added again, meanwhile gets nothing.
"""

from __future__ import annotations

import difflib
import io
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from stencil_cli.base.errors import BadInputError, NotFoundError, StencilError
from stencil_cli.base.fsutil import atomic_write_bytes, crash_point, is_within
from stencil_cli.store import layout
from stencil_cli.store.connection import Connection, translate_errors
from stencil_cli.store.records import AddResult, Subject, now, validate_name

MIN_PREFIX = 4  # the shortest sha256 prefix that names a photo (shorter ones match too easily)

if TYPE_CHECKING:
    from stencil_cli.base.images import PreparedImage


class SubjectChangedError(StencilError):
    """The subject a running command started with was removed (or removed and added again) meanwhile."""


class SubjectQueries(Connection):
    """The `subjects` and `images` tables, and the photo files in each subject's `images/` folder."""

    @translate_errors
    def subject_names(self) -> list[str]:
        """All subject names, sorted."""
        return [row["name"] for row in self.db.query("select name from subjects order by name")]

    @translate_errors
    def find_subject(self, name: str) -> Subject | None:
        """The subject called `name` with its images, or None."""
        rows = list(self.db.query("select * from subjects where name = ?", [name]))
        if not rows:
            return None
        row = rows[0]
        images = [
            self._image_view(image)
            for image in self.db.query("select * from images where subject_id = ? order by id", [row["id"]])
        ]
        return Subject(
            id=row["id"],
            name=row["name"],
            phrase=row["phrase"],
            class_word=row["class_word"],
            description=row["description"],
            created=row["created"],
            images=images,
        )

    @translate_errors
    def get_subject(self, name: str) -> Subject:
        """The subject called `name`, or a NotFoundError suggesting the closest names."""
        validate_name(name)
        subject = self.find_subject(name)
        if subject is None:
            raise NotFoundError(unknown_subject_message(name, self.subject_names()))
        return subject

    @translate_errors
    def list_subjects(self) -> list[dict[str, Any]]:
        """Every subject with its photo count, captioned count and newest finished run."""
        return list(
            self.db.query(
                """
                select s.id, s.name, s.phrase, s.class_word, s.created,
                  (select count(*) from images i where i.subject_id = s.id) as images,
                  (select count(*) from images i where i.subject_id = s.id
                     and i.caption is not null and i.caption != '') as captioned,
                  (select max(r.id) from runs r where r.subject_id = s.id and r.status = 'done')
                     as latest_run
                from subjects s order by s.name
                """
            )
        )

    @translate_errors
    def subject_id_of(self, name: str) -> int:
        """The id of the subject called `name` (NotFoundError if none): pin it for a long-running command."""
        return self.get_subject(name).id

    @translate_errors
    def check_subject(self, name: str, subject_id: int) -> None:
        """Raise SubjectChangedError unless the subject called `name` still has id `subject_id`."""
        row = next(iter(self.db.query("select id from subjects where name = ?", [name])), None)
        if row is None or row["id"] != subject_id:
            what = "removed" if row is None else "removed and added again"
            raise SubjectChangedError(
                f"subject {name!r} was {what} while this command ran; nothing more was stored for it",
                hint="run the command again if you still want its result",
            )

    @translate_errors
    def update_subject(self, name: str, **values: Any) -> None:
        """Set fields (phrase, class_word, description) on a subject."""
        allowed = {"phrase", "class_word", "description"}
        unknown = set(values) - allowed
        if unknown:
            raise ValueError(f"cannot update subject fields {sorted(unknown)}")
        subject = self.get_subject(name)
        with self.write():
            self.db["subjects"].update(subject.id, values)

    @translate_errors
    def add_images(
        self,
        name: str,
        prepared: Iterable[PreparedImage],
        *,
        phrase: str | None = None,
        class_word: str | None = None,
    ) -> AddResult:
        """Create the subject if needed and add the photos: files first, then all rows in one transaction.

        A crash between the two leaves only unreferenced files named by hash, which the next add of the
        same photo reuses and `clean` removes; never a row without its file.
        """
        validate_name(name)
        prepared = list(prepared)
        images_dir = self.subject_dir(name) / layout.IMAGES_DIR
        unique: dict[str, PreparedImage] = {}
        for image in prepared:
            unique.setdefault(image.sha256, image)
        self._require_writable()
        existing = self.find_subject(name)
        known = {image["sha256"]: image for image in existing.images} if existing else {}
        to_add = [image for sha, image in unique.items() if sha not in known]
        duplicates = [image for image in prepared if image not in to_add]
        restored = self._restore_deleted_files(unique, known)
        for image in to_add:
            target = images_dir / layout.photo_name(image.sha256, image.suffix)
            if not target.exists():
                atomic_write_bytes(target, image.data)
                crash_point("add:file-written")
        crash_point("add:files-written")
        with self.write():
            row = next(iter(self.db.query("select * from subjects where name = ?", [name])), None)
            created_subject = row is None
            if row is None:
                subject_id = self._insert_subject(
                    name, phrase=phrase, class_word=class_word, description=None
                )
            else:
                subject_id = row["id"]
                updates = {k: v for k, v in (("phrase", phrase), ("class_word", class_word)) if v}
                if updates:
                    self.db["subjects"].update(subject_id, updates)
            added_rows = self._insert_photo_rows(name, subject_id, to_add)
        subject = self.get_subject(name)
        by_sha = {image["sha256"]: image for image in subject.images}
        added = [by_sha[row["sha256"]] for row in added_rows]
        return AddResult(
            subject=subject,
            created_subject=created_subject,
            added=added,
            duplicates=duplicates,
            restored=restored,
        )

    @translate_errors
    def remove_subject(self, name: str) -> Subject:
        """Delete a subject, its rows and its folder (only ever inside the store root)."""
        subject = self.get_subject(name)
        folder = self.subject_dir(name)
        with self.write():
            for table in ("draft_prompts", "generations", "runs", "images"):
                self.db.execute(f"delete from {table} where subject_id = ?", [subject.id])
            self.db.execute("delete from subjects where id = ?", [subject.id])
        self._delete_tree(folder)
        return subject

    @translate_errors
    def remove_image(self, name: str, image_ref: str) -> dict[str, Any]:
        """Delete one photo of a subject, by id or by a unique sha256 prefix."""
        subject = self.get_subject(name)
        image = self.resolve_image(subject, image_ref)
        with self.write():
            self.db.execute("delete from images where id = ?", [image["id"]])
        path = Path(image["file"])
        if is_within(path, self.root):
            path.unlink(missing_ok=True)
        return image

    def resolve_image(self, subject: Subject, image_ref: str) -> dict[str, Any]:
        """Find a subject's image by numeric id or sha256 prefix, or raise NotFoundError."""
        ref = str(image_ref).strip().lower()
        matches = [
            image
            for image in subject.images
            if str(image["id"]) == ref or (len(ref) >= MIN_PREFIX and image["sha256"].startswith(ref))
        ]
        if not matches and len(ref) < MIN_PREFIX and re.fullmatch(r"[0-9a-f]*[a-f][0-9a-f]*", ref):
            raise BadInputError(
                f"image {image_ref!r}: no image has that id, and a sha256 prefix this short is not "
                f"looked up: use at least {MIN_PREFIX} characters (or the image's id)"
            )
        if len(matches) != 1:
            ids = ", ".join(str(image["id"]) for image in subject.images) or "none"
            what = "is ambiguous" if matches else "not found"
            raise NotFoundError(f"image {image_ref!r} {what} in subject {subject.name!r} (image ids: {ids})")
        return matches[0]

    @translate_errors
    def set_captions(
        self,
        name: str,
        captions: dict[int, str],
        source: str,
        *,
        description: str | None = None,
        phrase: str | None = None,
    ) -> None:
        """Store captions (image id -> text) and optionally the description/phrase, in one transaction."""
        subject = self.get_subject(name)
        ids = {image["id"] for image in subject.images}
        unknown = set(captions) - ids
        if unknown:
            raise NotFoundError(f"images {sorted(unknown)} do not belong to subject {name!r}")
        with self.write():
            for image_id, caption in captions.items():
                self.db["images"].update(image_id, {"caption": caption, "caption_source": source})
            updates = {k: v for k, v in (("description", description), ("phrase", phrase)) if v}
            if updates:
                self.db["subjects"].update(subject.id, updates)

    # -- helpers ------------------------------------------------------------------------------

    def _restore_deleted_files(
        self, unique: dict[str, PreparedImage], known: dict[str, dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Write back the files of stored photos that were deleted by hand; return their rows."""
        restored: list[dict[str, Any]] = []
        for sha, image in unique.items():
            row = known.get(sha)
            if row is not None and not os.path.isfile(row["file"]):
                target = Path(row["file"])
                if is_within(target, self.root):
                    atomic_write_bytes(target, _encoded_as(image, target.suffix))
                    restored.append(row)
        return restored

    def _insert_photo_rows(
        self, name: str, subject_id: int, images: list[PreparedImage]
    ) -> list[dict[str, Any]]:
        """Insert an image row per photo (call inside a write transaction); return the rows this call added
        (another process may have added the same photo meanwhile: its row is kept)."""
        added: list[dict[str, Any]] = []
        for image in images:
            record = {
                "subject_id": subject_id,
                "sha256": image.sha256,
                "file": layout.photo_relative(name, layout.photo_name(image.sha256, image.suffix)),
                "original_name": image.source.name,
                "width": image.width,
                "height": image.height,
                "caption": None,
                "caption_source": None,
                "added": now(),
            }
            self.db["images"].insert(record, ignore=True)
            if self.db.execute("select changes()").fetchone()[0]:
                added.append(record)
        return added

    def _insert_subject(self, name: str, **values: Any) -> int:
        """Insert a subject row with a never-used id and return the id (call inside a write transaction)."""
        row = {"id": self._next_subject_id(), "name": name, **values, "created": now()}
        return self.db["subjects"].insert(row).last_pk

    def _next_subject_id(self) -> int:
        """A subject id never used before in this store (call inside a write transaction)."""
        return self._next_id("subject_id", "subjects")

    def _next_id(self, counter: str, table: str) -> int:
        """An id for `table` never used before in this store, kept in `counters` (inside a write transaction).

        SQLite hands out the highest id again after that row is deleted; a record that names an id (a pinned
        command, an export's metadata) must never come to mean another row."""
        used = self.db.execute("select value from counters where name = ?", [counter]).fetchone()
        highest = self.db.execute(f"select coalesce(max(id), 0) from {table}").fetchone()[0]
        next_id = max(used[0] if used else 0, highest) + 1
        self.db["counters"].upsert({"name": counter, "value": next_id}, pk="name")
        return next_id

    def _image_view(self, row: dict[str, Any]) -> dict[str, Any]:
        view = dict(row)
        view.pop("subject_id", None)
        view["file"] = str(self.absolute(row["file"]))
        return view


def unknown_subject_message(name: str, names: list[str]) -> str:
    """'no subject called X' plus the closest existing names, if any."""
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    message = f"no subject called {name!r}"
    if close:
        return message + f"; did you mean {', '.join(repr(n) for n in close)}?"
    if names:
        return message + " (see `stencil ls`)"
    return message + " (add one with `stencil add NAME PHOTOS...`)"


def _encoded_as(image: PreparedImage, suffix: str) -> bytes:
    """The photo's bytes in the format `suffix` names (a restored file keeps its stored name)."""
    if suffix == image.suffix:
        return image.data
    buffer = io.BytesIO()
    with Image.open(io.BytesIO(image.data)) as opened:
        if suffix == ".jpg":
            opened.convert("RGB").save(buffer, format="JPEG", quality=95, subsampling=0)
        else:
            opened.save(buffer, format="PNG")
    return buffer.getvalue()
