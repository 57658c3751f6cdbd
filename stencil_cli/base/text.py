"""Text from outside (a captioning server, a user's file) made safe to store and to print."""

from __future__ import annotations

import re
import unicodedata

_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x9b[0-?]*[ -/]*[@-~]|\x1b[@-_]?"
)


def sanitize_text(text: str) -> str:
    """`text` without terminal escapes, control characters or invisible format characters (bidi overrides,
    zero-width marks); tabs and newlines become spaces. Applied to everything a server sends before it is
    stored or printed."""
    text = _ESCAPES.sub("", text)
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if char in "\t\n\r\v\f":
            kept.append(" ")
        elif category in ("Cc", "Cf", "Cs", "Co", "Cn") or char in "\u2028\u2029":
            continue
        else:
            kept.append(char)
    return "".join(kept)


# Vowel letters that sound like a consonant ("a unicorn", "a one-eyed cat"), and a silent h ("an hour").
_CONSONANT_SOUND = ("uni", "use", "usu", "uti", "ure", "uro", "eu", "ewe", "one", "once", "ubiq", "ufo")
_VOWEL_SOUND = ("hour", "honest", "honor", "honour", "heir")


def indefinite_article(words: str) -> str:
    """'a' or 'an' for `words`, by the sound of its first word: the one rule every prompt and caption uses.

    A vowel letter takes 'an' except where it sounds like a consonant ('a unicorn', 'a European',
    'a one-eyed'); a consonant takes 'a' except before a silent h ('an hour')."""
    first = words.strip().lower()
    if not first:
        return "a"
    if first.startswith(_VOWEL_SOUND):
        return "an"
    if first[0] in "aeiou" and not first.startswith(_CONSONANT_SOUND):
        return "an"
    return "a"
