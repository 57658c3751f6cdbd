"""Errors that the CLI turns into one clear line and an exit code.

Messages below the CLI never name flags: they mention settings by field, as placeholders in the text whose
fields the error declares (``fields=("lr", "precision")``):

- ``{lr}``: the setting itself; ``{precision=fp32}``: the setting with a value to give it;
- ``{rm.image=ID}``: a setting of another command (``stencil rm``), named by the command and its field.

A library caller reads them as field names (``str(error)``: "try a lower lr or precision=fp32"); the CLI
shows each as its flag ("try a lower --lr or --precision fp32"). Braces that are not a declared field's
placeholder (user text: a prompt, a path) are left as they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1  # a failure the user can fix: missing model, no captions, network
EXIT_USAGE = 2  # bad input or usage

PLACEHOLDER = re.compile(
    r"\{(?:(?P<command>[a-z][a-z0-9-]*(?: [a-z][a-z0-9-]*)*)\.)?"  # `rm.` / `models pull.`: another command's
    r"(?P<field>[a-z][a-z0-9_]*)"
    r"(?:=(?P<value>[^{}]*))?\}"  # `=fp32`: a value for it
)
_KEEP: Any = object()  # "keep the hint as it is" (StencilError._with)


@dataclass(frozen=True)
class Mention:
    """A setting that a message mentions: `field` of the command at hand, or of `command` (e.g. "rm"), and
    the value the message suggests for it, if any."""

    field: str
    command: str | None = None
    value: str | None = None

    @property
    def key(self) -> str:
        """How the message declares it: `field`, or `command.field` for another command's setting."""
        return f"{self.command}.{self.field}" if self.command else self.field


ShowMention = Callable[[Mention], str]


def plain_mention(mention: Mention) -> str:
    """A setting as a library caller reads it: its field name (`lr`, `precision=fp32`)."""
    return mention.field if mention.value is None else f"{mention.field}={mention.value}"


def mentions(text: str, fields: Sequence[str]) -> list[Mention]:
    """The settings that `text` mentions through placeholders of the declared `fields`, in order."""
    return [mention for _, mention in _placeholders(text, fields)]


def fill(text: str, fields: Sequence[str], show: ShowMention = plain_mention) -> str:
    """`text` with each placeholder of a declared field shown by `show`; any other braces left alone."""
    if not fields or "{" not in text:
        return text
    declared = set(fields)

    def replace(match: re.Match[str]) -> str:
        mention = Mention(match["field"], match["command"], match["value"])
        return show(mention) if mention.key in declared else match[0]

    return PLACEHOLDER.sub(replace, text)


def _placeholders(text: str, fields: Sequence[str]) -> list[tuple[str, Mention]]:
    declared = set(fields)
    found = []
    for match in PLACEHOLDER.finditer(text):
        mention = Mention(match["field"], match["command"], match["value"])
        if mention.key in declared:
            found.append((match[0], mention))
    return found


class Wording(str):
    """Text that mentions settings by field (see the module's docstring): as a `str`, it reads with the
    field names; a front end shows the settings its own way with `render` (the CLI: as flags)."""

    template: str
    fields: tuple[str, ...]

    def __new__(cls, template: str, fields: Sequence[str] = ()) -> Wording:
        fields = tuple(fields)
        self = super().__new__(cls, fill(template, fields))
        self.template = template
        self.fields = fields
        return self

    def __getnewargs__(self) -> tuple[Any, ...]:  # type: ignore[override]
        return (self.template, self.fields)

    def render(self, show: ShowMention = plain_mention) -> str:
        """The text with each mentioned setting shown by `show`."""
        return fill(self.template, self.fields, show)


def worded(text: str, fields: Sequence[str] = ()) -> str:
    """`text` as a Wording of `fields` (joined with any it declares already); plain `text` without any."""
    if isinstance(text, Wording):
        fields = (*text.fields, *(name for name in fields if name not in text.fields))
        text = text.template
    return Wording(text, fields) if fields else text


def render_text(text: str, show: ShowMention = plain_mention) -> str:
    """`text` with its mentioned settings shown by `show` (a Wording), or as it is (plain text)."""
    return text.render(show) if isinstance(text, Wording) else str(text)


def _show_by_names(names: Mapping[str, str]) -> ShowMention:
    def show(mention: Mention) -> str:
        name = names.get(mention.key, mention.field)
        return name if mention.value is None else f"{name} {mention.value}"

    return show


class StencilError(Exception):
    """A failure the user can fix; the message says what is wrong and how to fix it.

    `fields` declares the settings that the message and the hint mention as placeholders (see the module's
    docstring), so that each front end can show them its own way."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, hint: str | None = None, fields: Sequence[str] = ()) -> None:
        message = worded(message, fields)
        super().__init__(str(message))
        self.message = message
        self.hint = worded(hint, fields) if hint is not None else None

    @property
    def fields(self) -> tuple[str, ...]:
        """Every setting that the message and the hint mention (`field`; `command.field` for another's)."""
        found: list[str] = []
        for text in (self.message, self.hint):
            if isinstance(text, Wording):
                found += [name for name in text.fields if name not in found]
        return tuple(found)

    def render(self, show: ShowMention | Mapping[str, str] | None = None) -> str:
        """The message with each mentioned setting shown by `show` (a function of a Mention, or a map of
        field -> name); the field names by default."""
        return render_text(self.message, self._shower(show))

    def render_hint(self, show: ShowMention | Mapping[str, str] | None = None) -> str | None:
        """The hint (None if there is none) with each mentioned setting shown by `show`, as in `render`."""
        return None if self.hint is None else render_text(self.hint, self._shower(show))

    def wording(self) -> str:
        """The whole error, message and hint, as one Wording (plain text when it mentions no setting): what a
        store keeps so that a front end can show it later its own way."""
        message, hint = self.message, self.hint
        if hint is None:
            return message
        template = f"{getattr(message, 'template', message)} ({getattr(hint, 'template', hint)})"
        return worded(template, self.fields)

    def prefixed(self, prefix: str) -> StencilError:
        """The same error (class, hint, settings) with `prefix` before its message."""
        message = self.message
        text = prefix + (message.template if isinstance(message, Wording) else message)
        return self._with(worded(text, message.fields if isinstance(message, Wording) else ()))

    def __str__(self) -> str:
        message, hint = self.render(), self.render_hint()
        return f"{message} ({hint})" if hint else message

    @staticmethod
    def _shower(show: ShowMention | Mapping[str, str] | None) -> ShowMention:
        if show is None:
            return plain_mention
        if isinstance(show, Mapping):
            return _show_by_names(show)
        return show

    def _with(self, message: str, hint: str | None = _KEEP) -> StencilError:
        """A copy of this error with another message (and hint), without calling a subclass's __init__."""
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.args = (str(message),)
        clone.message = message
        if hint is not _KEEP:
            clone.hint = hint
        return clone


class BadInputError(StencilError):
    """Bad input from the user: a bad name, file, option value (exit code 2)."""

    exit_code = EXIT_USAGE


class NotFoundError(StencilError):
    """Something the user named does not exist (exit code 1)."""


class FieldError(BadInputError):
    """Bad values for named settings (fields such as ``steps``); each front end names its own flags for them.

    ``template`` holds one ``{}`` for the field names (or ``{0}``, ``{1}``... for each in its place, or the
    fields' own placeholders such as ``{steps}``), e.g. ``FieldError("steps", "{} must be at least 1")``
    reads "steps must be at least 1"; `stencil train` shows "--steps must be at least 1", `stencil bench`
    (whose training steps are a field called `train_steps`) "--train-steps must be at least 1". Without any
    placeholder the field names go first. No front end rewrites the message text.
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
        names = (fields,) if isinstance(fields, str) else tuple(fields)
        super().__init__(_named_template(template, names), hint=hint, fields=names)
        self.named = names  # the fields the error is about (the message may mention other settings too)

    @property
    def fields(self) -> tuple[str, ...]:
        """The fields whose values are wrong, then any other setting the message or the hint mentions."""
        return (*self.named, *(name for name in super().fields if name not in self.named))

    def renamed(self, names: Mapping[str, str]) -> FieldError:
        """The same error about renamed fields (a caller that embeds these settings under other names)."""

        def rename(text: str | None) -> str | None:
            if not isinstance(text, Wording):
                return text
            template = text.template
            for placeholder, mention in _placeholders(template, text.fields):
                if mention.command is None and mention.field in names:
                    value = "" if mention.value is None else f"={mention.value}"
                    template = template.replace(placeholder, f"{{{names[mention.field]}{value}}}")
            return Wording(template, [names.get(name, name) for name in text.fields])

        clone = self._with(rename(self.message) or "", rename(self.hint))
        assert isinstance(clone, FieldError)
        clone.named = tuple(names.get(name, name) for name in self.named)
        clone.exit_code = EXIT_USAGE  # as a FieldError made anew under the new names (as before)
        return clone


def _named_template(template: str, fields: Sequence[str]) -> str:
    """A FieldError's template with `{}` (all the fields) or `{0}`, `{1}`... (each) as the fields' own
    placeholders; the field names first when it holds none of these."""
    if "{0}" in template:
        for index, name in enumerate(fields):
            template = template.replace(f"{{{index}}}", f"{{{name}}}")
        return template
    joined = ", ".join(f"{{{name}}}" for name in fields)
    if "{}" in template:
        return template.replace("{}", joined, 1)
    if mentions(template, fields):
        return template
    return f"{joined} {template}"


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
