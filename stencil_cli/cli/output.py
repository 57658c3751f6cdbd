"""Where output goes: data to stdout, messages and progress to stderr."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape

from stencil_cli.base.errors import render_text
from stencil_cli.base.text import sanitize_text
from stencil_cli.cli.flags import show_as_flag

__all__ = [
    "escape",
    "err_console",
    "human_bytes",
    "plain",
    "print_json",
    "print_json_line",
    "settings",
    "shown",
    "info",
    "stdout_console",
    "warn",
    "warn_damaged",
]


@dataclass
class OutputSettings:
    """Global output switches, set once by the CLI callback."""

    quiet: bool = False
    debug: bool = os.environ.get("STENCIL_DEBUG", "") not in ("", "0")


settings = OutputSettings()


def console(**options: Any) -> Console:
    """A rich console; with NO_COLOR set (no-color.org) it writes no ANSI codes at all, bold included
    (rich's own NO_COLOR support drops only the colours)."""
    if os.environ.get("NO_COLOR"):
        options["color_system"] = None
    return Console(**options)


err_console = console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    """Print `data` as plain JSON on stdout (never through rich)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def print_json_line(data: Any) -> None:
    """Print `data` as one line of JSON on stdout and flush it (JSON Lines: a pipe sees it at once)."""
    sys.stdout.write(json.dumps(data, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


PIPED_WIDTH = 10_000  # a table written to a pipe or file is never cut to 80 columns


def stdout_console() -> Console:
    """A rich console on stdout for tables: the terminal's width, or unlimited when piped (ids never cut)."""
    shown = console(highlight=False)
    if not shown.is_terminal:
        shown = console(highlight=False, width=PIPED_WIDTH)
    return shown


def human_bytes(count: int | None) -> str:
    """Bytes for people, the one formatter of every command: 1536 -> '1.5 kB', 2.04e9 -> '2.0 GB' ('-': None).

    rich's decimal units (powers of 1000, as disks and the Hub count): one size reads the same everywhere."""
    if count is None:
        return "-"
    from rich.filesize import decimal

    return decimal(int(count))


def info(message: str) -> None:
    """Print an informational message on stderr unless quiet. `message` is rich markup."""
    if not settings.quiet:
        err_console.print(message)


def warn(message: str) -> None:
    """Print a warning on stderr (shown even when quiet). `message` is plain text; settings it mentions by
    field (a `Wording`) are shown as their flags."""
    err_console.print(f"[yellow]warning:[/yellow] {shown(render_text(message, show_as_flag()))}")


def plain(text: object) -> str:
    """`text` fit for a terminal: without escape sequences, control or invisible bidi characters (stored
    captions, phrases and prompts may hold what a server or an older version let through)."""
    return sanitize_text(str(text))


def shown(text: object) -> str:
    """`text` for rich markup: `plain`, then escaped (a prompt like "[Superman]" is not markup)."""
    return escape(plain(text))


def warn_damaged(rows: list[str]) -> None:
    """Warn once about rows whose JSON columns are damaged (they are shown with those columns empty)."""
    if rows:
        listed = ", ".join(rows[:5]) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
        warn(
            f"damaged data in the store database (shown empty): {listed}; `stencil rm NAME --run ID` "
            "removes a damaged run"
        )
