"""The command reference in docs/ is generated from the code and must match it."""

from __future__ import annotations

from pathlib import Path

from stencil_cli.cli import app
from stencil_cli.cli.docgen import render

ROOT = Path(__file__).resolve().parents[1]


def test_commands_md_matches_the_cli() -> None:
    expected = render(app)
    actual = (ROOT / "docs" / "commands.md").read_text()
    fix = "run `python -m stencil_cli.cli.docgen > docs/commands.md`"
    assert actual == expected, f"docs/commands.md is stale: {fix}"


def test_every_command_has_help() -> None:
    text = render(app)
    for block in text.split("\n## ")[1:]:
        title, _, body = block.partition("\n")
        assert body.strip().split("\n")[0].strip(), f"{title} has no help text"
