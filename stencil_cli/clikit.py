"""Shared pieces of the command-line layer: error handling, common options."""

from __future__ import annotations

import functools
import os
import sqlite3
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

import typer
from typer import _click as click  # typer vendors Click: its commands raise these exception classes
from typer.core import TyperGroup

from stencil_cli.errors import EXIT_FAILURE, EXIT_USAGE, FieldError, StencilError
from stencil_cli.output import err_console, escape, settings

F = TypeVar("F", bound=Callable[..., Any])

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def flag_name(field: str, flags: Mapping[str, str] | None = None) -> str:
    """The command-line flag that sets `field`: `flags[field]`, else `--field-name`."""
    if flags and field in flags:
        return flags[field]
    return "--" + field.replace("_", "-")


def fail(error: StencilError, flags: Mapping[str, str] | None = None) -> None:
    """Print `error` as one line on stderr (fields named by their flags) and exit with its code."""
    if isinstance(error, FieldError):
        message = error.render({field: flag_name(field, flags) for field in error.fields})
        if error.hint:
            message = f"{message} ({error.hint})"
    else:
        message = str(error)
    err_console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(error.exit_code)


def given_fields(context: typer.Context | None, renames: Mapping[str, str] | None = None) -> frozenset[str]:
    """The parameters the user typed on the command line (not defaults, nor environment variables)."""
    if context is None:
        return frozenset()
    typed = set()
    for name in context.params:
        source = context.get_parameter_source(name)
        if source is not None and source.name == "COMMANDLINE":
            typed.add((renames or {}).get(name, name))
    return frozenset(typed)


def handle_errors(func: F | None = None, *, flags: Mapping[str, str] | None = None) -> Any:
    """Turn StencilError (and, unless --debug, any crash) into one line and an exit code.

    `flags` names the flag of each field a verb may complain about, where it is not `--field-name`.
    """
    if func is None:
        return functools.partial(handle_errors, flags=flags)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except StencilError as error:
            if settings.debug:
                traceback.print_exc()
            fail(error, flags)
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/red]")
            raise typer.Exit(130) from None
        except BrokenPipeError:
            quiet_broken_pipe()
        except sqlite3.Error as error:  # Store methods translate their own; this catches a raw query
            fail(StencilError(f"the store database failed: {error}"), flags)
        except Exception as error:  # noqa: BLE001 - the last line of defence for a CLI
            if settings.debug:
                raise
            message = f"unexpected {type(error).__name__}: {error}"
            err_console.print(
                f"[red]error:[/red] {escape(message)} (run again with --debug for the traceback)"
            )
            raise typer.Exit(EXIT_FAILURE) from None

    return wrapper  # type: ignore[return-value]


def quiet_broken_pipe() -> None:
    """The reader of stdout went away (`stencil show x --json | head -1`): exit 0 quietly, like `cat`.

    stdout is pointed at /dev/null first, or the interpreter's final flush would raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. a test runner's buffer)
        pass
    raise typer.Exit(0)


def usage_error_line(error: click.ClickException) -> str:
    """A Click usage error (bad option value, missing argument, unknown command) as one line."""
    message = " ".join(error.format_message().split())
    context = getattr(error, "ctx", None)
    if context is not None and isinstance(error, click.exceptions.UsageError):
        message += f" (see `{context.command_path} --help`)"
    return message


class StencilGroup(TyperGroup):
    """The top-level command group: Click's usage errors become one `error: ...` line (exit 2)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:  # type: ignore[override]
        """Run the command; with `standalone_mode`, print usage errors as one line and exit."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as error:
            error.show()
            sys.exit(error.exit_code)
        except click.exceptions.ClickException as error:
            err_console.print(f"[red]error:[/red] {escape(usage_error_line(error))}")
            sys.exit(error.exit_code if error.exit_code else EXIT_USAGE)
        except typer.Abort:
            err_console.print("[red]aborted[/red]")
            sys.exit(EXIT_FAILURE)
        except BrokenPipeError:
            try:
                quiet_broken_pipe()
            except typer.Exit:
                sys.exit(0)
        # without standalone mode, Click returns an Exit's code (or the command's own return value)
        sys.exit(result if isinstance(result, int) else 0)
