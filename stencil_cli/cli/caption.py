"""`stencil caption`: caption a subject's photos (OpenAI vision or templates); set or edit them by hand.

Parse, call the caption verb (`verbs/caption.py`), present.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import click
import typer

from stencil_cli.base import events
from stencil_cli.base.errors import BadInputError, StencilError
from stencil_cli.cli.kit import JsonOption, handle_errors
from stencil_cli.cli.output import err_console, escape, info, plain, print_json, settings, shown, warn
from stencil_cli.store.db import open_store
from stencil_cli.store.records import Subject
from stencil_cli.verbs.caption import (
    DEFAULT_BACKOFF_S,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_S,
    CaptionOutcome,
    CaptionRequest,
    apply_edited_captions,
    edit_text,
    set_caption,
)
from stencil_cli.verbs.caption import caption as caption_verb

BACKOFF_ENV = (
    "STENCIL_CAPTION_BACKOFF"  # seconds before the first retry (doubles each time); tests shorten it
)


def _photo_rows(subject: Subject) -> list[dict[str, Any]]:
    return [
        {
            "id": image["id"],
            "sha256": image["sha256"],
            "file": image["file"],
            "caption": image["caption"],
            "caption_source": image["caption_source"],
        }
        for image in subject.images
    ]


def _present(outcome: CaptionOutcome, json_output: bool) -> None:
    """Print a subject's captions: JSON on stdout, or one `id  caption` line per photo."""
    subject = outcome.subject
    if json_output:
        print_json(
            {
                "subject": subject.name,
                "phrase": subject.phrase,
                "description": subject.description,
                "images": _photo_rows(subject),
                **outcome.extra(),
            }
        )
        return
    for image in subject.images:
        caption = plain(image["caption"]) if image["caption"] else "(none)"
        typer.echo(f"{image['id']:>4}  {caption}")


def _backoff_from_env() -> float:
    raw = os.environ.get(BACKOFF_ENV)
    if not raw:
        return DEFAULT_BACKOFF_S
    try:
        value = float(raw)
    except ValueError:
        raise BadInputError(f"{BACKOFF_ENV} must be a number of seconds, not {raw!r}") from None
    if value < 0:
        raise BadInputError(f"{BACKOFF_ENV} must not be negative")
    return value


class _Waiting:
    """The progress hook: say what is being asked, and show a spinner while the vision model thinks."""

    def __init__(self) -> None:
        self.status: Any = None

    def __call__(self, event: events.Event) -> None:
        """The hook: a line and a spinner when the captioner is asked; the spinner ends with the answer."""
        match event:
            case events.Captioning(photos=photos, captioner=captioner, host=host):
                where = f" at {escape(host)}" if host else ""
                info(f"captioning {photos} photo(s) with {escape(captioner)}{where}...")
                if host and not settings.quiet:
                    self.status = err_console.status("waiting for the answer...", spinner="dots")
                    self.status.start()
            case events.Captioned():
                self.close()

    def close(self) -> None:
        """Stop the spinner (if one is turning)."""
        if self.status is not None:
            self.status.stop()
            self.status = None


def _edit(name: str, force: bool) -> CaptionOutcome:
    """Open every caption in $EDITOR and store the changed ones."""
    store = open_store()
    subject = store.get_subject(name)
    if not subject.images:
        raise StencilError(f"subject {subject.name!r} has no photos to caption")
    try:
        edited = click.edit(edit_text(subject), require_save=False, extension=".txt")
    except click.ClickException as error:
        raise StencilError(
            f"could not run the editor: {error.format_message()}", hint="set EDITOR, e.g. EDITOR=nano"
        ) from None
    except UnicodeDecodeError as error:
        raise BadInputError(
            f"the edited file is not UTF-8 text (byte 0x{error.object[error.start]:02x} at position "
            f"{error.start}); nothing was stored",
            hint="save it as UTF-8 in the editor and run `stencil caption NAME --edit` again",
        ) from None
    if edited is None:
        info("no changes")
        return CaptionOutcome(subject)
    outcome = apply_edited_captions(store, name, edited, force=force)
    info(f"{len(outcome.captioned)} caption(s) changed")
    return outcome


@handle_errors
def caption(
    name: Annotated[str, typer.Argument(help="Subject name.")],
    captioner: Annotated[
        str,
        typer.Option(
            "--captioner",
            envvar="STENCIL_CAPTIONER",
            help="openai (vision model; needs OPENAI_API_KEY) or template (offline, 'a photo of a PHRASE').",
        ),
    ] = "openai",
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            envvar="STENCIL_CAPTION_MODEL",
            help="Vision model for --captioner openai (default: gpt-4o).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Caption every photo again (not only those without a caption); "
            "with --set/--edit, accept captions that lack the phrase.",
        ),
    ] = False,
    phrase: Annotated[
        str | None,
        typer.Option(
            "--phrase", help="Set the subject phrase first (changing an existing one needs --force)."
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the vision model's answer.")
    ] = DEFAULT_TIMEOUT_S,
    retries: Annotated[
        int,
        typer.Option(
            "--retries",
            min=0,
            help="Retries after network errors, rate limits (429) and server errors (5xx).",
        ),
    ] = DEFAULT_RETRIES,
    set_caption_text: Annotated[
        tuple[str, str] | None,
        typer.Option("--set", metavar="IMAGE_ID TEXT", help="Set one photo's caption by hand."),
    ] = None,
    edit: Annotated[
        bool, typer.Option("--edit", help="Edit all captions in $EDITOR (one `id caption` line per photo).")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Caption a subject's photos with a vision model or templates; set or edit captions by hand."""
    if set_caption_text is not None and edit:
        raise BadInputError("use either --set or --edit, not both")
    if (set_caption_text is not None or edit) and phrase is not None:
        raise BadInputError("--phrase cannot be combined with --set/--edit; set the phrase first")
    if set_caption_text is not None:
        outcome = set_caption(open_store(), name, set_caption_text[0], set_caption_text[1], force=force)
        info(f"caption of photo {outcome.captioned[0]} set")
    elif edit:
        outcome = _edit(name, force)
    else:
        request = CaptionRequest(
            name=name,
            captioner=captioner,
            model=model,
            force=force,
            phrase=phrase,
            timeout=timeout,
            retries=retries,
            backoff=_backoff_from_env(),
        )
        waiting = _Waiting()
        try:
            outcome = caption_verb(open_store(), request, progress=waiting)
        finally:
            waiting.close()
        for note in outcome.notes:
            warn(note)
        subject = outcome.subject
        if outcome.source is None:
            info(
                f"all {len(subject.images)} photo(s) of {escape(subject.name)} already have captions "
                "(pass --force to caption them again)"
            )
        else:
            info(f"stored {len(outcome.captioned)} caption(s); phrase: {shown(subject.phrase or '-')}")
    _present(outcome, json_output)


def register(app: typer.Typer) -> None:
    """Register the `caption` command on `app`."""
    app.command()(caption)
