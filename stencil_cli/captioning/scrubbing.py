"""Secrets never travel on: every form of the API key or the URL's credentials is scrubbed from answers."""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from urllib.parse import quote, unquote, urlsplit

from stencil_cli.base.text import sanitize_text


def _base64_forms(data: bytes) -> set[str]:
    """Base64 texts that reveal `data` wherever it sits in a longer encoded string (3 alignments)."""
    forms: set[str] = set()
    for offset in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * offset + data).decode("ascii")
            if offset == 0:
                forms.add(encoded)  # the whole secret encoded alone, padding included
            start = 4 if offset else 0  # the first group mixes in what comes before
            end = len(encoded) - 4 if (offset + len(data)) % 3 else len(encoded)  # the last, what follows
            core = encoded[start:end]
            if len(core) >= 8:
                forms.add(core)
    return forms


def secret_forms(key: str | None, base_url: str | None = None) -> list[str]:
    """Every form in which the API key or the URL's credentials could come back: raw, URL-quoted, base64
    (as in an `Authorization: Basic` header); longest first, for `scrub_secrets`."""
    raw: list[str] = []
    if key:
        raw += [key, f"Bearer {key}"]
    try:
        parts = urlsplit(base_url or "")
        netloc = parts.netloc
        user, password = parts.username, parts.password
    except ValueError:
        netloc, user, password = "", None, None
    if user is not None or password is not None:
        userinfo = netloc.rsplit("@", 1)[0]
        plain_user, plain_password = unquote(user or ""), unquote(password or "")
        raw += [userinfo, f"{plain_user}:{plain_password}", f"{user or ''}:{password or ''}"]
        if len(plain_password) >= 4:
            raw += [plain_password, password or ""]
    forms: set[str] = set()
    for secret in raw:
        if len(secret) < 4:
            continue
        forms.update({secret, quote(secret, safe="")})
        forms.update(_base64_forms(secret.encode("utf-8")))
    return sorted(forms, key=len, reverse=True)


def scrub_secrets(text: str, forms: Sequence[str]) -> str:
    """`text` with every form of a secret (see secret_forms) replaced by ***."""
    for form in forms:
        if form and form in text:
            text = text.replace(form, "***")
    return text


def display_url(url: str) -> str:
    """`url` safe to show: credentials replaced by ***, control characters removed."""
    return sanitize_text(re.sub(r"//[^/@]*@", "//***@", url))
