"""Subjects in the store: add photos (all or nothing), remove a subject or one photo.

`add_photos` is the one photo-intake verb: `stencil add`, the DreamBench runner and the demo call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stencil_cli.base.errors import BadInputError, FieldError, Wording
from stencil_cli.base.images import PreparedImage, RejectedImage, find_photos, prepare_image
from stencil_cli.captioning import validate_phrase
from stencil_cli.store.db import Store
from stencil_cli.store.records import Subject, validate_name
from stencil_cli.verbs.common import removing_subject, subject_lock

RM_WAIT_S = 10.0  # how long `rm` waits for the commands using the subject to finish


@dataclass
class AddRequest:
    """Photos (files or folders) to add to subject `name` (created if needed)."""

    name: str
    paths: list[Path]
    phrase: str | None = None
    class_word: str | None = None
    skip_bad: bool = False  # add the good photos even if some files are bad
    recursive: bool = False  # also the photos in sub-folders of the given folders


@dataclass
class AddOutcome:
    """What adding photos did."""

    subject: Subject
    created: bool
    added: list[dict[str, Any]]
    duplicates: list[Path]
    skipped: list[RejectedImage] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    restored: list[dict[str, Any]] = field(default_factory=list)  # rows whose deleted file was written back
    hidden: int = 0  # hidden files passed over (macOS `._*` and `.DS_Store`, dot files, `__MACOSX`)
    other: int = 0  # files of no photo format passed over in folders and zips (videos, text, ...)


class BadPhotosError(FieldError):
    """Some of the given files are not usable photos; nothing was added. `rejected` names each (one file:
    the message itself names it and why)."""

    def __init__(self, rejected: list[RejectedImage]) -> None:
        if len(rejected) == 1:
            reason = rejected[0].reason
            text = reason.template if isinstance(reason, Wording) else reason
            fields = ("skip_bad", *(reason.fields if isinstance(reason, Wording) else ()))
            message = f"{rejected[0].source}: {text}; nothing added (or pass {{skip_bad}} to add the rest)"
        else:
            fields = ("skip_bad",)
            message = (
                f"{len(rejected)} bad file(s), nothing added; fix or remove them, or pass {{skip_bad}} "
                "to add the rest"
            )
        super().__init__(fields, message)
        self.rejected = rejected


def add_photos(store: Store, request: AddRequest) -> AddOutcome:
    """Check every photo first, then add them all (or, with `skip_bad`, the good ones); see AddOutcome."""
    validate_name(request.name)
    if request.phrase is not None and not request.phrase.strip():
        raise FieldError("phrase", "{0} must not be empty (e.g. {0} 'cat')")
    phrase = validate_phrase(request.phrase)
    try:
        class_word = validate_phrase(request.class_word)
    except BadInputError as error:
        raise BadInputError(str(error).replace("the phrase", "the class word", 1)) from None
    found = find_photos(request.paths, recursive=request.recursive)
    bad = list(found.rejected)
    prepared: list[PreparedImage] = []
    for source in found.sources:
        result = prepare_image(source)
        if isinstance(result, RejectedImage):
            bad.append(result)
        else:
            prepared.append(result)
    if not found.sources and not bad:
        passed = f" (passed over {found.hidden} hidden and {found.other} other file(s))"
        raise BadInputError(
            "no photos found in the given paths"
            + (passed if found.hidden or found.other else "")
            + "; give photo files (JPEG, PNG, HEIC, AVIF, WebP, ...), folders or zips of them"
        )
    if bad and not request.skip_bad:
        raise BadPhotosError(bad)
    if not prepared:
        raise BadInputError("none of the given files is a usable photo, nothing added")
    warnings = [note for image in prepared for note in image.warnings]
    if request.name in store.unindexed_folders():
        warnings.append(
            f"subject folder {request.name!r} exists without a database row: run `stencil store repair` "
            "first to index its old photos, or `store clean` will treat them as leftovers"
        )
    result = store.add_images(
        request.name, prepared, phrase=phrase or class_word, class_word=class_word or phrase
    )
    return AddOutcome(
        subject=result.subject,
        created=result.created_subject,
        added=result.added,
        duplicates=[image.source for image in result.duplicates],
        skipped=bad,
        warnings=warnings,
        restored=result.restored,
        hidden=found.hidden,
        other=found.other,
    )


def remove_subject(store: Store, name: str, *, wait_s: float = RM_WAIT_S) -> Subject:
    """Remove a subject with its photos, runs and images, once no command uses it (waits up to `wait_s`
    seconds for gen, train, caption or eval of it to finish, then refuses)."""
    store.get_subject(name)
    with removing_subject(store, name, wait_s), subject_lock(store, name):
        return store.remove_subject(name)


def remove_photo(store: Store, name: str, image_ref: str, *, wait_s: float = RM_WAIT_S) -> dict[str, Any]:
    """Remove one photo of a subject (by id or sha256 prefix), once no command uses the subject (a training
    reading its photos, say): waits up to `wait_s` seconds, like `remove_subject`."""
    store.get_subject(name)
    with removing_subject(store, name, wait_s):
        return store.remove_image(name, image_ref)
