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
import importlib
import json
import re
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stencil_cli.errors import BadInputError, NotFoundError, StencilError
from stencil_cli.fsutil import atomic_write_bytes, crash_point, is_within
from stencil_cli.paths import default_root

if TYPE_CHECKING:
    from stencil_cli.images import PreparedImage


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
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")  # no leading '-': it would read as an option

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
def m002_one_name_per_file_column(db: sqlite_utils.Database) -> None:
    """One name per stored file: images.file, runs.weights_file, generations.image_file / draft_file."""
    db["images"].transform(rename={"path": "file"})
    db["runs"].transform(rename={"weights_path": "weights_file"})
    db["generations"].transform(rename={"image_path": "image_file", "draft_path": "draft_file"})


def now() -> str:
    """The current UTC time as an ISO 8601 string."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def validate_name(name: str) -> str:
    """Return `name` if it is a valid subject name, else raise BadInputError."""
    if not NAME_PATTERN.match(name or ""):
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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the run."""
        data = dataclasses.asdict(self)
        data["weights_file"] = str(self.weights_file) if self.weights_file else None
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


class Store:
    """A handle on the store: its root folder and its database."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StencilError(
                f"cannot create the store folder {self.root}: {error.strerror}",
                hint="set STENCIL_HOME to a writable folder",
            ) from error
        self.db_path = self.root / DB_NAME
        self.db = sqlite_utils.Database(self.db_path)
        self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._enable_wal()
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.execute("PRAGMA synchronous = NORMAL")
        with self.write():
            migrations.apply(self.db)

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
                    raise StencilError(
                        f"the store database {self.db_path} is locked by another process",
                        hint="try again when the other stencil command has finished",
                    ) from error
                time.sleep(0.05)

    # -- transactions -------------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[sqlite_utils.Database]:
        """A write transaction that takes the write lock up front (no upgrade deadlocks)."""
        conn = self.db.conn
        if conn.in_transaction:
            with self.db.atomic():
                yield self.db
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close the database connection."""
        self.db.close()

    # -- paths --------------------------------------------------------------------------------

    def subject_dir(self, name: str) -> Path:
        """The folder holding a subject's files."""
        return self.root / "subjects" / validate_name(name)

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
        existing = self.find_subject(name)
        known = {image["sha256"] for image in existing.images} if existing else set()
        to_add = [image for sha, image in unique.items() if sha not in known]
        duplicates = [image for image in prepared if image not in to_add]
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
        return AddResult(subject=subject, created_subject=created_subject, added=added, duplicates=duplicates)

    def remove_subject(self, name: str) -> Subject:
        """Delete a subject, its rows and its folder (only ever inside the store root)."""
        subject = self.get_subject(name)
        folder = self.subject_dir(name)
        with self.write():
            for table in ("generations", "runs", "images"):
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

    def clean(self, min_age_s: float = 300.0) -> list[Path]:
        """Remove what crashed commands left behind (files no row refers to); return what was removed.

        That is: folders of subjects that have no row, photos no image row refers to, run folders with no
        run row, and generated images / drafts (PNG) no generation row points to (contact sheets are kept:
        `grid.png`, `contact-sheet.png`). Anything modified in the last `min_age_s` seconds is left alone:
        it may belong to a command that is still running in another process.
        """
        cutoff = time.time() - min_age_s
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
        if not subjects_root.exists():
            return removed

        def stale(path: Path) -> bool:
            newest = max([path.stat().st_mtime, *(p.stat().st_mtime for p in path.rglob("*"))])
            return newest < cutoff

        known = set(self.subject_names())
        for folder in subjects_root.iterdir():
            if not folder.is_dir():
                continue
            if folder.name not in known:
                if stale(folder):
                    self._delete_tree(folder)
                    removed.append(folder)
                continue
            candidates: list[Path] = []
            images_dir = folder / "images"
            if images_dir.is_dir():
                candidates += [f for f in images_dir.iterdir() if self.relative(f) not in referenced]
            runs_dir = folder / "runs"
            if runs_dir.is_dir():
                candidates += [d for d in runs_dir.iterdir() if d.is_dir() and d.name not in run_ids]
            generations_dir = folder / "generations"
            if generations_dir.is_dir():
                candidates += [
                    f
                    for f in generations_dir.rglob("*.png")
                    if f.is_file() and f.name not in SHEET_NAMES and self.relative(f) not in generated
                ]
            for path in candidates:
                if not stale(path):
                    continue
                if path.is_dir():
                    self._delete_tree(path)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    # -- runs (training) ----------------------------------------------------------------------

    def run_dir(self, name: str, run_id: int) -> Path:
        """The folder holding a training run's files (weights, masks, checkpoints)."""
        return self.subject_dir(name) / "runs" / str(run_id)

    def create_run(self, name: str, params: dict[str, Any], base_model: str) -> Run:
        """Insert a `running` run row for subject `name` and return it."""
        subject = self.get_subject(name)
        with self.write():
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
            raise NotFoundError(f"subject {name!r} has no run {run_id} (see `stencil show {name}`)")
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
        """Insert one generated image's row for `subject` (by its id: a subject removed and made again under
        the same name is another subject) and return it. Paths may be absolute or store-relative."""
        row = dict(record)
        for key in ("image_file", "draft_file"):
            if row.get(key) and Path(row[key]).is_absolute():
                row[key] = self.relative(Path(row[key]))
        for key in ("params", "scores"):
            if key in row and row[key] is not None and not isinstance(row[key], str):
                row[key] = dumps(row[key])
        row["subject_id"] = subject.id
        row.setdefault("created", now())
        try:
            with self.write():
                generation_id = self.db["generations"].insert(row).last_pk
        except sqlite3.IntegrityError:
            raise StencilError(
                f"subject {subject.name!r} was removed while its images were made; nothing more is saved"
            ) from None
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


def open_store(root: Path | None = None) -> Store:
    """Open (and migrate) the store at `root` or the default location."""
    return Store(root)
