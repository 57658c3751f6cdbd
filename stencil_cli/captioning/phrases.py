"""The subject phrase: cleaning and checking it, finding it in a caption, putting it into one."""

from __future__ import annotations

import re

from stencil_cli.base.errors import BadInputError
from stencil_cli.base.text import indefinite_article, sanitize_text

MAX_PHRASE_WORDS = 6
MAX_PHRASE_CHARS = 60
PHRASE_PUNCTUATION = frozenset(" -'’&.,+")


def clean_phrase(phrase: str | None) -> str | None:
    """Collapse whitespace and strip quotes/punctuation around a phrase; None if nothing is left."""
    if phrase is None:
        return None
    text = " ".join(str(phrase).split()).strip(" \"'.,;:!?")
    return text or None


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    words = [re.escape(word) for word in phrase.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", re.IGNORECASE)


def contains_phrase(text: str, phrase: str) -> bool:
    """True if `text` contains `phrase` as whole words (case and spacing ignored, as CLIP tokenizes)."""
    return bool(text) and bool(_phrase_pattern(phrase).search(text))


def article(phrase: str) -> str:
    """'a' or 'an' for `phrase` (`base.text.indefinite_article`, the one rule)."""
    return indefinite_article(phrase)


def insert_phrase(caption: str, phrase: str) -> str:
    """Make `caption` contain `phrase`: prefix it with 'a photo of a PHRASE' (used after a failed retry)."""
    caption = caption.strip()
    prefix = f"a photo of {article(phrase)} {phrase}"
    return f"{prefix}: {caption}" if caption else prefix


def phrase_problem(phrase: str) -> str | None:
    """What is wrong with `phrase` as a subject phrase (None if fine): words of letters and digits with a
    little punctuation (- ' & . , +), at most MAX_PHRASE_WORDS words and MAX_PHRASE_CHARS characters."""
    if len(phrase) > MAX_PHRASE_CHARS:
        return f"is longer than {MAX_PHRASE_CHARS} characters"
    if len(phrase.split()) > MAX_PHRASE_WORDS:
        return f"has more than {MAX_PHRASE_WORDS} words"
    bad = sorted({char for char in phrase if not (char.isalnum() or char in PHRASE_PUNCTUATION)})
    if bad:
        return "may only hold letters, digits, spaces and - ' & . , + (not " + " ".join(map(repr, bad)) + ")"
    if not any(char.isalnum() for char in phrase):
        return "has no letters or digits"
    return None


def validate_phrase(phrase: str | None) -> str | None:
    """`phrase` cleaned (see clean_phrase), or BadInputError saying what is wrong with it."""
    cleaned = clean_phrase(phrase)
    if cleaned is None:
        return None
    problem = phrase_problem(cleaned)
    if problem:
        shown = sanitize_text(cleaned)[:80]
        raise BadInputError(f"the phrase {shown!r} {problem}", hint="e.g. 'cat', 'toy robot', 'red backpack'")
    return cleaned
