"""History: `stencil runs`, `stencil images`, the summary `show` ends with, and hints that name them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from photos import add_subject
from PIL import Image

from stencil_cli.store.db import Store
from stencil_cli.store.records import Run


def done_run(store: Store, name: str = "robot", size: int = 2048, **params: Any) -> Run:
    """A done run of `name` whose weights file holds `size` bytes (never loaded here)."""
    run = store.create_run(name, {"subject_model": "tiny", "steps": 4, **params}, base_model="tiny")
    weights = store.run_dir(name, run.id) / "weights.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"w" * size)
    store.finish_run(run.id, "done", weights_file=weights, duration_s=3.5, losses=[0.5, 0.25], step=4)
    return store.get_run(name, run.id)


def fake_image(store: Store, name: str, run: Run, prompt: str, seed: int, tau: float | None = 60.0) -> int:
    """A generated image row of `name` with a small PNG file; returns its id."""
    subject = store.get_subject(name)
    folder = store.generation_dir(name) / "batch"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"s{seed}-r{run.id}-tau{tau}.png"
    Image.new("RGB", (16, 16), (seed % 255, 10, 10)).save(path)
    row = store.add_generation(
        subject,
        {
            "run_id": run.id,
            "prompt": prompt,
            "seed": seed,
            "tau": tau,
            "params": {"mode": "context" if tau is not None else "plain"},
            "image_file": path,
        },
    )
    return row.id


def test_runs_lists_every_run_newest_first_with_its_size_and_kind(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    add_subject(cli, tmp_path, "cat", "cat")
    first = done_run(store, size=1000)
    second = done_run(store, size=3000, lora_rank=4, train="decoder")
    other = done_run(store, "cat", size=10)
    fake_image(store, "robot", second, "on the moon", 1)
    result = cli("runs", "robot", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["id"] for row in rows] == [second.id, first.id]
    assert rows[0]["kind"] == "lora" and rows[1]["kind"] == "full"  # as `train --json` says
    assert rows[0]["kind_label"] == "lora r4 decoder" and rows[1]["kind_label"] == "full"
    assert rows[0]["bytes"] == 3000 and rows[1]["bytes"] == 1000
    assert rows[0]["final_loss"] == 0.25 and rows[0]["images"] == 1 and rows[0]["subject"] == "robot"
    everything = json.loads(cli("runs", "--json").stdout)
    assert [row["id"] for row in everything] == [other.id, second.id, first.id]
    table = cli("runs", "robot")
    assert table.exit_code == 0
    lines = [line.split() for line in table.stdout.splitlines()[1:]]
    assert [line[0] for line in lines] == [str(second.id), str(first.id)]
    assert "3.0 kB" in table.stdout and "4/4" in table.stdout and "lora r4 decoder" in table.stdout


def test_images_filters_by_run_prompt_and_limit_newest_first(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    old, new = done_run(store), done_run(store)
    ids = [
        fake_image(store, "robot", old, "on the moon", 1),
        fake_image(store, "robot", new, "On The Beach", 2),
        fake_image(store, "robot", new, "in a garden", 3, tau=None),
    ]
    listed = json.loads(cli("images", "robot", "--json").stdout)
    assert [row["id"] for row in listed] == ids[::-1]
    assert listed[0]["mode"] == "plain" and listed[1]["tau"] == 60.0 and listed[1]["seed"] == 2
    by_run = json.loads(cli("images", "robot", "--run", str(old.id), "--json").stdout)
    assert [row["id"] for row in by_run] == [ids[0]]
    by_prompt = json.loads(cli("images", "--prompt", "the beach", "--json").stdout)
    assert [row["id"] for row in by_prompt] == [ids[1]]
    newest = json.loads(cli("images", "robot", "-n", "2", "--json").stdout)
    assert [row["id"] for row in newest] == [ids[2], ids[1]]
    table = cli("images", "robot", "--limit", "1")
    assert table.exit_code == 0 and "in a garden" in table.stdout and "beach" not in table.stdout


def test_piped_tables_keep_whole_ids_and_paths(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    run = done_run(store)
    fake_image(store, "robot", run, "a very long prompt " * 8, 1)
    result = cli("images", "robot")
    path = str(store.list_generations("robot")[0].image_file)
    assert path in result.stdout  # one unbroken line, not cut to 80 columns
    assert "…" not in result.stdout


def test_bad_history_queries_are_one_line_naming_the_flag(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    done_run(store)
    limit = cli("images", "robot", "-n", "0")
    assert limit.exit_code == 2 and "-n must be at least 1" in limit.stderr
    run = cli("images", "robot", "--run", "99")
    assert run.exit_code == 1 and "stencil runs robot" in run.stderr
    ghost = cli("runs", "ghost")
    assert ghost.exit_code == 1 and "ghost" in ghost.stderr
    assert cli("images").exit_code == 0


def test_show_ends_with_runs_and_images_and_names_the_commands(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    empty = cli("show", "robot")
    assert "runs:        none" in empty.stdout
    run = done_run(store, size=5000)
    fake_image(store, "robot", run, "on the moon", 1)
    shown = cli("show", "robot")
    assert f"newest done: run {run.id}" in shown.stdout and "5.0 kB" in shown.stdout
    assert "stencil runs robot" in shown.stdout and "stencil images robot" in shown.stdout
    data = json.loads(cli("show", "robot", "--json").stdout)
    assert data["history"]["runs"] == 1 and data["history"]["images"] == 1
    assert data["history"]["run_bytes"] == 5000


def test_hints_about_run_ids_name_the_command_that_lists_them(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    run = store.create_run("robot", {"subject_model": "tiny"}, base_model="tiny")
    store.finish_run(run.id, "failed", error="boom")
    result = cli("gen", "robot", "on the moon", "--run", str(run.id))
    assert result.exit_code == 1 and "stencil runs robot" in result.stderr
    missing = cli("gen", "robot", "on the moon", "--run", "12345")
    assert missing.exit_code == 1 and "stencil runs robot" in missing.stderr


def _terminal(monkeypatch: pytest.MonkeyPatch, width: int = 80) -> None:
    """Tables print to a (fake) terminal `width` columns wide."""
    from rich.console import Console

    from stencil_cli.cli import history, output

    def terminal() -> Console:
        return output.console(highlight=False, width=width, force_terminal=True)

    monkeypatch.setattr(history, "stdout_console", terminal)


def test_an_80_column_terminal_keeps_ids_dates_and_paths_whole(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = add_subject(cli, tmp_path)
    run = done_run(store)
    fake_image(store, "robot", run, "a very long prompt about a toy robot " * 4, 123456)
    monkeypatch.setenv("NO_COLOR", "1")
    _terminal(monkeypatch)
    shown = cli("images", "robot").stdout
    assert "…" not in shown and "..." not in shown
    [row] = store.list_generations("robot")
    assert str(row.image_file) in shown  # one unbroken string: the terminal wraps the line, rich does not
    assert row.created.replace("T", " ").removesuffix("+00:00") in shown and "123456" in shown
    runs = cli("runs", "robot").stdout
    assert "…" not in runs and run.started.replace("T", " ").removesuffix("+00:00") in runs


def test_no_color_prints_no_ansi_codes_not_even_bold(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = add_subject(cli, tmp_path)
    fake_image(store, "robot", done_run(store), "on the moon", 1)
    _terminal(monkeypatch, width=200)
    assert "\x1b[" in cli("images", "robot").stdout  # a terminal gets the bold headers...
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b[" not in cli("images", "robot").stdout  # ...unless NO_COLOR is set


def test_images_marks_an_image_whose_file_is_gone(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    run = done_run(store)
    kept, gone = fake_image(store, "robot", run, "kept", 1), fake_image(store, "robot", run, "gone", 2)
    rows = {row.id: row for row in store.list_generations("robot")}
    rows[gone].image_file.unlink()
    listed = {row["id"]: row for row in json.loads(cli("images", "robot", "--json").stdout)}
    assert listed[gone]["missing"] is True and listed[kept]["missing"] is False
    lines = cli("images", "robot").stdout.splitlines()
    marked = [line for line in lines if "(missing)" in line]
    assert marked == [line for line in lines if str(rows[gone].image_file) in line]
