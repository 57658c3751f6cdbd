"""Command modules; each exposes `register(app)` and owns one area of the CLI."""

from __future__ import annotations

import importlib

import typer

# Each name is a module in this package with a `register(app: typer.Typer) -> None`.
COMMAND_MODULES: list[str] = [
    "subjects",
    "history",
    "models",
    "caption",
    "train",
    "gen",
    "export",
    "evaluate",
    "bench",
    "demo",
    "view",
]


def register_all(app: typer.Typer) -> None:
    """Register every command module's commands on `app`."""
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(app)
