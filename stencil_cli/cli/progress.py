"""One place that shows progress on stderr (quiet aware): rich bars on a terminal, plain lines otherwise.

When stderr is not a terminal (nohup, SLURM, CI, a pipe) bars would be cut off or never drawn, so each task
prints a plain line instead: when it starts, at every further 10% of its total or after 30 s without a line,
and when it ends (stage, step/total, elapsed, ETA and its status). `-q` silences both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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

from stencil_cli.base import events
from stencil_cli.base.events import Stage
from stencil_cli.cli.output import err_console, settings

PLAIN_PERCENT_STEP = 10  # a plain line at every further 10% ...
PLAIN_INTERVAL_S = 30.0  # ... or after this long without one


def _clock_text(seconds: float) -> str:
    """75.2 -> '0:01:15'."""
    whole = int(max(0.0, seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


@dataclass
class _PlainTask:
    description: str
    total: float | None
    started: float
    completed: float = 0.0
    status: str = ""
    last_line: float | None = None  # when the last line was printed
    last_bucket: int = -1  # the last 10% step printed
    printed: float = 0.0  # `completed` when the last line was printed
    finished: bool = False


@dataclass
class PlainProgress:
    """Progress as plain lines on stderr, with the part of rich's `Progress` API the commands use.

    `interval_s` and `percent_step` set how often a line is printed; `clock` is replaceable for tests.
    """

    disable: bool = False
    interval_s: float = PLAIN_INTERVAL_S
    percent_step: int = PLAIN_PERCENT_STEP
    clock: Callable[[], float] = time.monotonic
    tasks: dict[int, _PlainTask] = field(default_factory=dict)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task_id, task in self.tasks.items():  # a last line for tasks that moved since their last one
            if not task.finished and task.completed != task.printed:
                self._print(task_id, force=True)

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        """Start a task; returns its id (prints a 'started' line)."""
        task_id = len(self.tasks)
        self.tasks[task_id] = _PlainTask(
            description, total, self.clock(), status=str(fields.get("status", ""))
        )
        self._print(task_id, force=True)
        return task_id

    def update(
        self,
        task_id: int,
        *,
        total: float | None = None,
        completed: float | None = None,
        advance: float | None = None,
        **fields: Any,
    ) -> None:
        """Move a task on; prints a line when it crosses another 10%, after 30 s, or when it completes."""
        task = self.tasks[task_id]
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if "status" in fields:
            task.status = str(fields["status"])
        self._print(task_id)

    def _bucket(self, task: _PlainTask) -> int:
        if not task.total:
            return 0
        return int(min(task.completed, task.total) * 100 / task.total) // self.percent_step

    def _print(self, task_id: int, *, force: bool = False) -> None:
        task = self.tasks[task_id]
        if task.finished:
            return
        now = self.clock()
        done = task.total is not None and task.completed >= task.total > 0
        bucket = self._bucket(task)
        due = task.last_line is None or now - task.last_line >= self.interval_s
        if not (force or done or bucket > task.last_bucket or due):
            return
        task.last_line, task.last_bucket, task.finished = now, bucket, done
        task.printed = task.completed
        if self.disable:
            return
        elapsed = now - task.started
        parts: list[str] = []
        if task.total:
            shown = min(task.completed, task.total)
            parts.append(f"{shown:g}/{task.total:g} ({shown * 100 / task.total:.0f}%)")
        elif task.completed:
            parts.append(f"{task.completed:g}")
        parts.append(f"elapsed {_clock_text(elapsed)}")
        if task.total and 0 < task.completed < task.total:
            parts.append(f"ETA {_clock_text(elapsed / task.completed * (task.total - task.completed))}")
        elif done:
            parts.append("done")
        if task.status:
            parts.append(task.status)
        stamp = time.strftime("%H:%M:%S")
        err_console.print(f"[{stamp}] {task.description}: " + "  ".join(parts), markup=False, highlight=False)


def make_progress() -> Progress | PlainProgress:
    """Progress on stderr: rich bars (description, bar, n/total, elapsed, ETA, status) on a terminal,
    plain lines otherwise."""
    if not err_console.is_terminal:
        return PlainProgress(disable=settings.quiet)
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
def progress_bar() -> Iterator[Any]:
    """Context manager yielding a started progress display; tasks need a `status` field."""
    progress = make_progress()
    with progress:
        yield progress


def add_task(progress: Any, description: str, total: float | None) -> int:
    """Add a task to `progress` with an empty status field (the column every bar shows)."""
    return progress.add_task(description, total=total, status="")


class StageBars:
    """A progress hook that shows one bar per stage, titled by the stage (for the demo's verbs).

    A stage's bar gets the total of its first event; a `Step` moves it to its step (with the loss as its
    status), `Reused` steps advance it, `Working` (one long step) counts as a total of 1. Every other event
    is left to the caller.
    """

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.tasks: dict[Stage, int] = {}

    def task(self, stage: Stage, total: int | None) -> int:
        """The bar of `stage` (created with `total` on first use)."""
        if stage not in self.tasks:
            self.tasks[stage] = add_task(self.progress, stage, total)
        return self.tasks[stage]

    def __call__(self, event: events.Event) -> None:
        """The hook."""
        match event:
            case events.Working(stage=stage):
                self.task(stage, 1)
            case events.Reused(stage=stage, steps=steps):
                self.progress.update(self.task(stage, steps), advance=steps)
            case (
                events.Step(stage=stage, step=step, total=total, loss=loss)
                | events.NullTextIteration(stage=stage, step=step, total=total, loss=loss)
            ):
                task = self.task(stage, total)
                if total is not None:
                    self.progress.update(task, total=total, completed=step)
                if loss is not None:
                    self.progress.update(task, status=f"loss {loss:.4f}")
