"""The local store: SQLite via sqlite-utils (+ Migrations), files beside it, atomic writes.

Layout under the root (``STENCIL_HOME`` or the platform's user data folder)::

    stencil.db                         subjects, images, runs, generations, config
    subjects/<name>/images/<sha256>.jpg|.png
    subjects/<name>/runs/<run id>/     weights, masks, checkpoints (training)
    subjects/<name>/generations/<id>/  images and drafts (generation)
    models/                            locally built models (the tiny preset)

This module never imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from stencil_cli.base.errors import (
    BadInputError,
    CorruptStoreError,
    DiskFullError,
    NotFoundError,
    StencilError,
    StoreReadOnlyError,
)
from stencil_cli.base.fsutil import atomic_write_bytes, crash_point, is_disk_full, is_within
from stencil_cli.base.paths import default_root

if TYPE_CHECKING:
    from stencil_cli.base.images import PreparedImage


def _import_sqlite_utils() -> Any:
    """Import sqlite-utils without numpy: it imports numpy (~0.2 s) only to store numpy values, which stencil
    never does, and every command (`stencil ls` in a shell loop) would pay for it at start-up."""
    if "numpy" in sys.modules or "sqlite_utils" in sys.modules:
        return importlib.import_module("sqlite_utils")
    sys.modules["numpy"] = None  # type: ignore[assignment] # makes `import numpy` fail inside sqlite-utils
    try:
        return importlib.import_module("sqlite_utils")
    finally:
        del sys.modules["numpy"]


sqlite_utils = _import_sqlite_utils()
from sqlite_utils import Migrations  # noqa: E402 - after the import above

DB_NAME = "stencil.db"
BUSY_TIMEOUT_MS = 30_000
SHEET_NAMES = frozenset({"grid.png", "contact-sheet.png"})  # contact sheets: no generation row points at them
# used with fullmatch (a trailing newline must not pass); no leading '-': it would read as an option
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
PHOTO_FILE = re.compile(r"[0-9a-f]{64}\.(jpg|png)")  # how add names a stored photo

migrations = Migrations("stencil")


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    """Subjects, their images, training runs, generations and config."""
    db["subjects"].create(
        {
            "id": int,
            "name": str,
            "phrase": str,
            "class_word": str,
            "description": str,
            "created": str,
        },
        pk="id",
        not_null={"name", "created"},
    )
    db["subjects"].create_index(["name"], unique=True)
    db["images"].create(
        {
            "id": int,
            "subject_id": int,
            "sha256": str,
            "path": str,
            "original_name": str,
            "width": int,
            "height": int,
            "caption": str,
            "caption_source": str,
            "added": str,
        },
        pk="id",
        foreign_keys=[("subject_id", "subjects", "id")],
        not_null={"subject_id", "sha256", "path", "width", "height", "added"},
    )
    db["images"].create_index(["subject_id", "sha256"], unique=True)
    db["runs"].create(
        {
            "id": int,
            "subject_id": int,
            "status": str,  # running | done | failed | interrupted
            "params": str,  # JSON
            "base_model": str,
            "losses": str,  # JSON list of floats
            "step": int,
            "started": str,
            "finished": str,
            "duration_s": float,
            "weights_path": str,
            "error": str,
        },
        pk="id",
        foreign_keys=[("subject_id", "subjects", "id")],
        not_null={"subject_id", "status", "started"},
    )
    db["runs"].create_index(["subject_id", "status"])
    db["generations"].create(
        {
            "id": int,
            "subject_id": int,
            "run_id": int,
            "prompt": str,
            "draft_prompt": str,
            "seed": int,
            "tau": float,
            "params": str,  # JSON
            "image_path": str,
            "draft_path": str,
            "scores": str,  # JSON, filled by evaluation
            "created": str,
        },
        pk="id",
        foreign_keys=[("subject_id", "subjects", "id")],
        not_null={"subject_id", "created"},
    )
    db["generations"].create_index(["subject_id"])
    db["config"].create({"key": str, "value": str}, pk="key")


@migrations()
def m002_subject_id_counter(db: sqlite_utils.Database) -> None:
    """A counter so that a subject id is never used twice (SQLite reuses the highest id after a delete).

    A command pins the id of the subject it works on; a subject removed and added again under the same name
    must get a new id, or the pinned command would write into the new subject.
    """
    db["counters"].create({"name": str, "value": int}, pk="name")
    highest = db.execute("select coalesce(max(id), 0) from subjects").fetchone()[0]
    db["counters"].insert({"name": "subject_id", "value": highest})


@migrations()
def m003_one_name_per_file_column(db: sqlite_utils.Database) -> None:
    """One name per stored file: images.file, runs.weights_file, generations.image_file / draft_file."""
    db["images"].transform(rename={"path": "file"})
    db["runs"].transform(rename={"weights_path": "weights_file"})
    db["generations"].transform(rename={"image_path": "image_file", "draft_path": "draft_file"})


@migrations()
def m004_draft_prompt_cache(db: sqlite_utils.Database) -> None:
    """Draft prompts written by a vision model (`stencil gen --rewrite`), one per subject, user prompt,
    caption model and description (a hash of the phrase and description they were written from)."""
    db["draft_prompts"].create(
        {
            "subject_id": int,
            "user_prompt": str,
            "model": str,
            "description_hash": str,
            "draft_prompt": str,
            "created": str,
        },
        pk=("subject_id", "user_prompt", "model", "description_hash"),
        foreign_keys=[("subject_id", "subjects", "id")],
        not_null={"subject_id", "user_prompt", "model", "description_hash", "draft_prompt", "created"},
    )


def description_hash(phrase: str | None, description: str | None) -> str:
    """The key of the subject's look in the draft prompt cache: a hash of its phrase and description (a new
    caption or phrase makes the cached draft prompts stale)."""
    text = f"{phrase or ''}\n{description or ''}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def now() -> str:
    """The current UTC time as an ISO 8601 string."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def validate_name(name: str) -> str:
    """Return `name` if it is a valid subject name, else raise BadInputError."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise BadInputError(
            f"invalid subject name {name!r}: use 1-64 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit (e.g. 'my-cat')"
        )
    return name


@dataclass
class Subject:
    """A named subject and its photos."""

    id: int
    name: str
    phrase: str | None
    class_word: str | None
    description: str | None
    created: str
    images: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the subject."""
        return {
            "id": self.id,
            "name": self.name,
            "phrase": self.phrase,
            "class_word": self.class_word,
            "description": self.description,
            "created": self.created,
            "images": self.images,
        }


RUN_STATUSES = ("running", "done", "failed", "interrupted")


@dataclass
class Run:
    """One training run of a subject (its row, with JSON columns decoded and the weights path absolute)."""

    id: int
    subject_id: int
    status: str  # running | done | failed | interrupted
    params: dict[str, Any]
    base_model: str | None
    losses: list[float]
    step: int
    started: str
    finished: str | None = None
    duration_s: float | None = None
    weights_file: Path | None = None
    error: str | None = None

    @property
    def final_loss(self) -> float | None:
        """The last recorded training loss, if any."""
        return self.losses[-1] if self.losses else None

    @property
    def kind(self) -> str:
        """What the run trains: ``lora`` (LoRA adapters) or ``full`` (the decoder itself, the paper)."""
        return "lora" if self.params.get("lora_rank") else "full"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the run."""
        data = dataclasses.asdict(self)
        data["weights_file"] = str(self.weights_file) if self.weights_file else None
        data["kind"] = self.kind
        return data


@dataclass
class Generation:
    """One generated image (its row, with JSON columns decoded and file paths absolute)."""

    id: int
    subject_id: int
    run_id: int | None
    prompt: str | None
    draft_prompt: str | None
    seed: int | None
    tau: float | None
    params: dict[str, Any]
    image_file: Path | None
    draft_file: Path | None
    scores: dict[str, Any] | None
    created: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the generation."""
        data = dataclasses.asdict(self)
        for key in ("image_file", "draft_file"):
            data[key] = str(data[key]) if data[key] else None
        return data


@dataclass
class AddResult:
    """What `add_images` did."""

    subject: Subject
    created_subject: bool
    added: list[dict[str, Any]]
    duplicates: list[PreparedImage]
    # known photos whose file had gone missing and was written again
    restored: list[dict[str, Any]] = field(default_factory=list)


class SubjectChangedError(StencilError):
    """The subject a running command started with was removed (or removed and added again) meanwhile."""


class Store:
    """A handle on the store: its root folder and its database.

    `read_only=None` (the default) opens the store for writing when its folder and database are writable and
    read-only otherwise; `read_only=True` never writes (no migration, no journal-mode change): reads work and
    every change raises `StoreReadOnlyError`. Every SQLite error a method meets becomes one StencilError:
    `CorruptStoreError`, `StoreReadOnlyError`, `DiskFullError` or "locked by another process".
    """

    def __init__(self, root: Path | None = None, *, read_only: bool | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.db_path = self.root / DB_NAME
        if read_only is None:
            read_only = self.db_path.exists() and not _writable(self.root, self.db_path)
        self.read_only = bool(read_only)
        if self.read_only:
            self._open_read_only()
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StencilError(
                f"cannot create the store folder {self.root}: {error.strerror}",
                hint="set STENCIL_HOME to a writable folder",
            ) from error
        try:
            self.db = sqlite_utils.Database(self.db_path)
            self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self.db.execute("select count(*) from sqlite_master").fetchone()  # a damaged file fails here
            self._enable_wal()
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("PRAGMA synchronous = NORMAL")
            if migrations.pending(self.db):  # no write lock at all when the schema is current
                with self.write():
                    if migrations.pending(self.db):
                        migrations.apply(self.db)
        except sqlite3.Error as error:
            raise self.db_error(error) from error

    def _open_read_only(self) -> None:
        if not self.db_path.is_file():
            raise StoreReadOnlyError(
                f"the store {self.root} is read-only and has no database yet",
                hint="set STENCIL_HOME to a writable folder",
            )
        uri = "file:" + quote(str(self.db_path.resolve()))
        try:
            try:
                conn = sqlite3.connect(f"{uri}?mode=ro", uri=True)
                conn.execute("select count(*) from sqlite_master").fetchone()
            except sqlite3.OperationalError as error:
                if "locked" in str(error):
                    raise
                # a WAL database in a folder nobody may write: no -shm can be made; read the file as it is
                conn = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True)
                conn.execute("select count(*) from sqlite_master").fetchone()
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self.db = sqlite_utils.Database(conn)
            if migrations.pending(self.db):
                raise StoreReadOnlyError(
                    f"the store {self.root} is read-only and its database needs an upgrade this version "
                    "cannot make without writing",
                    hint="make the store writable once, or use the stencil version that wrote it",
                )
        except sqlite3.Error as error:
            raise self.db_error(error) from error

    def _enable_wal(self) -> None:
        # Switching a new database to WAL needs an exclusive lock, and SQLite may answer "database is locked"
        # at once (without the busy handler) when another process is switching it at the same moment.
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self.db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def db_error(self, error: sqlite3.Error) -> StencilError:
        """The StencilError that explains SQLite's `error` (damaged file, read-only, disk full, locked)."""
        text = str(error).lower()
        code = getattr(error, "sqlite_errorname", "") or ""
        damaged = "not a database" in text or "malformed" in text
        if damaged or code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            return CorruptStoreError(
                f"the store database {self.db_path} is damaged ({error})",
                hint=f"move it aside (mv {self.db_path} {self.db_path}.broken), then run "
                "`stencil store repair` to index the photos again from the subject folders "
                "(docs/store.md)",
            )
        if code.startswith("SQLITE_READONLY") or "readonly" in text or "read-only" in text:
            return self._read_only_error()
        if code == "SQLITE_FULL" or "disk is full" in text:
            return DiskFullError(self.db_path)
        if code.startswith("SQLITE_IOERR") and _out_of_space(self.root):
            return DiskFullError(self.db_path)
        if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
            return StencilError(
                f"the store database {self.db_path} is locked by another process",
                hint="try again when the other stencil command has finished",
            )
        if code.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
            return StencilError(
                f"cannot open the store database {self.db_path}",
                hint="check that the folder exists and is readable, or set STENCIL_HOME",
            )
        return StencilError(f"the store database {self.db_path} failed: {error}")

    def _read_only_error(self) -> StoreReadOnlyError:
        return StoreReadOnlyError(
            f"the store {self.root} is read-only: cannot change it",
            hint="commands that only read (ls, show, doctor) work; make the folder writable to change it",
        )

    def _require_writable(self) -> None:
        if self.read_only:
            raise self._read_only_error()

    # -- transactions -------------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[sqlite_utils.Database]:
        """A write transaction that takes the write lock up front (no upgrade deadlocks)."""
        self._require_writable()
        conn = self.db.conn
        if conn.in_transaction:
            with self.db.atomic():
                yield self.db
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            raise self.db_error(error) from error
        try:
            yield self.db
        except BaseException as error:
            if conn.in_transaction:
                with suppress(sqlite3.Error):  # SQLite may have rolled back itself (e.g. on a full disk)
                    conn.execute("ROLLBACK")
            if isinstance(error, sqlite3.Error):
                raise self.db_error(error) from error
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as error:
                if conn.in_transaction:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise self.db_error(error) from error

    def close(self) -> None:
        """Close the database connection."""
        self.db.close()

    def integrity_problems(self) -> list[str]:
        """What SQLite's integrity check finds wrong with the database ([] when it is sound)."""
        try:
            rows = [row[0] for row in self.db.execute("PRAGMA integrity_check").fetchall()]
        except sqlite3.DatabaseError as error:
            return [str(error)]
        return [] if rows == ["ok"] else rows

    # -- paths --------------------------------------------------------------------------------

    def subject_dir(self, name: str) -> Path:
        """The folder holding a subject's files; a symbolic link there (or at `subjects/`) is refused."""
        folder = self.root / "subjects" / validate_name(name)
        for path in (folder.parent, folder):
            if path.is_symlink():
                raise StencilError(
                    f"{path} is a symbolic link: stencil keeps a subject's files only in real folders "
                    "inside the store, and will not follow it",
                    hint=f"replace the link by the folder it points to (e.g. rm the link, then mv the folder "
                    f"to {path})",
                )
        return folder

    def absolute(self, relative: str) -> Path:
        """Turn a path stored in the database (relative to the root) into an absolute one."""
        return self.root / relative

    def relative(self, path: Path) -> str:
        """Store-relative form of `path`, as kept in the database."""
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    # -- subjects -----------------------------------------------------------------------------

    def subject_names(self) -> list[str]:
        """All subject names, sorted."""
        return [row["name"] for row in self.db.query("select name from subjects order by name")]

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

    def get_subject(self, name: str) -> Subject:
        """The subject called `name`, or a NotFoundError suggesting the closest names."""
        validate_name(name)
        subject = self.find_subject(name)
        if subject is None:
            raise NotFoundError(unknown_subject_message(name, self.subject_names()))
        return subject

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

    def subject_id_of(self, name: str) -> int:
        """The id of the subject called `name` (NotFoundError if none): pin it for a long-running command."""
        return self.get_subject(name).id

    def check_subject(self, name: str, subject_id: int) -> None:
        """Raise SubjectChangedError unless the subject called `name` still has id `subject_id`."""
        row = next(iter(self.db.query("select id from subjects where name = ?", [name])), None)
        if row is None or row["id"] != subject_id:
            what = "removed" if row is None else "removed and added again"
            raise SubjectChangedError(
                f"subject {name!r} was {what} while this command ran; nothing more was stored for it",
                hint="run the command again if you still want its result",
            )

    def unindexed_folders(self) -> list[str]:
        """Names of folders under subjects/ that have no subject row (e.g. after the database was lost).

        `clean` never deletes them unless named; `repair` indexes their photos again.
        """
        subjects_root = self.root / "subjects"
        if not subjects_root.is_dir() or subjects_root.is_symlink():
            return []
        known = set(self.subject_names())
        return sorted(
            entry.name
            for entry in subjects_root.iterdir()
            if entry.name not in known and (entry.is_dir() or entry.is_symlink())
        )

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

    def update_subject(self, name: str, **values: Any) -> None:
        """Set fields (phrase, class_word, description) on a subject."""
        allowed = {"phrase", "class_word", "description"}
        unknown = set(values) - allowed
        if unknown:
            raise ValueError(f"cannot update subject fields {sorted(unknown)}")
        subject = self.get_subject(name)
        with self.write():
            self.db["subjects"].update(subject.id, values)

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
        images_dir = self.subject_dir(name) / "images"
        unique: dict[str, PreparedImage] = {}
        for image in prepared:
            unique.setdefault(image.sha256, image)
        self._require_writable()
        existing = self.find_subject(name)
        known = {image["sha256"]: image for image in existing.images} if existing else {}
        to_add = [image for sha, image in unique.items() if sha not in known]
        duplicates = [image for image in prepared if image not in to_add]
        restored: list[dict[str, Any]] = []
        for sha, image in unique.items():  # a stored photo whose file was deleted by hand: put it back
            row = known.get(sha)
            if row is not None and not os.path.isfile(row["file"]):
                target = Path(row["file"])
                if is_within(target, self.root):
                    atomic_write_bytes(target, _encoded_as(image, target.suffix))
                    restored.append(row)
        for image in to_add:
            target = images_dir / f"{image.sha256}{image.suffix}"
            if not target.exists():
                atomic_write_bytes(target, image.data)
                crash_point("add:file-written")
        crash_point("add:files-written")
        added_rows: list[dict[str, Any]] = []
        with self.write():
            row = next(iter(self.db.query("select * from subjects where name = ?", [name])), None)
            created_subject = row is None
            if row is None:
                subject_id = (
                    self.db["subjects"]
                    .insert(
                        {
                            "id": self._next_subject_id(),
                            "name": name,
                            "phrase": phrase,
                            "class_word": class_word,
                            "description": None,
                            "created": now(),
                        }
                    )
                    .last_pk
                )
            else:
                subject_id = row["id"]
                updates = {k: v for k, v in (("phrase", phrase), ("class_word", class_word)) if v}
                if updates:
                    self.db["subjects"].update(subject_id, updates)
            for image in to_add:
                record = {
                    "subject_id": subject_id,
                    "sha256": image.sha256,
                    "file": f"subjects/{name}/images/{image.sha256}{image.suffix}",
                    "original_name": image.source.name,
                    "width": image.width,
                    "height": image.height,
                    "caption": None,
                    "caption_source": None,
                    "added": now(),
                }
                # another process may have added the same photo meanwhile: keep theirs
                self.db["images"].insert(record, ignore=True)
                if self.db.execute("select changes()").fetchone()[0]:
                    added_rows.append(record)
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
            if str(image["id"]) == ref or (len(ref) >= 4 and image["sha256"].startswith(ref))
        ]
        if len(matches) != 1:
            ids = ", ".join(str(image["id"]) for image in subject.images) or "none"
            what = "is ambiguous" if matches else "not found"
            raise NotFoundError(f"image {image_ref!r} {what} in subject {subject.name!r} (image ids: {ids})")
        return matches[0]

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

    def clean(self, min_age_s: float = 300.0, *, remove_unindexed: Iterable[str] = ()) -> list[Path]:
        """Remove what crashed commands left behind (files no row refers to); return what was removed.

        That is: photos no image row refers to, run folders with no run row, and generated images / drafts
        (PNG) no generation row points to (contact sheets are kept: `grid.png`, `contact-sheet.png`), all
        inside folders of subjects that have a row. A subject folder WITHOUT a row is never removed unless
        its name is in `remove_unindexed` (the user named it): a lost or emptied database must not cost the
        photos, weights and images (see `unindexed_folders` and `repair`). Anything modified in the last
        `min_age_s` seconds is left alone: it may belong to a command still running in another process.
        Symbolic links are removed as links, never followed.
        """
        self._require_writable()
        cutoff = time.time() - min_age_s
        named = set(remove_unindexed)
        unindexed = set(self.unindexed_folders())
        for folder_name in sorted(named):
            if folder_name not in unindexed:
                if self.find_subject(folder_name) is not None:
                    raise BadInputError(
                        f"subject {folder_name!r} has a database row: "
                        f"remove it with `stencil rm {folder_name}`"
                    )
                raise NotFoundError(f"there is no subject folder {folder_name!r} without a row to remove")
        referenced = {row["file"] for row in self.db.query("select file from images")}
        run_ids = {str(row["id"]) for row in self.db.query("select id from runs")}
        generated = {
            row[key]
            for row in self.db.query("select image_file, draft_file from generations")
            for key in ("image_file", "draft_file")
            if row[key]
        }
        removed: list[Path] = []
        subjects_root = self.root / "subjects"
        if not subjects_root.is_dir() or subjects_root.is_symlink():
            return removed

        def stale(path: Path) -> bool:
            times = [path.lstat().st_mtime]
            if path.is_dir() and not path.is_symlink():
                times += [child.lstat().st_mtime for child in path.rglob("*")]
            return max(times) < cutoff

        def remove(path: Path) -> None:
            if path.is_symlink() or not path.is_dir():
                path.unlink(missing_ok=True)  # a link (dangling or not) goes, never what it points to
            else:
                self._delete_tree(path)
            removed.append(path)

        def store_relative(path: Path) -> str:
            return path.relative_to(self.root).as_posix()  # lexical: never resolves a (dangling) link

        for folder in sorted(subjects_root.iterdir()):
            if folder.name in unindexed:
                if folder.name in named and stale(folder):
                    remove(folder)
                continue
            if folder.is_symlink() or not folder.is_dir():
                continue
            candidates: list[Path] = []
            images_dir = folder / "images"
            if images_dir.is_dir() and not images_dir.is_symlink():
                candidates += [f for f in images_dir.iterdir() if store_relative(f) not in referenced]
            runs_dir = folder / "runs"
            if runs_dir.is_dir() and not runs_dir.is_symlink():
                candidates += [
                    d for d in runs_dir.iterdir() if (d.is_dir() or d.is_symlink()) and d.name not in run_ids
                ]
            generations_dir = folder / "generations"
            if generations_dir.is_dir() and not generations_dir.is_symlink():
                candidates += [
                    f
                    for f in generations_dir.rglob("*.png")
                    if (f.is_file() or f.is_symlink())
                    and f.name not in SHEET_NAMES
                    and store_relative(f) not in generated
                ]
            for path in candidates:
                if stale(path):
                    remove(path)
        return removed

    def repair(self) -> dict[str, Any]:
        """Index again the photos found in subject folders that no row refers to (after a lost database).

        Creates a subject row for each folder without one (folder names that are not valid subject names are
        skipped), and an image row (no caption) for each `<sha256>.jpg|png` photo Pillow can read. Training
        runs and generations are not re-indexed: for a subject it creates, their folders move to
        `subjects/<name>/recovered/` (which `clean` never touches), so nothing is lost; train and generate
        again as needed. Folders without photos are left as they are. Returns
        `{"subjects": [names created], "images": count indexed, "skipped": [(path, reason)]}`.
        """
        from PIL import Image

        self._require_writable()
        report: dict[str, Any] = {"subjects": [], "images": 0, "skipped": []}
        subjects_root = self.root / "subjects"
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
            found: list[dict[str, Any]] = []
            images_dir = folder / "images"
            usable = images_dir.is_dir() and not images_dir.is_symlink()
            files = sorted(images_dir.iterdir()) if usable else []
            for photo in files:
                relative = f"subjects/{folder.name}/images/{photo.name}"
                if relative in referenced:
                    continue
                if photo.is_symlink() or not PHOTO_FILE.fullmatch(photo.name):
                    report["skipped"].append((str(photo), "not a photo stored by stencil"))
                    continue
                try:
                    with Image.open(photo) as opened:
                        opened.load()
                        width, height = opened.size
                except Exception as error:  # noqa: BLE001 - any unreadable file is skipped and named
                    report["skipped"].append((str(photo), f"unreadable ({type(error).__name__})"))
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
            if not found:
                if self.find_subject(folder.name) is None:
                    report["skipped"].append((str(folder), "no photos to index"))
                continue
            with self.write():
                row = next(iter(self.db.query("select id from subjects where name = ?", [folder.name])), None)
                if row is None:
                    subject_id = (
                        self.db["subjects"]
                        .insert(
                            {
                                "id": self._next_subject_id(),
                                "name": folder.name,
                                "phrase": None,
                                "class_word": None,
                                "created": now(),
                            }
                        )
                        .last_pk
                    )
                    report["subjects"].append(folder.name)
                    self._set_aside_unindexed_outputs(folder)
                else:
                    subject_id = row["id"]
                for record in found:
                    self.db["images"].insert({**record, "subject_id": subject_id}, ignore=True)
                    report["images"] += self.db.execute("select changes()").fetchone()[0]
        return report

    def _next_subject_id(self) -> int:
        """A subject id never used before in this store (call inside a write transaction)."""
        used = self.db.execute("select value from counters where name = 'subject_id'").fetchone()
        highest = self.db.execute("select coalesce(max(id), 0) from subjects").fetchone()[0]
        next_id = max(used[0] if used else 0, highest) + 1
        self.db["counters"].upsert({"name": "subject_id", "value": next_id}, pk="name")
        return next_id

    def _set_aside_unindexed_outputs(self, folder: Path) -> None:
        for part in ("runs", "generations"):
            source = folder / part
            if source.exists() or source.is_symlink():
                target = folder / "recovered" / part
                target.parent.mkdir(exist_ok=True)
                if target.exists():
                    target = folder / "recovered" / f"{part}-{int(time.time())}"
                os.replace(source, target)

    # -- runs (training) ----------------------------------------------------------------------

    def run_dir(self, name: str, run_id: int) -> Path:
        """The folder holding a training run's files (weights, masks, checkpoints)."""
        return self.subject_dir(name) / "runs" / str(run_id)

    def create_run(
        self, name: str, params: dict[str, Any], base_model: str, *, subject_id: int | None = None
    ) -> Run:
        """Insert a `running` run row for subject `name` and return it.

        With `subject_id` (pinned when the command started), a subject removed or re-created meanwhile
        raises SubjectChangedError instead of giving the run to a new subject of the same name.
        """
        subject = self.get_subject(name)
        with self.write():
            if subject_id is not None:
                self.check_subject(name, subject_id)
            run_id = (
                self.db["runs"]
                .insert(
                    {
                        "subject_id": subject.id,
                        "status": "running",
                        "params": dumps(params),
                        "base_model": base_model,
                        "losses": "[]",
                        "step": 0,
                        "started": now(),
                    }
                )
                .last_pk
            )
        return self.get_run(name, run_id)

    def update_run(self, run_id: int, **values: Any) -> None:
        """Update a run row; `losses`/`params` may be given as Python objects."""
        for key in ("losses", "params"):
            if key in values and not isinstance(values[key], str):
                values[key] = dumps(values[key])
        with self.write():
            if not self.db.execute("select count(*) from runs where id = ?", [run_id]).fetchone()[0]:
                raise SubjectChangedError(
                    f"training run {run_id} no longer exists (its subject was removed while it ran)"
                )
            self.db["runs"].update(run_id, values)

    def finish_run(
        self,
        run_id: int,
        status: str,
        *,
        weights_file: Path | None = None,
        duration_s: float | None = None,
        error: str | None = None,
        losses: list[float] | None = None,
        step: int | None = None,
    ) -> None:
        """Mark a run done / failed / interrupted, with what it produced."""
        if status not in RUN_STATUSES[1:]:
            raise ValueError(f"bad run status {status!r}")
        values: dict[str, Any] = {"status": status, "finished": now()}
        if weights_file is not None:
            values["weights_file"] = self.relative(weights_file)
        if duration_s is not None:
            values["duration_s"] = duration_s
        if error is not None:
            values["error"] = error
        if losses is not None:
            values["losses"] = losses
        if step is not None:
            values["step"] = step
        self.update_run(run_id, **values)

    def get_run(self, name: str, run_id: int) -> Run:
        """One run of subject `name` (params and losses decoded), or NotFoundError."""
        subject = self.get_subject(name)
        row = next(
            iter(self.db.query("select * from runs where id = ? and subject_id = ?", [run_id, subject.id])),
            None,
        )
        if row is None:
            raise NotFoundError(f"subject {name!r} has no run {run_id} (its runs: `stencil runs {name}`)")
        return self._run_view(row)

    def list_runs(self, name: str) -> list[Run]:
        """All runs of subject `name`, oldest first."""
        subject = self.get_subject(name)
        return [
            self._run_view(row)
            for row in self.db.query("select * from runs where subject_id = ? order by id", [subject.id])
        ]

    def latest_done_run(self, name: str) -> Run | None:
        """The newest finished (`done`) run of subject `name`, or None."""
        done = [run for run in self.list_runs(name) if run.status == "done"]
        return done[-1] if done else None

    def remove_run(self, name: str, run_id: int) -> Run:
        """Delete one run: its row, its generations' rows, then its folder and those images and drafts."""
        run = self.get_run(name, run_id)
        files = [
            path
            for generation in self.list_generations(name)
            if generation.run_id == run.id
            for path in (generation.image_file, generation.draft_file)
            if path is not None
        ]
        with self.write():
            self.db.execute("delete from generations where run_id = ?", [run.id])
            self.db.execute("delete from runs where id = ?", [run.id])
        self._delete_tree(self.run_dir(name, run.id))
        for path in files:
            if is_within(path, self.root):
                path.unlink(missing_ok=True)
        return run

    def _run_view(self, row: dict[str, Any]) -> Run:
        values = dict(row)
        values["params"] = json.loads(row["params"] or "{}")
        values["losses"] = [float(x) for x in json.loads(row["losses"] or "[]")]
        values["step"] = int(row["step"] or 0)
        values["weights_file"] = self.absolute(row["weights_file"]) if row["weights_file"] else None
        return Run(**values)

    # -- generations --------------------------------------------------------------------------

    def generation_dir(self, name: str) -> Path:
        """The folder holding a subject's generated images and drafts."""
        return self.subject_dir(name) / "generations"

    def add_generation(self, subject: Subject, record: dict[str, Any]) -> Generation:
        """Insert one generated image's row for `subject` and return it (paths absolute or store-relative).

        The row goes to that subject (by its id, pinned when the command started) or nowhere: a subject
        removed, or removed and added again under the same name, raises SubjectChangedError; so does a
        `run_id` that no longer belongs to it.
        """
        row = dict(record)
        for key in ("image_file", "draft_file"):
            if row.get(key) and Path(row[key]).is_absolute():
                row[key] = self.relative(Path(row[key]))
        for key in ("params", "scores"):
            if key in row and row[key] is not None and not isinstance(row[key], str):
                row[key] = dumps(row[key])
        row.setdefault("created", now())
        with self.write():
            self.check_subject(subject.name, subject.id)
            run_id = row.get("run_id")
            if (
                run_id is not None
                and not self.db.execute(
                    "select count(*) from runs where id = ? and subject_id = ?", [run_id, subject.id]
                ).fetchone()[0]
            ):
                raise SubjectChangedError(
                    f"training run {run_id} of subject {subject.name!r} was removed while this command ran; "
                    "nothing more was stored for it"
                )
            row["subject_id"] = subject.id
            generation_id = self.db["generations"].insert(row).last_pk
        return self.get_generation(generation_id)

    def get_generation(self, generation_id: int) -> Generation:
        """One generation row (params and scores decoded), or NotFoundError."""
        row = next(iter(self.db.query("select * from generations where id = ?", [generation_id])), None)
        if row is None:
            raise NotFoundError(f"no generation {generation_id}")
        return self._generation_view(row)

    def list_generations(self, name: str) -> list[Generation]:
        """All generations of subject `name`, oldest first."""
        subject = self.get_subject(name)
        return [
            self._generation_view(row)
            for row in self.db.query(
                "select * from generations where subject_id = ? order by id", [subject.id]
            )
        ]

    def set_generation_scores(self, generation_id: int, scores: dict[str, Any]) -> None:
        """Store evaluation scores for one generation."""
        with self.write():
            self.db["generations"].update(generation_id, {"scores": dumps(scores)})

    def _generation_view(self, row: dict[str, Any]) -> Generation:
        values = dict(row)
        values["params"] = json.loads(row["params"] or "{}")
        values["scores"] = json.loads(row["scores"]) if row["scores"] else None
        for key in ("image_file", "draft_file"):
            values[key] = self.absolute(row[key]) if row[key] else None
        return Generation(**values)

    # -- draft prompts written by a vision model ---------------------------------------------

    def cached_draft_prompt(
        self, subject: Subject, user_prompt: str, model: str, description_hash: str
    ) -> str | None:
        """The draft prompt `model` wrote for `subject` and `user_prompt` (from the phrase and description
        that `description_hash` stands for), or None when none is stored."""
        row = next(
            iter(
                self.db.query(
                    "select draft_prompt from draft_prompts where subject_id = ? and user_prompt = ? "
                    "and model = ? and description_hash = ?",
                    [subject.id, user_prompt, model, description_hash],
                )
            ),
            None,
        )
        return row["draft_prompt"] if row else None

    def cache_draft_prompt(
        self, subject: Subject, user_prompt: str, model: str, description_hash: str, draft_prompt: str
    ) -> None:
        """Keep the draft prompt `model` wrote (replacing an older one for the same key)."""
        with self.write():
            self.check_subject(subject.name, subject.id)
            self.db["draft_prompts"].upsert(
                {
                    "subject_id": subject.id,
                    "user_prompt": user_prompt,
                    "model": model,
                    "description_hash": description_hash,
                    "draft_prompt": draft_prompt,
                    "created": now(),
                },
                pk=("subject_id", "user_prompt", "model", "description_hash"),
            )

    # -- config -------------------------------------------------------------------------------

    def get_config(self, key: str) -> str | None:
        """A stored config value, or None."""
        row = next(iter(self.db.query("select value from config where key = ?", [key])), None)
        return row["value"] if row else None

    def set_config(self, key: str, value: str | None) -> None:
        """Store a config value (None deletes it)."""
        with self.write():
            if value is None:
                self.db.execute("delete from config where key = ?", [key])
            else:
                self.db["config"].upsert({"key": key, "value": value}, pk="key")

    def all_config(self) -> dict[str, str]:
        """Every stored config value."""
        return {row["key"]: row["value"] for row in self.db.query("select * from config order by key")}

    # -- helpers ------------------------------------------------------------------------------

    def _image_view(self, row: dict[str, Any]) -> dict[str, Any]:
        view = dict(row)
        view.pop("subject_id", None)
        view["file"] = str(self.absolute(row["file"]))
        return view

    def _delete_tree(self, folder: Path) -> None:
        if not folder.exists():
            return
        if not is_within(folder, self.root) or folder.resolve() == self.root.resolve():
            raise StencilError(f"refusing to delete {folder}: it is not inside the store {self.root}")
        shutil.rmtree(folder)


def _writable(root: Path, db_path: Path) -> bool:
    """Whether this process may write the database file and make its journal files beside it."""
    return os.access(db_path, os.W_OK) and os.access(root, os.W_OK | os.X_OK)


def _out_of_space(root: Path) -> bool:
    """Whether a failed write at `root` is best explained by a full disk or a file-size limit."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY:
            return True
    except (ImportError, OSError, ValueError):
        pass
    try:
        return shutil.disk_usage(root).free < 1024 * 1024
    except OSError:
        return False


def _encoded_as(image: PreparedImage, suffix: str) -> bytes:
    """The photo's bytes in the format `suffix` names (a restored file keeps its stored name)."""
    if suffix == image.suffix:
        return image.data
    import io

    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(io.BytesIO(image.data)) as opened:
        if suffix == ".jpg":
            opened.convert("RGB").save(buffer, format="JPEG", quality=95, subsampling=0)
        else:
            opened.save(buffer, format="PNG")
    return buffer.getvalue()


def _translate_db_errors(cls: type) -> type:
    """Make every public method of `cls` turn a raw sqlite3.Error into the StencilError explaining it."""

    def wrap(method: Any) -> Any:
        @functools.wraps(method)
        def wrapper(self: Store, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except sqlite3.Error as error:
                raise self.db_error(error) from error
            except OSError as error:
                if is_disk_full(error):
                    raise DiskFullError(getattr(error, "filename", None) or self.root) from error
                raise

        return wrapper

    for attribute, value in list(vars(cls).items()):
        if attribute.startswith("_") or attribute in {"write", "db_error"} or not inspect.isfunction(value):
            continue
        setattr(cls, attribute, wrap(value))
    return cls


_translate_db_errors(Store)


def unknown_subject_message(name: str, names: list[str]) -> str:
    """'no subject called X' plus the closest existing names, if any."""
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    message = f"no subject called {name!r}"
    if close:
        return message + f"; did you mean {', '.join(repr(n) for n in close)}?"
    if names:
        return message + " (see `stencil ls`)"
    return message + " (add one with `stencil add NAME PHOTOS...`)"


def dumps(value: Any) -> str:
    """JSON for a TEXT column."""
    return json.dumps(value, default=str)


def open_store(root: Path | None = None, *, read_only: bool | None = None) -> Store:
    """Open (and migrate) the store at `root` or the default location (see `Store` for `read_only`)."""
    return Store(root, read_only=read_only)
