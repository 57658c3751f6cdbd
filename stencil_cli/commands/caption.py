"""`stencil caption`: caption a subject's photos (OpenAI vision or templates); set or edit them by hand."""

from __future__ import annotations

import os
from typing import Annotated, Any

import click
import typer

from stencil_cli import captioning
from stencil_cli.captioning import CaptionRequest, CaptionResult, Photo, clean_phrase, contains_phrase
from stencil_cli.clikit import JsonOption, handle_errors
from stencil_cli.errors import BadInputError, StencilError
from stencil_cli.output import err_console, escape, info, print_json, settings, warn
from stencil_cli.store import Store, Subject, open_store

MANUAL_SOURCE = "manual"
REPAIRED_SUFFIX = "+phrase-inserted"
BACKOFF_ENV = (
    "STENCIL_CAPTION_BACKOFF"  # seconds before the first retry (doubles each time); tests shorten it
)

EDIT_HEADER = """\
# Captions of subject {name!r}; the phrase is {phrase!r}.
# One photo per line: ID, a tab (or spaces), then the caption. Each caption must contain the phrase.
# Lines starting with '#' are ignored; a photo whose line you delete keeps its caption.
"""


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


def _present(subject: Subject, json_output: bool, extra: dict[str, Any]) -> None:
    """Print a subject's captions: JSON on stdout, or one `id  caption` line per photo."""
    if json_output:
        print_json(
            {
                "subject": subject.name,
                "phrase": subject.phrase,
                "description": subject.description,
                "images": _photo_rows(subject),
                **extra,
            }
        )
        return
    for image in subject.images:
        caption = image["caption"] if image["caption"] else "(none)"
        typer.echo(f"{image['id']:>4}  {caption}")


def _check_text(text: str, phrase: str | None, force: bool, where: str) -> str:
    """Normalise a hand-written caption; refuse it if it lacks the phrase (unless `force`)."""
    text = " ".join(text.split())
    if not text:
        raise BadInputError(f"{where}: the caption is empty")
    if phrase and not force and not contains_phrase(text, phrase):
        raise BadInputError(
            f"{where}: the caption does not contain the subject phrase {phrase!r}; "
            "training locates the subject by it (pass --force to store it anyway)"
        )
    return text


def _settle_phrase(subject: Subject, phrase_option: str | None, force: bool) -> tuple[str | None, bool]:
    """The phrase to caption with, and whether it changes the stored one (which means recaptioning all)."""
    if phrase_option is None:
        return subject.phrase, False
    phrase = clean_phrase(phrase_option)
    if phrase is None:
        raise BadInputError("--phrase must not be empty (e.g. --phrase 'cat')")
    if subject.phrase is None or phrase == subject.phrase:
        return phrase, subject.phrase is None
    if not force:
        raise BadInputError(
            f"subject {subject.name!r} already has the phrase {subject.phrase!r}; "
            "pass --force with --phrase to change it and recaption every photo"
        )
    return phrase, True


def _store_result(
    store: Store, subject: Subject, result: CaptionResult, *, phrase_to_store: str | None, all_photos: bool
) -> None:
    """Write a captioner's answer in one transaction (captions, sources, and phrase/description)."""
    repaired = set(result.repaired)
    plain = {photo_id: text for photo_id, text in result.captions.items() if photo_id not in repaired}
    fixed = {photo_id: text for photo_id, text in result.captions.items() if photo_id in repaired}
    description = result.description if (all_photos or not subject.description) else None
    with store.write():
        store.set_captions(
            subject.name, plain, result.source, description=description, phrase=phrase_to_store
        )
        if fixed:
            store.set_captions(subject.name, fixed, result.source + REPAIRED_SUFFIX)


def _validate_result(result: CaptionResult, photos: list[Photo]) -> None:
    """Refuse an answer that misses a photo or has a caption without the phrase (whatever the captioner)."""
    wanted = {photo.id for photo in photos}
    if set(result.captions) != wanted:
        raise StencilError(f"the {result.source} captioner did not caption every photo; nothing was stored")
    lacking = [pid for pid, text in result.captions.items() if not contains_phrase(text, result.phrase)]
    if lacking:
        raise StencilError(
            f"captions of photos {lacking} lack the phrase {result.phrase!r}; nothing was stored"
        )


def _backoff_from_env() -> float:
    raw = os.environ.get(BACKOFF_ENV)
    if not raw:
        return captioning.DEFAULT_BACKOFF_S
    try:
        value = float(raw)
    except ValueError:
        raise BadInputError(f"{BACKOFF_ENV} must be a number of seconds, not {raw!r}") from None
    if value < 0:
        raise BadInputError(f"{BACKOFF_ENV} must not be negative")
    return value


def _run_captioner(
    store: Store,
    subject: Subject,
    *,
    captioner_kind: str,
    model: str | None,
    force: bool,
    timeout: float,
    retries: int,
    phrase_option: str | None,
    json_output: bool,
) -> None:
    if not subject.images:
        raise StencilError(
            f"subject {subject.name!r} has no photos (add some with `stencil add {subject.name} ...`)"
        )
    phrase, phrase_changed = _settle_phrase(subject, phrase_option, force)
    redo_all = force or (phrase_changed and subject.phrase is not None)
    # a new phrase also recaptions the captions that lack it (training locates the subject by it)
    targets = [
        image
        for image in subject.images
        if redo_all
        or not image["caption"]
        or (phrase_changed and phrase and not contains_phrase(image["caption"], phrase))
    ]
    if not targets:
        if phrase_changed and phrase:
            store.update_subject(subject.name, phrase=phrase)
            subject = store.get_subject(subject.name)
        info(
            f"all {len(subject.images)} photo(s) of {escape(subject.name)} already have captions "
            "(pass --force to caption them again)"
        )
        _present(subject, json_output, {"captioned": [], "repaired": [], "source": None})
        return
    model_name = model or store.get_config("caption_model") or captioning.DEFAULT_MODEL
    captioner = captioning.make_captioner(
        captioner_kind, model=model_name, timeout_s=timeout, retries=retries, backoff_s=_backoff_from_env()
    )
    photos = [Photo(id=image["id"], path=store.absolute(image["path"])) for image in targets]
    request = CaptionRequest(photos=photos, phrase=phrase, class_word=subject.class_word)
    where = ""
    if isinstance(captioner, captioning.OpenAICaptioner):
        where = f" at {escape(captioner.host)}"
    info(
        f"captioning {len(photos)} photo(s) of {escape(subject.name)} with {escape(captioner.name)}{where}..."
    )
    if isinstance(captioner, captioning.OpenAICaptioner) and not settings.quiet:
        with err_console.status("waiting for the answer...", spinner="dots"):
            result = captioner.caption(request)
    else:
        result = captioner.caption(request)
    _validate_result(result, photos)
    phrase_to_store = result.phrase if (subject.phrase is None or phrase_changed) else None
    _store_result(
        store, subject, result, phrase_to_store=phrase_to_store, all_photos=len(photos) == len(subject.images)
    )
    for note in result.notes:
        warn(note)
    updated = store.get_subject(subject.name)
    info(f"stored {len(result.captions)} caption(s); phrase: {escape(updated.phrase or '-')}")
    _present(
        updated,
        json_output,
        {"captioned": sorted(result.captions), "repaired": sorted(result.repaired), "source": result.source},
    )


def _set_one(
    store: Store, subject: Subject, image_ref: str, text: str, force: bool, json_output: bool
) -> None:
    image = store.resolve_image(subject, image_ref)
    caption = _check_text(text, subject.phrase, force, f"photo {image['id']}")
    store.set_captions(subject.name, {image["id"]: caption}, MANUAL_SOURCE)
    info(f"caption of photo {image['id']} set")
    _present(
        store.get_subject(subject.name), json_output, {"captioned": [image["id"]], "source": MANUAL_SOURCE}
    )


def edit_text(subject: Subject) -> str:
    """The text opened in the editor: a comment header, then `id<TAB>caption` per photo."""
    lines = [EDIT_HEADER.format(name=subject.name, phrase=subject.phrase or "(none)")]
    for image in subject.images:
        lines.append(f"{image['id']}\t{image['caption'] or ''}\n")
    return "".join(lines)


def parse_edit_text(text: str, subject: Subject, force: bool) -> dict[int, str]:
    """Parse edited `id caption` lines into {image id: caption}; raise BadInputError naming the bad line."""
    known = {image["id"] for image in subject.images}
    captions: dict[int, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        head, _, rest = line.partition("\t") if "\t" in line else line.partition(" ")
        where = f"line {number}"
        try:
            image_id = int(head.strip())
        except ValueError:
            raise BadInputError(
                f"{where}: expected a photo id, then the caption (got {head.strip()!r})"
            ) from None
        if image_id not in known:
            raise BadInputError(f"{where}: photo {image_id} is not in subject {subject.name!r}")
        if image_id in captions:
            raise BadInputError(f"{where}: photo {image_id} appears twice")
        if not rest.strip():  # a photo left without a caption: nothing to store for it
            continue
        captions[image_id] = _check_text(rest, subject.phrase, force, f"{where} (photo {image_id})")
    return captions


def _edit(store: Store, subject: Subject, force: bool, json_output: bool) -> None:
    if not subject.images:
        raise StencilError(f"subject {subject.name!r} has no photos to caption")
    try:
        edited = click.edit(edit_text(subject), require_save=False, extension=".txt")
    except click.ClickException as error:
        raise StencilError(
            f"could not run the editor: {error.format_message()}", hint="set EDITOR, e.g. EDITOR=nano"
        ) from None
    if edited is None:
        info("no changes")
        _present(subject, json_output, {"captioned": []})
        return
    captions = parse_edit_text(edited, subject, force)
    current = {image["id"]: image["caption"] for image in subject.images}
    changed = {image_id: text for image_id, text in captions.items() if text != current.get(image_id)}
    if changed:
        store.set_captions(subject.name, changed, MANUAL_SOURCE)
    info(f"{len(changed)} caption(s) changed")
    _present(
        store.get_subject(subject.name), json_output, {"captioned": sorted(changed), "source": MANUAL_SOURCE}
    )


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
    ] = captioning.DEFAULT_TIMEOUT_S,
    retries: Annotated[
        int,
        typer.Option(
            "--retries",
            min=0,
            help="Retries after network errors, rate limits (429) and server errors (5xx).",
        ),
    ] = captioning.DEFAULT_RETRIES,
    set_caption: Annotated[
        tuple[str, str] | None,
        typer.Option("--set", metavar="IMAGE_ID TEXT", help="Set one photo's caption by hand."),
    ] = None,
    edit: Annotated[
        bool, typer.Option("--edit", help="Edit all captions in $EDITOR (one `id caption` line per photo).")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Caption a subject's photos with a vision model or templates; set or edit captions by hand."""
    store = open_store()
    subject = store.get_subject(name)
    if set_caption is not None and edit:
        raise BadInputError("use either --set or --edit, not both")
    if set_caption is not None or edit:
        if phrase is not None:
            raise BadInputError("--phrase cannot be combined with --set/--edit; set the phrase first")
        if set_caption is not None:
            _set_one(store, subject, set_caption[0], set_caption[1], force, json_output)
        else:
            _edit(store, subject, force, json_output)
        return
    kind = captioner.strip().lower()
    if kind not in ("openai", "template"):
        raise BadInputError(f"unknown captioner {captioner!r}: use openai or template")
    _run_captioner(
        store,
        subject,
        captioner_kind=kind,
        model=model,
        force=force,
        timeout=timeout,
        retries=retries,
        phrase_option=phrase,
        json_output=json_output,
    )


def register(app: typer.Typer) -> None:
    """Register the `caption` command on `app`."""
    app.command()(caption)
