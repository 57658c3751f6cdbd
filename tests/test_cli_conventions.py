"""Conventions every command shares: global flags anywhere, `--json` on config, help without type noise."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import typer

from stencil_cli.cli import app
from stencil_cli.cli.kit import hoist_global_flags

NOISE = re.compile(r"<(bool|int|str|float|path|file)[^>]*>|\{\w+\}|9223372036854775807|x<=\d{10,}")


def _command_paths() -> list[list[str]]:
    root = typer.main.get_command(app)
    paths: list[list[str]] = []

    def walk(command: Any, path: list[str]) -> None:
        paths.append(path)
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            if not sub.hidden:
                walk(sub, [*path, name])

    walk(root, [])
    return paths


def test_help_of_every_command_shows_no_type_noise(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    paths = _command_paths()
    assert ["gen"] in paths and ["train"] in paths and ["rm"] in paths and ["config", "get"] in paths
    for path in paths:
        result = cli(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        noise = NOISE.search(result.output)
        assert noise is None, (path, noise.group(0) if noise else None)
    gen = " ".join(cli("gen", "--help").output.split())
    assert "Usage: stencil gen [OPTIONS] [NAME] [PROMPT]" in gen
    assert re.search(r"--seed INTEGER \[x>=0\] First seed", gen)
    assert "[default: random]" in gen  # help text in brackets is text, not rich markup
    train = " ".join(cli("train", "--help").output.split())
    assert "the authors' [empty prompt, caption] batch" in train


def test_quiet_and_debug_work_after_the_subcommand(cli: Any) -> None:
    loud = cli("config", "set", "device", "cpu")
    assert loud.exit_code == 0 and "device = cpu" in loud.stderr
    for args in (("config", "set", "device", "cpu", "-q"), ("-q", "config", "set", "device", "cpu")):
        quiet = cli(*args)
        assert quiet.exit_code == 0 and quiet.stderr == "", args
    plain = cli("show", "nosuch")
    assert plain.exit_code == 1 and "Traceback" not in plain.stderr
    debug = cli("show", "nosuch", "--debug")
    assert debug.exit_code == 1 and "Traceback" in debug.stderr


def test_json_works_before_the_subcommand(cli: Any) -> None:
    after = cli("config", "ls", "--json")
    before = cli("--json", "config", "ls")
    assert before.exit_code == 0 and json.loads(before.stdout) == json.loads(after.stdout)
    assert cli("--json", "ls").stdout == cli("ls", "--json").stdout


def test_config_get_set_unset_print_json(cli: Any) -> None:
    stored = cli("config", "set", "precision", "fp16", "--json")
    assert stored.exit_code == 0, stored.output
    expected = {"key": "precision", "value": "fp16", "stored": True, "overridden_by": None}
    assert json.loads(stored.stdout) == expected
    got = json.loads(cli("config", "get", "precision", "--json").stdout)
    assert got == {"key": "precision", "value": "fp16", "source": "config"}
    reset = json.loads(cli("config", "unset", "precision", "--json").stdout)
    assert reset == {"key": "precision", "value": "auto", "stored": False}
    assert json.loads(cli("config", "get", "precision", "--json").stdout)["source"] == "default"


def test_hoisting_moves_only_the_global_flags() -> None:
    assert hoist_global_flags(["ls", "-q"]) == ["-q", "ls"]
    hoisted = hoist_global_flags(["--threads", "2", "show", "x", "--debug"])
    assert hoisted == ["--threads", "2", "--debug", "show", "x"]
    assert hoist_global_flags(["--json", "store", "du"]) == ["store", "du", "--json"]
    assert hoist_global_flags(["gen", "x", "--", "-q"]) == ["gen", "x", "--", "-q"]  # after -- it is a value
    assert hoist_global_flags(["--json", "gen", "x", "--", "-q"]) == ["gen", "x", "--json", "--", "-q"]
    assert hoist_global_flags(["--version"]) == ["--version"]
