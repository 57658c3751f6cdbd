"""Shared pieces of the command-line layer: error handling, common options."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import sqlite3
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from typer import _click as click  # typer vendors Click: its commands raise these exception classes
from typer.core import TyperArgument, TyperGroup, TyperOption

from stencil_cli.base.errors import EXIT_FAILURE, EXIT_USAGE, StencilError
from stencil_cli.cli.flags import flag_name as flag_name  # re-exported: commands and tests name flags by it
from stencil_cli.cli.flags import show_as_flag
from stencil_cli.cli.output import err_console, escape, settings

F = TypeVar("F", bound=Callable[..., Any])

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def error_line(error: StencilError, flags: Mapping[str, str] | None = None) -> str:
    """`error` as one line, message (hint), each setting it mentions shown as its flag (see `cli.flags`)."""
    show = show_as_flag(flags)
    message, hint = error.render(show), error.render_hint(show)
    return f"{message} ({hint})" if hint else message


def fail(error: StencilError, flags: Mapping[str, str] | None = None) -> None:
    """Print `error` as one line on stderr (settings named by their flags) and exit with its code."""
    err_console.print(f"[red]error:[/red] {escape(error_line(error, flags))}")
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
            if is_output_error(error):
                output_failed(error)
            if settings.debug:
                raise
            message = f"unexpected {type(error).__name__}: {error}"
            err_console.print(
                f"[red]error:[/red] {escape(message)} (run again with --debug for the traceback)"
            )
            raise typer.Exit(EXIT_FAILURE) from None

    return wrapper  # type: ignore[return-value]


OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO})


def is_output_error(error: BaseException) -> bool:
    """Whether `error` is stdout failing (`> /dev/full`): files stencil writes fail as DiskFullError with
    their path, so a bare OSError without a file name here is the output itself."""
    return isinstance(error, OSError) and error.errno in OUTPUT_ERRNOS and error.filename is None


def output_failed(error: OSError) -> None:
    """stdout cannot be written (a full device): one line on stderr, exit 1."""
    with contextlib.suppress(OSError, ValueError):
        err_console.print(f"[red]error:[/red] cannot write the output to stdout ({error.strerror or error})")
    _stdout_to_devnull()  # or the interpreter's final flush fails again ("Exception ignored ...")
    raise typer.Exit(EXIT_FAILURE)


def _stdout_to_devnull() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. a test runner's buffer)
        pass


def _exit_quietly_on_broken_pipe(self: Console) -> None:
    """rich's hook for a closed pipe (its default exits with 1): exit 0 quietly, like `cat` or `head`."""
    _stdout_to_devnull()
    raise SystemExit(0)


# rich's documented hook for a reader that went away (`stencil --help | head -1`); typer builds its own
# consoles for the help, so the hook is set on the class.
Console.on_broken_pipe = _exit_quietly_on_broken_pipe  # type: ignore[method-assign]


def quiet_broken_pipe() -> None:
    """The reader of stdout went away (`stencil show x --json | head -1`): exit 0 quietly, like `cat`.

    stdout is pointed at /dev/null first, or the interpreter's final flush would raise again."""
    _stdout_to_devnull()
    raise typer.Exit(0)


def quiet_interrupts_at_shutdown() -> None:
    """From here on (the command has finished; the interpreter joins threads and runs atexit callbacks),
    Ctrl-C ends the process at once with 130 instead of "Exception ignored ... KeyboardInterrupt"."""

    def interrupted(signum: int, frame: Any) -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os._exit(130)

    with contextlib.suppress(ValueError):  # only the main thread may set a handler
        signal.signal(signal.SIGINT, interrupted)


def usage_error_line(error: click.ClickException) -> str:
    """A Click usage error (bad option value, missing argument, unknown command) as one line."""
    message = " ".join(error.format_message().split())
    context = getattr(error, "ctx", None)
    if context is not None and isinstance(error, click.exceptions.UsageError):
        message += f" (see `{context.command_path} --help`)"
    return message


# -- the root group: global flags anywhere, help without type noise ------------------------------------------

GLOBAL_FLAGS = ("--debug", "-q", "--quiet")  # the root's flags, also accepted after the subcommand
ROOT_VALUE_OPTIONS = ("--threads",)  # the root's options that take a value
COMMAND_FLAGS = ("--json",)  # each command's own flag, also accepted before the subcommand


def hoist_global_flags(args: list[str]) -> list[str]:
    """Reorder argv so click sees each flag where it is defined: `stencil ls -q` -> `stencil -q ls`,
    `stencil --json ls` -> `stencil ls --json`. Nothing after `--` moves; other tokens keep their order."""
    args = list(args)
    end = args.index("--") if "--" in args else len(args)
    first = 0  # the subcommand's position
    while first < end and args[first].startswith("-"):
        name = args[first].split("=", 1)[0]
        first += 2 if name in ROOT_VALUE_OPTIONS and "=" not in args[first] else 1
    if first >= end:
        return args
    before, command, after, rest = args[:first], args[first:end], [], args[end:]
    moved_to_front = [token for token in command[1:] if token in GLOBAL_FLAGS]
    command = [command[0], *(token for token in command[1:] if token not in GLOBAL_FLAGS)]
    moved_to_back = [token for token in before if token in COMMAND_FLAGS]
    before = [token for token in before if token not in COMMAND_FLAGS]
    return [*before, *moved_to_front, *command, *after, *moved_to_back, *rest]


TYPE_WORDS = {"int": "INTEGER", "float": "NUMBER", "str": "TEXT", "path": "PATH", "file": "FILE"}
HUGE = 2**31  # a bound this large is a technicality (the seed's 2**63 - 1), not worth showing


class HelpArgument(TyperArgument):
    """An argument shown as NAME (required) or [NAME] (optional) in the usage line; no `<type>`."""

    def _usage_display_name(self) -> str:
        name = self.display_name_raw
        name = name if self.required else f"[{name}]"
        return f"{name}..." if self.nargs != 1 else name

    def display_type_rich(self, ctx: click.Context) -> str | None:
        return None


class HelpOption(TyperOption):
    """An option shown as `--seed INTEGER` (or its metavar): flags without `<bool>`, no giant ranges."""

    def display_type_rich(self, ctx: click.Context) -> str | None:
        if self.is_flag or self.count:
            return None
        if self.metavar is not None:
            return self.metavar
        label = (self.display_type(ctx) or "").strip("<>").replace(" range", "")
        if label.startswith("list[") and label.endswith("]"):
            label = label[5:-1]
        return TYPE_WORDS.get(label, label.upper() if "|" not in label else f"[{label}]")

    def _get_number_range_help_str(self) -> str | None:
        if self.count or self.is_flag:
            return None
        low = self.min
        high = self.max if self.max is None or abs(self.max) < HUGE else None
        if low is None and high is None:
            return None
        return super()._get_number_range_help_str() if high is self.max else f"x>={low}"


def tidy_param(param: click.Parameter) -> None:
    """Show `param` without typer's type noise, its help's [brackets] as text (not rich markup); the help as
    written stays in `param.raw_help`. Idempotent."""
    if type(param) is TyperArgument:
        param.__class__ = HelpArgument
        if param.metavar is None and param.name:
            param.metavar = param.name.upper()
    elif type(param) is TyperOption:
        param.__class__ = HelpOption
    if isinstance(param, TyperArgument | TyperOption) and not hasattr(param, "raw_help"):
        param.raw_help = param.help  # type: ignore[attr-defined]
        if param.help:
            param.help = escape(param.help)


def tidy_help(command: click.Command) -> None:
    """Make `command` and its subcommands show tidy help (see `tidy_param`), including the help and
    completion options that click and typer add when the help is rendered."""
    for param in command.params:
        tidy_param(param)
    if "get_params" not in vars(command):
        original = command.get_params

        def get_params(ctx: click.Context) -> list[click.Parameter]:
            params = original(ctx)
            for param in params:
                tidy_param(param)
            return params

        command.get_params = get_params  # type: ignore[method-assign]
    for sub in getattr(command, "commands", {}).values():
        tidy_help(sub)


class StencilGroup(TyperGroup):
    """The root `stencil` group: Click's usage errors become one `error: ...` line (exit 2), global flags are
    accepted after the subcommand, and every command's help shows without type noise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        tidy_help(self)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_flags(args))

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:  # type: ignore[override]
        """Run the command; with `standalone_mode`, print usage errors as one line and exit."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        whole_process = not args and kwargs.get("args") is None  # argv: the process's command, not a test's
        try:
            self._run_standalone(*args, **kwargs)
        finally:
            if whole_process:
                quiet_interrupts_at_shutdown()

    def _run_standalone(self, *args: Any, **kwargs: Any) -> None:
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
            sys.stdout.flush()  # now, where a full device can be reported, not at the interpreter's exit
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
        except OSError as error:
            if not is_output_error(error):
                raise
            try:
                output_failed(error)
            except typer.Exit:
                sys.exit(EXIT_FAILURE)
        # without standalone mode, Click returns an Exit's code (or the command's own return value)
        sys.exit(result if isinstance(result, int) else 0)
