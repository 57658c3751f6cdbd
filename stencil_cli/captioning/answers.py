"""A vision model's answer: parsed, checked against the request, repaired where it can be, and bounded."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stencil_cli.base.text import sanitize_text
from stencil_cli.captioning.phrases import (
    MAX_PHRASE_WORDS,
    clean_phrase,
    contains_phrase,
    insert_phrase,
    phrase_problem,
)
from stencil_cli.captioning.protocol import CaptionResult, Photo
from stencil_cli.core.prompts import description_problems, noun_phrase_description

MAX_DESCRIPTION_CHARS = 1000  # longer descriptions are cut at a word boundary
MAX_CAPTION_CHARS = 600  # 15-40 words asked; CLIP reads 77 tokens anyway


@dataclass
class ParsedAnswer:
    """A model's answer checked against the request: what it says and what is wrong with it."""

    phrase: str | None
    description: str | None
    captions: dict[int, str]  # photo id -> caption (as given)
    problems: list[str]
    structural: bool  # True if the problems go beyond captions lacking the phrase

    @property
    def repairable(self) -> bool:
        """True if only captions lacking the phrase are wrong (which inserting the phrase fixes)."""
        return not self.structural and self.phrase is not None

    def to_result(self, source: str, *, repair: bool = False) -> CaptionResult:
        """The answer as a CaptionResult, inserting the phrase where a caption lacks it if `repair`."""
        assert self.phrase is not None
        captions: dict[int, str] = {}
        repaired: list[int] = []
        for photo_id, text in self.captions.items():
            if contains_phrase(text, self.phrase):
                captions[photo_id] = text
            elif repair:
                captions[photo_id] = insert_phrase(text, self.phrase)
                repaired.append(photo_id)
            else:
                raise AssertionError("unrepaired caption without the phrase")
        notes = []
        if repaired:
            notes.append(f"inserted the phrase {self.phrase!r} into the caption of photo(s) {repaired}")
        description = self.description
        if repair and description_problems(description):
            reduced = noun_phrase_description(description).text
            notes.append(
                f"reduced the description to one noun phrase ({reduced!r})"
                if reduced
                else "dropped a description that was not a noun phrase (the phrase stands in)"
            )
            description = reduced
        return CaptionResult(
            phrase=self.phrase,
            captions=captions,
            source=source,
            description=description,
            repaired=repaired,
            notes=notes,
        )


def parse_answer(text: str, photos: Sequence[Photo], phrase: str | None) -> ParsedAnswer:
    """Parse and check a model's JSON answer for `photos`; `phrase` (if given) overrides the answer's."""
    problems: list[str] = []
    data = load_json(text)
    if not isinstance(data, dict):
        what = "empty answer" if not (text or "").strip() else "the answer is not a JSON object"
        return ParsedAnswer(phrase, None, {}, [what], structural=True)
    structural = False
    answered = clean_phrase(data.get("phrase")) if isinstance(data.get("phrase"), str) else None
    if phrase is None:
        if answered is None:
            problems.append("'phrase' is missing or empty")
            structural = True
        elif len(answered.split()) > MAX_PHRASE_WORDS:
            problems.append(f"'phrase' is too long ({answered!r}; use 1-4 words)")
            structural = True
            answered = None
        elif phrase_problem(answered):
            problems.append(f"'phrase' {phrase_problem(answered)} ({answered!r})")
            structural = True
            answered = None
        phrase = answered
    description = data.get("description")
    description = (
        " ".join(description.split()) if isinstance(description, str) and description.strip() else None
    )
    problems.extend(description_problems(description))  # repairable: reduced to a noun phrase
    by_id = {photo.id: photo for photo in photos}
    captions: dict[int, str] = {}
    items = data.get("captions")
    if isinstance(items, dict):  # {"1": "...", "2": "..."} is a common variation: accept it
        items = [{"photo": key, "caption": value} for key, value in items.items()]
    if not isinstance(items, list):
        problems.append("'captions' is missing or not a list")
        items = []
        structural = True
    for item in items:
        if not isinstance(item, dict):
            continue
        number = _as_int(item.get("photo", item.get("image", item.get("id"))))
        text_value = item.get("caption")
        if number is None or number not in by_id:
            problems.append(f"caption for unknown photo {item.get('photo')!r}")
            structural = True
            continue
        if not isinstance(text_value, str) or not text_value.strip():
            continue  # reported below as missing
        captions[number] = " ".join(text_value.split())
    missing = [photo.id for photo in photos if photo.id not in captions]
    if missing:
        problems.append(f"no caption for photo(s) {missing}")
        structural = True
    if phrase is not None:
        lacking = [
            photo.id
            for photo in photos
            if photo.id in captions and not contains_phrase(captions[photo.id], phrase)
        ]
        if lacking:
            problems.append(f"the caption(s) of photo(s) {lacking} lack the phrase {phrase!r}")
    return ParsedAnswer(phrase, description, captions, problems, structural)


def load_json(text: str | None) -> Any:
    if not text:
        return None
    stripped = text.strip()
    fenced = re.match(
        r"^```(?:json)?\s*(.*?)\s*```$", stripped, re.DOTALL
    )  # some servers wrap JSON in fences
    if fenced:
        stripped = fenced.group(1)
    try:
        return _clean_tree(json.loads(stripped))
    except (ValueError, RecursionError):
        return None


def _clean_tree(value: Any, depth: int = 0) -> Any:
    """`value` (parsed JSON) with every string passed through `sanitize_text`; too deep -> RecursionError."""
    if depth > 64:
        raise RecursionError("answer nested too deeply")
    if isinstance(value, str):
        return sanitize_text(value)
    if isinstance(value, list):
        return [_clean_tree(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {sanitize_text(str(key)): _clean_tree(item, depth + 1) for key, item in value.items()}
    return value


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = re.search(r"\d+", value)
        return int(match.group()) if match else None
    return None


def _truncate_words(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:")


def bound_result(result: CaptionResult) -> CaptionResult:
    """Cut overlong captions and descriptions (at a word boundary), keeping the phrase in every caption."""
    cut: list[int] = []
    for photo_id, caption in result.captions.items():
        if len(caption) <= MAX_CAPTION_CHARS:
            continue
        shorter = _truncate_words(caption, MAX_CAPTION_CHARS)
        if not contains_phrase(shorter, result.phrase):
            room = MAX_CAPTION_CHARS - len(insert_phrase("", result.phrase)) - 2
            shorter = insert_phrase(_truncate_words(caption, max(room, 0)), result.phrase)
        result.captions[photo_id] = shorter
        cut.append(photo_id)
    if cut:
        result.notes.append(f"cut the caption(s) of photo(s) {cut} to {MAX_CAPTION_CHARS} characters")
    if result.description and len(result.description) > MAX_DESCRIPTION_CHARS:
        result.description = _truncate_words(result.description, MAX_DESCRIPTION_CHARS)
        result.notes.append(f"cut the description to {MAX_DESCRIPTION_CHARS} characters")
    return result
