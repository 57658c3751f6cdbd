"""Progress as typed events (stencil_cli.base.events): what the ML core and the verbs report, how the commands
draw it, and that no command dispatches on stage strings."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from stencil_cli.base import events
from stencil_cli.base.events import NullTextIteration, Reused, Step, Working
from stencil_cli.cli import bench as bench_command
from stencil_cli.cli import demo as demo_command
from stencil_cli.cli import gen as gen_command
from stencil_cli.cli import progress as progress_module
from stencil_cli.cli import train as train_command
from stencil_cli.verbs.bench import SubjectStatus
from stencil_cli.verbs.train import MaskPicture, MaskPictures

PACKAGE = Path(__file__).resolve().parents[1] / "stencil_cli"


# -- no string-stage dispatch -------------------------------------------------------------------------------


def _names_stage(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "stage") or (
        isinstance(node, ast.Attribute) and node.attr == "stage"
    )


def _is_text(node: ast.AST) -> bool:
    """A string literal, a literal collection of strings, or a CONSTANT (such as TEXT_STAGES)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_text(element) for element in node.elts)
    return isinstance(node, ast.Name) and node.id.isupper()


def stage_string_dispatch(source: str) -> list[int]:
    """Lines that pick what to do from a stage name or the old hook's `extra` dict: `stage == "warning"`,
    `stage in TEXT_STAGES`, `match stage: case "note"`, `case Step(stage="train")`, `extra["message"]`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_names_stage(o) for o in operands) and any(_is_text(o) for o in operands):
                lines.append(node.lineno)
        elif isinstance(node, ast.Match) and _names_stage(node.subject):
            lines.append(node.lineno)
        elif isinstance(node, ast.MatchClass):
            for name, pattern in zip(node.kwd_attrs, node.kwd_patterns, strict=True):
                if name == "stage" and isinstance(pattern, ast.MatchValue):
                    lines.append(pattern.lineno)
        elif _is_extra(node):
            lines.append(node.lineno)
    return sorted(lines)


def _is_extra(node: ast.AST) -> bool:
    """The old hook's `extra` dict: a parameter named `extra`, or `extra[...]`."""
    if isinstance(node, ast.arg):
        return node.arg == "extra"
    return isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "extra"


def test_the_dispatch_detector_finds_the_old_stage_string_forms() -> None:
    old = """
def hook(stage, step, total, extra):
    if stage == "warning":
        warn(extra["message"])
    elif stage not in TEXT_STAGES:
        bars(stage)
    elif self.stage in ("draft", "denoise"):
        pass
    match stage:
        case "note":
            pass
    match event:
        case Step(stage="train"):
            pass
"""
    assert stage_string_dispatch(old) == [2, 3, 4, 5, 7, 9, 13]
    new = """
def hook(event):
    match event:
        case events.Warning(text=text):
            warn(text)
        case events.Step(stage=stage) if stage not in self.tasks:
            add(stage)
"""
    assert stage_string_dispatch(new) == []


def test_no_command_dispatches_on_stage_strings() -> None:
    found = {
        path.name: lines
        for path in sorted((PACKAGE / "cli").glob("*.py"))
        if (lines := stage_string_dispatch(path.read_text(encoding="utf-8")))
    }
    assert found == {}, f"dispatch on the event's type, not on stage names: {found}"


def _old_style_progress_calls(source: str) -> list[int]:
    """Calls like `progress("warning", 0, None, {...})`: a hook called with a stage string."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = node.func
        named = (isinstance(func, ast.Name) and func.id == "progress") or (
            isinstance(func, ast.Attribute) and func.attr == "progress"
        )
        first = node.args[0]
        if named and isinstance(first, ast.Constant) and isinstance(first.value, str):
            lines.append(node.lineno)
    return lines


def test_every_progress_hook_gets_an_event() -> None:
    assert _old_style_progress_calls('progress("note", 0, None, {"message": "x"})') == [1]
    found = {
        str(path.relative_to(PACKAGE)): lines
        for path in sorted(PACKAGE.rglob("*.py"))
        if (lines := _old_style_progress_calls(path.read_text(encoding="utf-8")))
    }
    assert found == {}


# -- the commands' handlers -------------------------------------------------------------------------------


class FakeBars:
    """The part of rich's Progress the handlers use, recording each task's state."""

    def __init__(self) -> None:
        self.tasks: list[dict[str, Any]] = []

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        self.tasks.append({"description": description, "total": total, "completed": 0, **fields})
        return len(self.tasks) - 1

    def update(self, task_id: int, *, advance: float | None = None, **fields: Any) -> None:
        task = self.tasks[task_id]
        if advance is not None:
            task["completed"] += advance
        task.update({key: value for key, value in fields.items() if value is not None})

    def by_name(self) -> dict[str, dict[str, Any]]:
        return {task["description"]: task for task in self.tasks}


@pytest.fixture
def said(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """What the handlers print as messages: (kind, text)."""
    lines: list[tuple[str, str]] = []
    for module in (gen_command, train_command, demo_command, bench_command):
        monkeypatch.setattr(module, "info", lambda text: lines.append(("info", text)), raising=False)
        monkeypatch.setattr(module, "warn", lambda text: lines.append(("warn", text)), raising=False)
    return lines


def test_gen_draws_one_bar_per_stage_with_batched_steps_and_the_null_text_status(
    said: list[tuple[str, str]],
) -> None:
    bars = FakeBars()
    hook = gen_command.StageProgress(bars, {"draft": 8, "inversion": 6, "null-text": 2, "denoise": 6})  # type: ignore[arg-type]
    hook(Reused("draft", 2))  # a kept draft: its steps need no work
    hook(Step("draft", 1, 2, samples=3))
    hook(Step("draft", 2, 2, samples=3))
    for step in (1, 2):
        hook(Step("inversion", step, 2, samples=3))
    hook(NullTextIteration(1, 1, 1, 0.5, samples=3))
    shown = bars.by_name()["null-text"]["status"]
    hook(Step("null-text", 1, 1, samples=3, loss=0.25, inner=7))
    hook(Step("denoise", 1, 2, samples=3))
    hook(events.Warning("a [bold] warning"))
    hook(events.Note("a [note]"))
    tasks = bars.by_name()
    assert list(tasks) == ["draft", "DDIM inversion", "null-text", "denoise"]
    assert tasks["draft"]["total"] == 8 and tasks["draft"]["completed"] == 2 + 3 + 3
    assert tasks["DDIM inversion"]["completed"] == 6
    assert shown == "step 1/1: inner 1"
    assert tasks["null-text"]["completed"] == 3
    assert tasks["null-text"]["status"] == "7 inner iterations, loss 2.50e-01"
    assert tasks["denoise"]["completed"] == 3
    assert said == [("warn", "a [bold] warning"), ("info", "[dim]a \\[note][/dim]")]


def test_train_shows_the_mask_pass_as_one_long_step_then_the_steps_with_the_loss(
    said: list[tuple[str, str]],
) -> None:
    bars = FakeBars()
    hook = train_command.TrainProgress(bars, "robot")  # type: ignore[arg-type]
    hook(events.Loading("tiny", "cpu"))
    hook(Working("masks"))
    masks = bars.by_name()["masks"].copy()
    hook(Step("masks", 1, 1))
    hook(MaskPictures([MaskPicture(3, "m3.png", 1.0), MaskPicture(4, "m4.png", 0.5)]))
    hook(Step("train", 0, 4))
    hook(Step("train", 2, 4, loss=0.123456))
    hook(Step("samples", 1, 2, at=2))
    tasks = bars.by_name()
    assert masks["total"] is None and tasks["masks"]["total"] == 1 and tasks["masks"]["completed"] == 1
    assert tasks["training robot"]["total"] == 4 and tasks["training robot"]["completed"] == 2
    assert tasks["training robot"]["status"] == "loss 0.1235"
    assert tasks["previews"]["total"] == 2 and tasks["previews"]["status"] == "step 2"
    assert said == [
        ("info", "loading subject model tiny on cpu ..."),
        ("warn", "the mask of photo 3 covers 100%; see m3.png"),
    ]


def test_the_demo_prints_headings_and_draws_each_stage_as_a_bar(said: list[tuple[str, str]]) -> None:
    bars = FakeBars()
    hook = demo_command.DemoProgress(progress_module.StageBars(bars))
    hook(events.Heading(3, 4, "train [tiny]"))
    hook(events.Loading("tiny", "cpu"))  # not said: the demo's headings say what runs
    hook(Working("masks"))
    hook(Step("masks", 1, 1))
    hook(Step("train", 1, 2))
    hook(Step("train", 2, 2, loss=0.5))
    hook(NullTextIteration(1, 3, 2, 0.25))
    hook(events.Removed("demo"))
    tasks = bars.by_name()
    assert tasks["masks"]["total"] == 1 and tasks["masks"]["completed"] == 1
    assert tasks["train"]["completed"] == 2 and tasks["train"]["status"] == "loss 0.5000"
    assert tasks["null-text"]["total"] == 3 and tasks["null-text"]["completed"] == 1
    assert said == [
        ("info", "[bold]3/4 train \\[tiny][/bold]"),
        ("info", "removed the half-made demo subject demo"),
    ]


def test_the_benchmark_draws_one_bar_per_subject_and_says_its_notes(said: list[tuple[str, str]]) -> None:
    bars = FakeBars()
    hook = bench_command.SubjectBars(bars)  # type: ignore[arg-type]
    hook(events.Note("process 1/2 on cpu: [dog]"))
    hook(SubjectStatus("dog", "training", 0, 4))
    hook(SubjectStatus("dog", "generating", 3, 4))
    hook(events.Warning("dog: skipped a.png: not an image"))
    hook(SubjectStatus("dog", "done", 4, 4))
    (task,) = bars.tasks
    assert task["description"] == "dog" and task["total"] == 4 and task["completed"] == 4
    assert task["status"] == "[green]done[/green]"
    assert said == [("info", "process 1/2 on cpu: \\[dog]"), ("warn", "dog: skipped a.png: not an image")]
