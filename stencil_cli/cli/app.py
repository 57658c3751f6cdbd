"""The `stencil` command: parse, call, present. No ML and no SQL here."""

from __future__ import annotations

import importlib
from typing import Annotated, Any

import typer

from stencil_cli import __version__
from stencil_cli.base.threads import configure_threads
from stencil_cli.cli.ending import end_process
from stencil_cli.cli.kit import StencilGroup
from stencil_cli.cli.output import settings


class StencilTyper(typer.Typer):
    """The `stencil` app: run as a program (not under a test runner), an ML command ends without the
    interpreter's teardown once its stores are closed and its output flushed (`cli/ending.py`)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit as exit:
            end_process(exit.code)
            raise


app = StencilTyper(
    name="stencil",
    cls=StencilGroup,
    help="Teach an image model your own subject from a few photos, then render it anywhere.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"stencil {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Show the version and exit."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Hide progress and messages.")] = False,
    debug: Annotated[
        bool, typer.Option("--debug", envvar="STENCIL_DEBUG", help="Show tracebacks on errors.")
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            envvar="STENCIL_THREADS",
            min=1,
            help="CPU threads for the models. [default: the free cores of this process's CPU set, at most 8]",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Teach an image model your own subject from a few photos, then render it anywhere."""
    settings.quiet = quiet
    settings.debug = debug
    configure_threads(threads)  # before any command imports torch (OpenMP reads its settings once)


# Each name is a module of this package with a `register(app: typer.Typer) -> None`: one command group each.
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


def register_all(target: typer.Typer) -> None:
    """Register every command module's commands on `target`."""
    for name in COMMAND_MODULES:
        importlib.import_module(f"stencil_cli.cli.{name}").register(target)


register_all(app)
