"""Freeing space: remove one training run, prune older runs' weights, measure the store per subject.

A run is *in use* while a training holds its subject's lock (a run being trained or resumed); such runs
are never removed or pruned. Removing a run waits for (then refuses while) any command uses the subject, and
pruning skips such a subject, so that a running `gen` never loses its run or leaves drafts without rows.
Everything else goes only through these verbs, which report the bytes they free, measured before deleting.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stencil_cli.base.errors import FieldError, StencilError
from stencil_cli.store.db import Store
from stencil_cli.store.layout import CHECKPOINT_NAME, GENERATIONS_DIR, IMAGES_DIR, RUNS_DIR, WEIGHTS_NAME
from stencil_cli.verbs.common import removing_subject, subject_lock
from stencil_cli.verbs.history import folder_bytes

PRUNED_FILES = (WEIGHTS_NAME, CHECKPOINT_NAME)  # what pruning takes from an older run


@dataclass
class RunRemoval:
    """What removing a run takes (or took): its folder, its images and the bytes of both."""

    subject: str
    run_id: int
    folder: Path
    images: list[int]
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "subject": self.subject,
            "run_id": self.run_id,
            "folder": str(self.folder),
            "images": self.images,
            "bytes": self.bytes,
        }


def plan_run_removal(store: Store, name: str, run_id: int) -> RunRemoval:
    """What `remove_run` would take (nothing is deleted): NotFoundError for an unknown run."""
    run = store.get_run(name, run_id)
    folder = store.run_dir(name, run.id)
    generations = [g for g in store.list_generations(name) if g.run_id == run.id]
    image_bytes = sum(
        folder_bytes(path) for g in generations for path in (g.image_file, g.draft_file) if path is not None
    )
    return RunRemoval(name, run.id, folder, [g.id for g in generations], folder_bytes(folder) + image_bytes)


def remove_run(store: Store, name: str, run_id: int, *, wait_s: float = 0.0) -> RunRemoval:
    """Remove one run: its row, its folder (weights, masks, checkpoint, previews) and its images.

    Waits up to `wait_s` seconds for the commands using the subject (a `gen` with this run would leave
    drafts without rows), then refuses; refused while the subject is being trained (its lock is held). A run
    still marked running without the lock belongs to a process that died, and goes like any other.
    """
    store.require_writable(f"remove run {run_id} of {name!r}")
    with removing_subject(store, name, wait_s), subject_lock(store, name):
        removal = plan_run_removal(store, name, run_id)
        store.remove_run(name, run_id)
        return removal


@dataclass
class PrunedRun:
    """One older run whose weights (and checkpoint) pruning takes."""

    subject: str
    run_id: int
    status: str
    files: list[Path]
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "subject": self.subject,
            "run_id": self.run_id,
            "status": self.status,
            "files": [str(path) for path in self.files],
            "bytes": self.bytes,
        }


@dataclass
class PruneResult:
    """What pruning took (or, with dry_run, would take)."""

    keep: int
    dry_run: bool
    runs: list[PrunedRun] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # subjects being trained: left alone

    @property
    def bytes(self) -> int:
        """The bytes freed (or that would be freed)."""
        return sum(run.bytes for run in self.runs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "keep": self.keep,
            "dry_run": self.dry_run,
            "bytes": self.bytes,
            "runs": [run.to_dict() for run in self.runs],
            "skipped": self.skipped,
        }


def _prunable(store: Store, name: str, keep: int) -> list[PrunedRun]:
    runs = store.list_runs(name)
    kept = {run.id for run in [run for run in runs if run.status == "done"][-keep:]} if keep else set()
    found = []
    for run in runs:
        if run.id in kept or run.status == "running":
            continue
        folder = store.run_dir(name, run.id)
        files = [folder / part for part in PRUNED_FILES if (folder / part).is_file()]
        if files:
            found.append(PrunedRun(name, run.id, run.status, files, sum(f.stat().st_size for f in files)))
    return found


def prune(store: Store, keep: int = 1, *, dry_run: bool = False, name: str | None = None) -> PruneResult:
    """Delete the weights and checkpoints of every run but the newest `keep` done ones, per subject.

    The runs' rows, masks and images stay (`stencil gen --run ID` then says the weights are gone). A subject
    being trained is skipped. With `dry_run`, nothing is deleted and the result says what would go.
    """
    if keep < 0:
        raise FieldError("keep", f"must be 0 or more (got {keep})")
    result = PruneResult(keep, dry_run)
    if not dry_run:
        store.require_writable("prune it")
    names = [store.get_subject(name).name] if name is not None else store.subject_names()
    for subject in names:
        try:
            if store.read_only:  # only a dry run gets here: nothing to lock, nothing is deleted
                holding, training = contextlib.nullcontext(), contextlib.nullcontext()
            else:  # skipped while a gen, train, caption or eval runs
                holding = removing_subject(store, subject, 0.0) if not dry_run else contextlib.nullcontext()
                training = subject_lock(store, subject)
            with holding, training:
                candidates = _prunable(store, subject, keep)
                if not dry_run:
                    for run in candidates:
                        for path in run.files:
                            path.unlink(missing_ok=True)
                result.runs.extend(candidates)
        except StencilError:  # a lock is held: a command uses the subject
            result.skipped.append(subject)
    return result


@dataclass
class SubjectUsage:
    """The bytes one subject takes: photos, runs, generated images, all of its folder."""

    subject: str
    photos: int
    runs: int
    generations: int
    total: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return dict(self.__dict__)


def disk_usage(store: Store) -> list[SubjectUsage]:
    """The store's size per subject (largest first)."""
    rows = []
    for name in store.subject_names():
        folder = store.subject_dir(name)
        rows.append(
            SubjectUsage(
                name,
                folder_bytes(folder / IMAGES_DIR),
                folder_bytes(folder / RUNS_DIR),
                folder_bytes(folder / GENERATIONS_DIR),
                folder_bytes(folder),
            )
        )
    rows.sort(key=lambda row: row.total, reverse=True)
    return rows
