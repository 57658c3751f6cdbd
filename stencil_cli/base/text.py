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
