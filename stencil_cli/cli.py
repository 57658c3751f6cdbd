"""The `stencil` command: parse, call, present. No ML and no SQL here."""

from __future__ import annotations

from typing import Annotated

import typer

from stencil_cli import __version__
from stencil_cli.clikit import StencilGroup
from stencil_cli.commands import register_all
from stencil_cli.output import settings
from stencil_cli.threads import configure_threads

app = typer.Typer(
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


register_all(app)
