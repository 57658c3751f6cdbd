"""Render the CLI reference (docs/commands.md) from the commands themselves, so it cannot drift."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from typing import Any

import typer
from typer.core import TyperArgument

HEADER = """# Command reference

Generated from the commands themselves by `python -m stencil_cli.cli.docgen > docs/commands.md`;
a test fails when this file and the code disagree. Run `stencil COMMAND --help` for the same text.
"""


def _walk(command: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
    yield path, command
    if hasattr(command, "commands"):
        for name in sorted(command.commands):
            yield from _walk(command.commands[name], [*path, name])


def _param_row(param: Any) -> str:
    if isinstance(param, TyperArgument):
        names = f"`{(param.metavar or param.name or '').upper()}`"
        help_text = getattr(param, "raw_help", getattr(param, "help", None)) or ""
    else:
        names = ", ".join(f"`{opt}`" for opt in [*param.opts, *param.secondary_opts])
        help_text = getattr(param, "raw_help", param.help) or ""
        if param.envvar:
            envvars = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar)
            help_text += " (env: " + ", ".join(f"`{v}`" for v in envvars) + ")"
        if param.show_default and param.default not in (None, False, "", [], ()):
            help_text += f" [default: {param.default}]"
    required = " (required)" if param.required else ""
    return f"| {names}{required} | {help_text.replace('|', '/').strip()} |"


def render(app: typer.Typer) -> str:
    """The Markdown reference for every command of `app`."""
    root = typer.main.get_command(app)
    parts = [HEADER]
    for path, command in _walk(root, ["stencil"]):
        if command.hidden:
            continue
        ctx = typer.Context(command, info_name=" ".join(path))
        usage = re.sub(
            r"\{(\w+)\}", lambda m: m.group(1).upper(), " ".join(command.collect_usage_pieces(ctx))
        )
        parts.append(f"## `{' '.join(path)}`\n")
        parts.append(inspect.cleandoc(command.help or "").strip() + "\n")
        parts.append(f"```\n{' '.join(path)} {usage}\n```\n")
        params = [
            p for p in command.params if p.name not in ("help", "install_completion", "show_completion")
        ]
        if params:
            parts.append("| argument / option | meaning |\n|---|---|")
            parts.extend(_param_row(p) for p in params)
            parts.append("")
    return "\n".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    from stencil_cli.cli import app as stencil_app

    print(render(stencil_app), end="")
