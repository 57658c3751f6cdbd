"""The store's schema as a list of small named migrations, and the runner that applies them on open.

Each schema change is a new function appended to `MIGRATIONS`; a function already released is never edited
(stores in the wild have run it). sqlite-utils' `Migrations` runs them: it records each applied name in the
`_sqlite_migrations` table (migration set ``stencil``) and applies each pending one in a transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from stencil_cli.store.sqlite import Database, Migrations


def m001_initial(db: Database) -> None:
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


def m002_subject_id_counter(db: Database) -> None:
    """A counter so that a subject id is never used twice (SQLite reuses the highest id after a delete).

    A command pins the id of the subject it works on; a subject removed and added again under the same name
    must get a new id, or the pinned command would write into the new subject.
    """
    db["counters"].create({"name": str, "value": int}, pk="name")
    highest = db.execute("select coalesce(max(id), 0) from subjects").fetchone()[0]
    db["counters"].insert({"name": "subject_id", "value": highest})


def m003_one_name_per_file_column(db: Database) -> None:
    """One name per stored file: images.file, runs.weights_file, generations.image_file / draft_file."""
    db["images"].transform(rename={"path": "file"})
    db["runs"].transform(rename={"weights_path": "weights_file"})
    db["generations"].transform(rename={"image_path": "image_file", "draft_path": "draft_file"})


def m004_draft_prompt_cache(db: Database) -> None:
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


def m005_run_id_counter(db: Database) -> None:
    """A counter so that a run id is never used twice (`rm --run` of the newest run freed its id).

    An export's metadata and a generation's row name the run by id: a reused id would point at another run.
    """
    highest = db.execute("select coalesce(max(id), 0) from runs").fetchone()[0]
    db["counters"].insert({"name": "run_id", "value": highest}, replace=True)


def m006_run_error_fields(db: Database) -> None:
    """`runs.error_fields`: the settings a failed run's error mentions (JSON list), so that each front end
    shows them its own way (the CLI as flags); `error` then holds the text with their placeholders."""
    db["runs"].add_column("error_fields", str)


# In the order they apply. Append new ones; never edit, rename or reorder one above.
MIGRATIONS: list[Callable[[Database], None]] = [
    m001_initial,
    m002_subject_id_counter,
    m003_one_name_per_file_column,
    m004_draft_prompt_cache,
    m005_run_id_counter,
    m006_run_error_fields,
]


def _runner() -> Migrations:
    """sqlite-utils' migration set ``stencil`` holding `MIGRATIONS`, each under its function's name."""
    runner = Migrations("stencil")
    for migration in MIGRATIONS:
        runner()(migration)
    return runner


RUNNER = _runner()


def pending(db: Database) -> list[Any]:
    """The migrations `db` has not had yet, in order (each with its `name`); reads only."""
    return RUNNER.pending(db)


def applied(db: Database) -> list[Any]:
    """The migrations `db` has had, in the order they were applied (each with its `name`); reads only."""
    return RUNNER.applied(db)


def apply(db: Database, *, stop_before: str | Iterable[str] | None = None) -> None:
    """Apply the pending migrations to `db` in order, each in its own transaction (up to `stop_before`)."""
    RUNNER.apply(db, stop_before=stop_before)
