"""One place that builds rich progress bars on stderr (quiet aware)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
