"""Errors that the CLI turns into one clear line and an exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # a failure the user can fix: missing model, no captions, network
EXIT_USAGE = 2  # bad input or usage


class StencilError(Exception):
    """A failure the user can fix; the message says what is wrong and how to fix it."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class BadInputError(StencilError):
    """Bad input from the user: a bad name, file, option value (exit code 2)."""

    exit_code = EXIT_USAGE


class NotFoundError(StencilError):
    """Something the user named does not exist (exit code 1)."""
