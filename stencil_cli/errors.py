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


class DiskFullError(StencilError):
    """The disk (or a file-size limit) ran out while writing `path`; what was written before is kept."""

    def __init__(self, path: object, *, hint: str | None = None) -> None:
        super().__init__(
            f"disk full at {path}",
            hint=hint or "free some space (or raise the file-size limit) and run the command again",
        )
        self.path = path


class StoreReadOnlyError(StencilError):
    """A command tried to change a store that is read-only (read-only commands still work)."""


class CorruptStoreError(StencilError):
    """The store database is not a readable SQLite database."""
