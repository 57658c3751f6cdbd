"""Caption a subject's photos with a vision model or templates; set or edit captions by hand.

`caption(store, CaptionRequest)` is the one captioning verb (the CLI, the DreamBench runner and the demo call
it): it settles the phrase, picks the photos to caption, asks the captioner, checks the answer (every photo,
each caption with the phrase) and stores it in one transaction, or stores nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from stencil_cli import captioning
from stencil_cli.base.errors import BadInputError, FieldError, StencilError
from stencil_cli.base.events import Captioned, Captioning, Progress, no_progress
from stencil_cli.base.text import sanitize_text
from stencil_cli.captioning import CaptionResult, Photo, clean_phrase, contains_phrase
from stencil_cli.store.db import Store
from stencil_cli.store.records import Subject
from stencil_cli.verbs.common import refuse_missing_photos, using_subject

MANUAL_SOURCE = "manual"
DEFAULT_TIMEOUT_S = captioning.DEFAULT_TIMEOUT_S
DEFAULT_RETRIES = captioning.DEFAULT_RETRIES
DEFAULT_BACKOFF_S = captioning.DEFAULT_BACKOFF_S
REPAIRED_SUFFIX = "+phrase-inserted"
CaptionerName = Literal["openai", "template"]  # the vision model (OpenAI-compatible), or offline templates

EDIT_HEADER = """\
# Captions of subject {name!r}; the phrase is {phrase!r}.
# One photo per line: ID, a tab (or spaces), then the caption. Each caption must contain the phrase.
# Lines starting with '#' are ignored; a photo whose line you delete keeps its caption.
"""


@dataclass
class CaptionRequest:
    """Caption a subject's photos (those without a caption, or all with `force`)."""

    name: str
    captioner: CaptionerName = "openai"
    model: str | None = None  # vision model (default: stored `caption_model`, else gpt-4o)
    force: bool = False
    phrase: str | None = None  # set the subject phrase first (changing an existing one needs `force`)
    timeout: float = captioning.DEFAULT_TIMEOUT_S
    retries: int = captioning.DEFAULT_RETRIES
    backoff: float = captioning.DEFAULT_BACKOFF_S


@dataclass
class CaptionOutcome:
    """The subject after captioning, and what changed."""

    subject: Subject
    captioned: list[int] = field(default_factory=list)
    repaired: list[int] = field(default_factory=list)
    source: str | None = None
    notes: list[str] = field(default_factory=list)  # warnings from the captioner (e.g. repaired captions)

    def extra(self) -> dict[str, Any]:
        """What changed, JSON-ready."""
        return {"captioned": self.captioned, "repaired": self.repaired, "source": self.source}


def resolve_caption_model(store: Store, model: str | None) -> str:
    """The vision model: the one given, else the stored `caption_model`, else gpt-4o."""
    return model or store.get_config("caption_model") or captioning.DEFAULT_MODEL


def caption(store: Store, request: CaptionRequest, *, progress: Progress = no_progress) -> CaptionOutcome:
    """Caption the photos that need it; see the module docstring.

    Progress: `Captioning` (how many photos, the captioner, its host or None) before the request and
    `Captioned` after it.
    """
    kind = request.captioner.strip().lower()
    if kind not in ("openai", "template"):
        raise FieldError("captioner", f"must be openai or template (got {request.captioner!r})")
    store.get_subject(request.name)  # a clear NotFoundError before a lock file is named after it
    with using_subject(store, request.name):
        return _caption(store, request, kind, progress)


def _caption(store: Store, request: CaptionRequest, kind: str, progress: Progress) -> CaptionOutcome:
    """`caption` while the subject is held (`stencil rm` waits for it)."""
    subject = store.get_subject(request.name)
    if not subject.images:
        raise StencilError(
            f"subject {subject.name!r} has no photos (add some with `stencil add {subject.name} ...`)"
        )
    phrase, phrase_changed = settle_phrase(subject, request.phrase, request.force)
    refuse_missing_photos(store, subject.name)
    redo_all = request.force or (phrase_changed and subject.phrase is not None)
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
        return CaptionOutcome(subject)
    model_name = resolve_caption_model(store, request.model)
    captioner = captioning.make_captioner(
        kind, model=model_name, timeout_s=request.timeout, retries=request.retries, backoff_s=request.backoff
    )
    photos = [Photo(id=image["id"], path=store.absolute(image["file"])) for image in targets]
    host = captioner.host if isinstance(captioner, captioning.OpenAICaptioner) else None
    progress(Captioning(len(photos), captioner.name, host))
    result = captioner.caption(
        captioning.CaptionJob(photos=photos, phrase=phrase, class_word=subject.class_word)
    )
    progress(Captioned(len(photos)))
    validate_result(result, photos)
    phrase_to_store = result.phrase if (subject.phrase is None or phrase_changed) else None
    store_result(
        store, subject, result, phrase_to_store=phrase_to_store, all_photos=len(photos) == len(subject.images)
    )
    return CaptionOutcome(
        store.get_subject(subject.name),
        captioned=sorted(result.captions),
        repaired=sorted(result.repaired),
        source=result.source,
        notes=list(result.notes),
    )


def settle_phrase(subject: Subject, phrase_option: str | None, force: bool) -> tuple[str | None, bool]:
    """The phrase to caption with, and whether it changes the stored one (which means recaptioning all)."""
    if phrase_option is None:
        return subject.phrase, False
    phrase = clean_phrase(phrase_option)
    if phrase is not None:
        phrase = captioning.validate_phrase(phrase)
    if phrase is None:
        raise FieldError("phrase", "{0} must not be empty (e.g. {0} 'cat')")
    if subject.phrase is None or phrase == subject.phrase:
        return phrase, subject.phrase is None
    if not force:
        raise FieldError(
            ("phrase", "force"),
            f"subject {subject.name!r} already has the phrase {subject.phrase!r}; "
            "pass {1} with {0} to change it and recaption every photo",
        )
    return phrase, True


def store_result(
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


def validate_result(result: CaptionResult, photos: list[Photo]) -> None:
    """Refuse an answer that misses a photo or has a caption without the phrase (whatever the captioner)."""
    wanted = {photo.id for photo in photos}
    if set(result.captions) != wanted:
        raise StencilError(f"the {result.source} captioner did not caption every photo; nothing was stored")
    lacking = [pid for pid, text in result.captions.items() if not contains_phrase(text, result.phrase)]
    if lacking:
        raise StencilError(
            f"captions of photos {lacking} lack the phrase {result.phrase!r}; nothing was stored"
        )


# -- by hand ---------------------------------------------------------------------------------------------


def check_text(text: str, phrase: str | None, force: bool, where: str) -> str:
    """Normalise a hand-written caption; refuse it if it lacks the phrase (unless `force`) or is too long.

    Control characters and terminal escapes are dropped (as from a captioning server)."""
    text = " ".join(sanitize_text(text).split())
    if not text:
        raise BadInputError(f"{where}: the caption is empty")
    if len(text) > captioning.MAX_CAPTION_CHARS:
        raise BadInputError(
            f"{where}: the caption is {len(text)} characters long; at most {captioning.MAX_CAPTION_CHARS}"
        )
    if phrase and not force and not contains_phrase(text, phrase):
        raise FieldError(
            "force",
            f"{where}: the caption does not contain the subject phrase {phrase!r}; "
            "training locates the subject by it (pass {} to store it anyway)",
        )
    return text


def set_caption(store: Store, name: str, image_ref: str, text: str, *, force: bool = False) -> CaptionOutcome:
    """Set one photo's caption by hand (it must contain the phrase unless `force`)."""
    subject = store.get_subject(name)
    image = store.resolve_image(subject, image_ref)
    text = check_text(text, subject.phrase, force, f"photo {image['id']}")
    store.set_captions(subject.name, {image["id"]: text}, MANUAL_SOURCE)
    return CaptionOutcome(store.get_subject(name), captioned=[image["id"]], source=MANUAL_SOURCE)


def edit_text(subject: Subject) -> str:
    """The text opened in an editor: a comment header, then `id<TAB>caption` per photo."""
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
        captions[image_id] = check_text(rest, subject.phrase, force, f"{where} (photo {image_id})")
    return captions


def apply_edited_captions(store: Store, name: str, edited: str, *, force: bool = False) -> CaptionOutcome:
    """Store the captions changed in an edited `edit_text` (all checked first; nothing stored on error)."""
    subject = store.get_subject(name)
    captions = parse_edit_text(edited, subject, force)
    current = {image["id"]: image["caption"] for image in subject.images}
    changed = {image_id: text for image_id, text in captions.items() if text != current.get(image_id)}
    if changed:
        store.set_captions(subject.name, changed, MANUAL_SOURCE)
    return CaptionOutcome(store.get_subject(name), captioned=sorted(changed), source=MANUAL_SOURCE)
