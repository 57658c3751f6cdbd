"""Generated images: the `generations` table, one row per image beside its file in `generations/<batch>/`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stencil_cli.base.errors import NotFoundError
from stencil_cli.store import layout
from stencil_cli.store.connection import translate_errors
from stencil_cli.store.records import Generation, Subject, decode_json_column, dumps, now
from stencil_cli.store.subjects import SubjectChangedError, SubjectQueries


class GenerationQueries(SubjectQueries):
    """A subject's generated images: add one row per image written, read them, store their scores."""

    def generation_dir(self, name: str) -> Path:
        """The folder holding a subject's generated images and drafts."""
        return self.subject_dir(name) / layout.GENERATIONS_DIR

    @translate_errors
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

    @translate_errors
    def get_generation(self, generation_id: int) -> Generation:
        """One generation row (params and scores decoded), or NotFoundError."""
        row = next(iter(self.db.query("select * from generations where id = ?", [generation_id])), None)
        if row is None:
            raise NotFoundError(f"no generation {generation_id}")
        return self._generation_view(row)

    @translate_errors
    def list_generations(self, name: str) -> list[Generation]:
        """All generations of subject `name`, oldest first."""
        subject = self.get_subject(name)
        return [
            self._generation_view(row)
            for row in self.db.query(
                "select * from generations where subject_id = ? order by id", [subject.id]
            )
        ]

    @translate_errors
    def set_generation_scores(self, generation_id: int, scores: dict[str, Any]) -> None:
        """Store evaluation scores for one generation."""
        with self.write():
            self.db["generations"].update(generation_id, {"scores": dumps(scores)})

    def _generation_view(self, row: dict[str, Any]) -> Generation:
        values = dict(row)
        values["params"], params_ok = decode_json_column(row["params"], {}, dict)
        values["scores"], scores_ok = decode_json_column(row["scores"], None, dict)
        checks = (("params", params_ok), ("scores", scores_ok))
        values["damaged"] = tuple(name for name, ok in checks if not ok)
        for key in ("image_file", "draft_file"):
            values[key] = self.absolute(row[key]) if row[key] else None
        return Generation(**values)
