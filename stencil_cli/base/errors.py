"""Errors that the CLI turns into one clear line and an exit code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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



class FieldError(BadInputError):
    """Bad values for named settings (fields such as ``steps``); each front end names its own flags for them.

    ``template`` holds one ``{}`` for the field names (or ``{0}``, ``{1}``... for each in its place), e.g.
    ``FieldError("steps", "{} must be at least 1")`` reads "steps must be at least 1"; `stencil train`
    shows "--steps must be at least 1", `stencil bench` (whose training steps are a field called
    `train_steps`) "--train-steps must be at least 1". No front end rewrites the message text.
    """

    def __init__(
        self,
        fields: str | Sequence[str],
        template: str = "{}",
        *,
        hint: str | None = None,
        exit_code: int = EXIT_USAGE,
    ) -> None:
        self.exit_code = exit_code  # 1 where the value is fine but something it needs is missing
        self.fields = (fields,) if isinstance(fields, str) else tuple(fields)
        self.template = template if ("{}" in template or "{0}" in template) else "{} " + template
        super().__init__(self.render({}), hint=hint)

    def render(self, names: Mapping[str, str]) -> str:
        """The message with each field shown as `names[field]` (the field itself when absent)."""
        shown = [names.get(field, field) for field in self.fields]
        if "{0}" in self.template:  # each field in its own place (no str.format: the text may hold braces)
            text = self.template
            for index, name in enumerate(shown):
                text = text.replace(f"{{{index}}}", name)
            return text
        return self.template.replace("{}", ", ".join(shown), 1)

    def renamed(self, names: Mapping[str, str]) -> FieldError:
        """The same error about renamed fields (a caller that embeds these settings under other names)."""
        return FieldError([names.get(f, f) for f in self.fields], self.template, hint=self.hint)


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
