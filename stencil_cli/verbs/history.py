"""History: a subject's training runs and generated images, newest first, with their sizes on disk.

`list_runs` and `list_images` back `stencil runs` and `stencil images`; `subject_summary` is the short
summary `stencil show` ends with. Run and image ids are global to the store (one counter each), so
`stencil gen NAME --run ID` and `stencil eval NAME --generations ID` take the ids these listings print.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stencil_cli.base.errors import FieldError
from stencil_cli.store.db import Store
from stencil_cli.store.layout import LOSS_CURVE_NAME, SAMPLES_DIR
from stencil_cli.store.records import Generation, Run


def folder_bytes(path: Path) -> int:
    """The bytes of the regular files under `path` (links not followed; 0 when it does not exist)."""
    if path.is_symlink() or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for child in path.rglob("*"):
        if child.is_file() and not child.is_symlink():
            total += child.stat().st_size
    return total


def run_kind(run: Run) -> str:
    """`full` or `lora rN`, with the trained part: e.g. `full decoder`, `lora r4 decoder`."""
    params = run.params
    kind = f"lora r{params['lora_rank']}" if params.get("lora_rank") else "full"
    target = params.get("train")
    return f"{kind} {target}" if target else kind


@dataclass
class RunInfo:
    """One training run with its subject, its folder and what it holds on disk."""

    subject: str
    run: Run
    folder: Path
    bytes: int
    images: int = 0  # generated images made with this run
    extra_files: dict[str, str] = field(default_factory=dict)  # e.g. loss curve, previews

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view: the run's fields plus subject, kind (and its label), final loss, folder, bytes,
        images."""
        data = self.run.to_dict()
        data.pop("losses", None)
        return {
            "subject": self.subject,
            **data,
            "kind": self.run.kind,  # `lora` or `full`, as `train --json` and the weights file say
            "kind_label": run_kind(self.run),  # for people: `lora r4 decoder`
            "steps": self.run.params.get("steps"),
            "final_loss": self.run.final_loss,
            "folder": str(self.folder),
            "bytes": self.bytes,
            "images": self.images,
            **self.extra_files,
        }


@dataclass
class ImagesQuery:
    """Which generated images to list: of one subject (or all), one run, prompts containing some text."""

    name: str | None = None
    run_id: int | None = None
    prompt: str | None = None  # case-insensitive substring of the prompt
    limit: int | None = None  # the newest N


@dataclass
class ImageInfo:
    """One generated image with its subject's name."""

    subject: str
    generation: Generation

    @property
    def mode(self) -> str | None:
        """context | edit | plain."""
        return self.generation.params.get("mode")

    @property
    def missing(self) -> bool:
        """Whether the image file is gone (deleted by hand, or a store moved without it)."""
        image = self.generation.image_file
        return image is None or not image.is_file()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view: the generation row plus subject, mode and whether its file is missing."""
        data = self.generation.to_dict()
        return {"subject": self.subject, **data, "mode": self.mode, "missing": self.missing}


def _names(store: Store, name: str | None) -> list[str]:
    if name is None:
        return store.subject_names()
    store.get_subject(name)  # NotFoundError with the closest names
    return [name]


def run_files(store: Store, name: str, run: Run) -> dict[str, str]:
    """The run's loss curve and preview folder, where they exist (store-absolute paths)."""
    folder = store.run_dir(name, run.id)
    found: dict[str, str] = {}
    if (folder / LOSS_CURVE_NAME).is_file():
        found["loss_curve"] = str(folder / LOSS_CURVE_NAME)
    if (folder / SAMPLES_DIR).is_dir():
        found["samples"] = str(folder / SAMPLES_DIR)
    return found


def list_runs(store: Store, name: str | None = None) -> list[RunInfo]:
    """Every run of subject `name` (or of every subject), newest first, with its size on disk."""
    found: list[RunInfo] = []
    for subject in _names(store, name):
        counts: dict[int, int] = {}
        for generation in store.list_generations(subject):
            if generation.run_id is not None:
                counts[generation.run_id] = counts.get(generation.run_id, 0) + 1
        for run in store.list_runs(subject):
            folder = store.run_dir(subject, run.id)
            found.append(
                RunInfo(
                    subject,
                    run,
                    folder,
                    folder_bytes(folder),
                    counts.get(run.id, 0),
                    run_files(store, subject, run),
                )
            )
    found.sort(key=lambda info: info.run.id, reverse=True)
    return found


def list_images(store: Store, query: ImagesQuery) -> list[ImageInfo]:
    """The generated images the query selects, newest first."""
    if query.limit is not None and query.limit < 1:
        raise FieldError("limit", f"must be at least 1 (got {query.limit})")
    if query.name is not None and query.run_id is not None:
        store.get_run(query.name, query.run_id)  # NotFoundError naming where the run ids are
    needle = query.prompt.lower() if query.prompt else None
    found: list[ImageInfo] = []
    for subject in _names(store, query.name):
        for generation in store.list_generations(subject):
            if query.run_id is not None and generation.run_id != query.run_id:
                continue
            if needle is not None and needle not in (generation.prompt or "").lower():
                continue
            found.append(ImageInfo(subject, generation))
    found.sort(key=lambda info: info.generation.id, reverse=True)
    return found[: query.limit] if query.limit is not None else found


@dataclass
class SubjectSummary:
    """How many runs and images a subject has, the newest done run, and the bytes they take."""

    runs: int
    done_runs: int
    newest_done: int | None
    run_bytes: int
    images: int
    newest_image: str | None  # when the newest image was made
    damaged: list[str] = field(default_factory=list)  # rows whose JSON columns are damaged ("run 3 params")
    newest_failed: Run | None = None  # the newest run, when it failed (its error is worth showing)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        data = dict(self.__dict__)
        failed = data.pop("newest_failed")
        data["newest_failed"] = {"id": failed.id, "error": str(failed.error)} if failed else None
        return data


def damaged_rows(rows: Iterable[Run | Generation]) -> list[str]:
    """The rows whose JSON columns could not be read, as "run 3 params" / "image 7 scores"."""
    return [
        f"{'run' if isinstance(row, Run) else 'image'} {row.id} {' and '.join(row.damaged)}"
        for row in rows
        if row.damaged
    ]


def subject_summary(store: Store, name: str) -> SubjectSummary:
    """The runs and images of subject `name`, summed up (for `stencil show`)."""
    runs = store.list_runs(name)
    done = [run for run in runs if run.status == "done"]
    images = store.list_generations(name)
    return SubjectSummary(
        runs=len(runs),
        done_runs=len(done),
        newest_done=done[-1].id if done else None,
        run_bytes=sum(folder_bytes(store.run_dir(name, run.id)) for run in runs),
        images=len(images),
        newest_image=images[-1].created if images else None,
        damaged=damaged_rows([*runs, *images]),
        newest_failed=runs[-1] if runs and runs[-1].status == "failed" else None,
    )
