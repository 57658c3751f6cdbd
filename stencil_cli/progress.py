"""One place that builds rich progress bars on stderr (quiet aware)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from stencil_cli.output import err_console, settings


def make_progress() -> Progress:
    """A progress display on stderr: description, bar, n/total, elapsed, ETA, extra fields."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=err_console,
        disable=settings.quiet,
        transient=False,
    )


@contextmanager
def progress_bar() -> Iterator[Progress]:
    """Context manager yielding a started progress display; tasks need a `status` field."""
    progress = make_progress()
    with progress:
        yield progress


def add_task(progress: Progress, description: str, total: float | None) -> int:
    """Add a task to `progress` with an empty status field (the column every bar shows)."""
    return progress.add_task(description, total=total, status="")


class StageBars:
    """A progress hook that shows one bar per stage (for the demo and the benchmark's inner verbs).

    Stages with a known total get a bar with that total; ``extra["advance"]`` advances by that many steps,
    otherwise the bar moves to ``step``.
    """

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, step: int, total: int | None, extra: dict[str, Any]) -> None:
        """The hook."""
        if stage not in self.tasks:
            self.tasks[stage] = add_task(self.progress, stage, total)
        task = self.tasks[stage]
        if "advance" in extra:
            self.progress.update(task, advance=int(extra["advance"]))
        elif total is not None:
            self.progress.update(task, total=total, completed=step)
        if "loss" in extra:
            self.progress.update(task, status=f"loss {extra['loss']:.4f}")
