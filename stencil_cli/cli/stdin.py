"""Standard input as the commands meet it: a terminal, a pipe or file, or closed altogether (`<&-`, where
Python's `sys.stdin` is None)."""

from __future__ import annotations

import sys

from stencil_cli.base.errors import BadInputError


def stdin_is_terminal() -> bool:
    """Whether someone can answer a question on stdin (False for a pipe, a file or a closed stdin)."""
    stream = sys.stdin
    if stream is None:
        return False
    try:
        return stream.isatty()
    except (ValueError, OSError):  # closed or detached
        return False


def read_stdin_text(what: str, alternative: str) -> str:
    """All of stdin as UTF-8 text; a closed stdin or other bytes are bad input naming `alternative`."""
    stream = sys.stdin
    if stream is None:
        raise BadInputError(
            f"{what} reads from stdin, but stdin is closed: pipe them in, or use {alternative}"
        )
    try:
        data = stream.buffer.read() if hasattr(stream, "buffer") else stream.read().encode("utf-8")
    except (OSError, ValueError) as error:
        raise BadInputError(f"{what} cannot read stdin ({error}): use {alternative}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadInputError(
            f"stdin cannot be read as UTF-8 text ({error.reason} at byte {error.start}): "
            f"convert it (e.g. iconv -t UTF-8), or use {alternative}"
        ) from None
