"""Training runs: the `runs` table and each run's folder (`runs/<run id>/`: weights, masks, checkpoints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stencil_cli.base.errors import NotFoundError, Wording
from stencil_cli.base.fsutil import is_within
from stencil_cli.store import layout
from stencil_cli.store.connection import translate_errors
from stencil_cli.store.records import RUN_STATUSES, Run, decode_json_column, dumps, now
from stencil_cli.store.subjects import SubjectChangedError, SubjectQueries


class RunQueries(SubjectQueries):
    """A subject's training runs: create one `running`, update it as it trains, finish it, list, remove."""

    def run_dir(self, name: str, run_id: int) -> Path:
        """The folder holding a training run's files (weights, masks, checkpoints)."""
        return layout.run_folder(self.subject_dir(name), run_id)

    @translate_errors
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
                        "id": self._next_id("run_id", "runs"),
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

    @translate_errors
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

    @translate_errors
    def finish_run(
        self,
        run_id: int,
        status: str,
        *,
        weights_file: Path | None = None,
        duration_s: float | None = None,
        error: str | None = None,  # a Wording keeps its settings (shown as flags by the CLI)
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
            fields = getattr(error, "fields", ())
            values["error"] = error.template if fields else str(error)
            values["error_fields"] = dumps(list(fields)) if fields else None
        if losses is not None:
            values["losses"] = losses
        if step is not None:
            values["step"] = step
        self.update_run(run_id, **values)

    @translate_errors
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

    @translate_errors
    def list_runs(self, name: str) -> list[Run]:
        """All runs of subject `name`, oldest first."""
        subject = self.get_subject(name)
        return [
            self._run_view(row)
            for row in self.db.query("select * from runs where subject_id = ? order by id", [subject.id])
        ]

    @translate_errors
    def latest_done_run(self, name: str) -> Run | None:
        """The newest finished (`done`) run of subject `name`, or None."""
        done = [run for run in self.list_runs(name) if run.status == "done"]
        return done[-1] if done else None

    @translate_errors
    def remove_run(self, name: str, run_id: int) -> Run:
        """Delete one run: its row, its generations' rows, then its folder and those images and drafts."""
        run = self.get_run(name, run_id)
        made = self.db.query(
            "select image_file, draft_file from generations where subject_id = ? and run_id = ? order by id",
            [run.subject_id, run.id],
        )
        files = [self.absolute(row[key]) for row in made for key in ("image_file", "draft_file") if row[key]]
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
        values["params"], params_ok = decode_json_column(row["params"], {}, dict)
        losses, losses_ok = decode_json_column(row["losses"], [], list)
        try:
            values["losses"] = [float(x) for x in losses]
        except (TypeError, ValueError):
            values["losses"], losses_ok = [], False
        checks = (("params", params_ok), ("losses", losses_ok))
        values["damaged"] = tuple(name for name, ok in checks if not ok)
        values["step"] = int(row["step"] or 0)
        values["weights_file"] = self.absolute(row["weights_file"]) if row["weights_file"] else None
        fields, _ = decode_json_column(values.pop("error_fields", None), [], list)
        if fields and row["error"] and all(isinstance(name, str) for name in fields):
            values["error"] = Wording(row["error"], fields)  # reads with field names; the CLI shows flags
        return Run(**values)
