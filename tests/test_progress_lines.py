"""Progress off a terminal: plain lines every 10% or 30 s (stage, step/total, elapsed, ETA); -q silences."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from photos import add_subject

from stencil_cli.cli import progress as progress_module
from stencil_cli.cli.progress import PlainProgress

LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] training robot: (\d+)/40 \((\d+)%\)  elapsed \d+:\d\d:\d\d")


def _captioned(cli: Any, tmp_path: Path) -> None:
    add_subject(cli, tmp_path)
    result = cli("caption", "robot", "--captioner", "template")
    assert result.exit_code == 0, result.output


def test_a_piped_training_prints_a_plain_line_every_ten_percent(
    cli: Any, tmp_path: Path, tiny_preset: Path
) -> None:
    _captioned(cli, tmp_path)
    result = cli("train", "robot", "--subject-model", "tiny", "--steps", "40", "--batch-size", "1")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "training robot:" in line]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    steps = [int(match.group(1)) for match in matches if match]
    assert steps[0] == 0 and steps[-1] == 40 and steps == sorted(steps)
    assert {4, 8, 20, 36} <= set(steps)  # every 10% of 40 steps
    assert len(lines) <= 12  # not one line per step
    assert "ETA" in lines[len(lines) // 2] and lines[-1].split("  ")[-2] == "done"
    assert "loss " in lines[-1]
    assert "━" not in result.stderr  # no bar characters


def test_quiet_silences_the_lines_and_quiet_add_prints_nothing(
    cli: Any, tmp_path: Path, tiny_preset: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (512, 512), (40 * i + 20, 90, 160)).save(folder / f"{i}.png")
    added = cli("-q", "add", "robot", folder, "--phrase", "toy robot")
    assert added.exit_code == 0 and added.stdout == "" and added.stderr == ""
    assert cli("caption", "robot", "--captioner", "template").exit_code == 0
    trained = cli("-q", "train", "robot", "--subject-model", "tiny", "--steps", "5", "--batch-size", "1")
    assert trained.exit_code == 0, trained.output
    assert "training robot" not in trained.stderr


def test_a_slow_task_prints_a_line_every_thirty_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    printed: list[str] = []
    monkeypatch.setattr(progress_module.err_console, "print", lambda text, **kw: printed.append(text))
    plain = PlainProgress(clock=lambda: now[0])
    with plain:
        task = plain.add_task("denoise", total=1000, status="")
        for _ in range(20):  # 20 steps of 10 s: 2% of the total, never another 10%
            now[0] += 10
            plain.update(task, advance=1)
    assert len(printed) == 1 + 6 + 1  # started, every 30 s, the last state at the end
    assert "20/1000 (2%)" in printed[-1] and "elapsed 0:03:20" in printed[-1] and "ETA 2:43:20" in printed[-1]


def test_a_task_without_a_total_prints_when_it_starts_and_finishes(monkeypatch: pytest.MonkeyPatch) -> None:
    printed: list[str] = []
    monkeypatch.setattr(progress_module.err_console, "print", lambda text, **kw: printed.append(text))
    with PlainProgress(clock=lambda: 0.0) as plain:
        task = plain.add_task("masks", total=None, status="")
        plain.update(task, total=1, completed=1)
    assert [line.split("] ", 1)[1] for line in printed] == [
        "masks: elapsed 0:00:00",
        "masks: 1/1 (100%)  elapsed 0:00:00  done",
    ]
