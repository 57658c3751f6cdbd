"""Shared pieces of the command-line layer: error handling, common options."""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from stencil_cli.errors import EXIT_FAILURE, StencilError
from stencil_cli.output import err_console, escape, settings

F = TypeVar("F", bound=Callable[..., Any])

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def fail(error: StencilError) -> None:
    """Print `error` as one line on stderr and exit with its code."""
    err_console.print(f"[red]error:[/red] {escape(str(error))}")
    raise typer.Exit(error.exit_code)


def handle_errors(func: F) -> F:
    """Turn StencilError (and, unless --debug, any crash) into one line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except StencilError as error:
            if settings.debug:
                traceback.print_exc()
            fail(error)
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/red]")
            raise typer.Exit(130) from None
        except Exception as error:  # noqa: BLE001 - the last line of defence for a CLI
            if settings.debug:
                raise
            message = f"unexpected {type(error).__name__}: {error}"
            err_console.print(
                f"[red]error:[/red] {escape(message)} (run again with --debug for the traceback)"
            )
            raise typer.Exit(EXIT_FAILURE) from None

    return wrapper  # type: ignore[return-value]
