"""Prompt rules: the subject prompt, the subject description as a noun phrase, and the draft prompt.

The subject model renders the user's prompt with the subject's phrase ("a cat on the beach"); the
context model renders the *draft prompt*, the same prompt with the phrase replaced by the subject's
description, a noun phrase ("a grey tabby cat with white paws on the beach"). The draft prompt must read as
one sentence that keeps the user's context (it is what Context Guidance injects), and that context must
survive the CLIP text encoders' 77-token window: the description is shortened before any of the user's
prompt is cut.

Pure string functions (a token counter is passed in): no models, no store, no printing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stencil_cli.base.text import indefinite_article

PLACEHOLDERS = ("{subject}", "{}")
ARTICLES = ("a", "an", "the")
CLIP_TOKEN_LIMIT = 77  # CLIP's window, start and end tokens included (SD1.5, SD3's CLIP-L/G)
MAX_DESCRIPTION_WORDS = 25
# words after which a description's own article is dropped ("another {}" -> "another corgi")
DETERMINER_BEFORE = re.compile(
    r"\b(?:another|my|your|his|her|its|our|their|this|that|these|those|each|every|one|no|some)\s+$",
    re.IGNORECASE,
)
# an article followed by 1-3 modifier words right before the phrase ("a red {}", "a cube shaped {}"): the
# description joins that noun phrase, so its own article goes ("a red small nylon backpack")
_LINKING = r"(?:of|in|on|at|to|with|without|by|for|from|next|near|beside|behind|under|over|and|or|is|are)"
MODIFIERS_BEFORE = re.compile(rf"\b(?:a|an|the)\s+(?:(?!{_LINKING}\b)[\w-]+\s+){{1,3}}$", re.IGNORECASE)
SENTENCE_BREAK = re.compile(r"[.!?;:](?:\s|$)")
# openings that make a sentence, not a noun phrase: "It has ...", "The subject is a ..."
_SENTENCE_OPENING = re.compile(
    r"^(?:(?:the|this)\s+(?:subject|object|item|animal|toy|thing)|it|this|they|these|that|there)"
    r"\s+(?:is|are|was|appears|looks|seems)\s+(?:(?:to\s+be|like)\s+)?",
    re.IGNORECASE,
)
_PRONOUN_START = re.compile(r"^(?:it|its|they|their|he|she|his|her|this|these|those|has|have|is|are)\b", re.I)
_DANGLING = {
    "a", "an", "the", "and", "or", "with", "of", "in", "on", "at", "to", "by", "for", "from", "its", "their",
    "made", "featuring", "has", "having", "that", "which", "is", "are",
}  # fmt: skip


# -- the description as a noun phrase -------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return text.split()


def _trim_dangling(text: str) -> str:
    """Drop trailing punctuation and words a noun phrase cannot end on ("..., with", "... and a")."""
    words = _words(text.strip(" ,;:-"))
    while words and (words[-1].lower().strip(",;:") in _DANGLING or not words[-1].strip(",;:-")):
        words.pop()
    return " ".join(words).strip(" ,;:-")


def shorten_noun_phrase(text: str, max_words: int) -> str:
    """`text` cut to at most `max_words` words, at a clause boundary (comma, "with", "and") when one fits."""
    words = _words(text)
    if len(words) <= max_words:
        return _trim_dangling(text)
    head = " ".join(words[:max_words])
    # the longest prefix ending at a clause boundary, if it keeps at least half of the allowance
    cuts = [m.start() for m in re.finditer(r",|\s(?:with|and|featuring|that|which|made)\s", head)]
    for cut in reversed(cuts):
        candidate = _trim_dangling(head[:cut])
        if len(_words(candidate)) >= max(1, max_words // 2):
            return candidate
    return _trim_dangling(head)


def description_problems(text: str | None) -> list[str]:
    """What keeps `text` from being a usable one-noun-phrase description (empty list: none)."""
    if text is None or not text.strip():
        return []
    problems = []
    body = text.strip()
    if SENTENCE_BREAK.search(body.rstrip(".")) or body.endswith((".", "!", "?")):
        problems.append("the description must be one noun phrase without a full stop")
    if len(_words(body)) > MAX_DESCRIPTION_WORDS:
        problems.append(f"the description has {len(_words(body))} words (at most {MAX_DESCRIPTION_WORDS})")
    if _SENTENCE_OPENING.match(body) or _PRONOUN_START.match(body.split(maxsplit=1)[0]):
        problems.append("the description must name the subject, not start a sentence ('It has ...')")
    return problems


def shorter_descriptions(description: str, phrase: str) -> list[str]:
    """Shorter noun phrases from `description`, longest first: cut at clause boundaries (a comma, "with",
    "and", ...) and, if the description names the phrase's head word, cut right after it. Never mid-clause,
    so each keeps the noun it describes ("a small red nylon backpack with black straps" -> "a small red nylon
    backpack")."""
    candidates = []
    boundaries = re.finditer(r",|\s(?:with|and|featuring|that|which|made|in|on)\s", description)
    for match in reversed(list(boundaries)):
        candidate = _trim_dangling(description[: match.start()])
        if candidate and candidate not in candidates and candidate != description:
            candidates.append(candidate)
    head = phrase.split()[-1] if phrase.split() else ""
    found = re.search(rf"^.*?\b{re.escape(head)}\b", description, flags=re.IGNORECASE) if head else None
    if found and found.group(0) not in candidates and found.group(0) != description:
        candidates.append(found.group(0))
    return sorted(candidates, key=lambda c: -len(c))


@dataclass(frozen=True)
class Description:
    """A description ready for the draft prompt, and whether it had to be reduced from what was stored."""

    text: str | None  # None: no usable description (the phrase stands in)
    reduced: bool = False  # True: the stored text was not one noun phrase and was cut down (warn once)
    original: str | None = None


def noun_phrase_description(text: str | None, max_words: int = MAX_DESCRIPTION_WORDS) -> Description:
    """Reduce a stored description to one noun phrase (<= `max_words` words, no full stop).

    A description of several sentences (stores made before descriptions were noun phrases) keeps its first
    sentence, without "The subject is" / "It is" openings; one that cannot be read as a noun phrase ("It has
    silver zippers") gives ``text=None`` so the caller uses the subject's phrase. ``reduced`` says something
    was changed, for a one-time warning.
    """
    original = " ".join((text or "").split())
    if not original:
        return Description(None)
    if not description_problems(original):
        return Description(original, original=original)
    first = re.split(r"(?<=[.!?;])\s+", original, maxsplit=1)[0].rstrip(".!?; ")
    first = _SENTENCE_OPENING.sub("", first).strip()
    if not first or _PRONOUN_START.match(first):
        return Description(None, reduced=True, original=original)
    first = shorten_noun_phrase(first, max_words)
    if not first:
        return Description(None, reduced=True, original=original)
    if first.split()[0] in ("A", "An", "The"):
        first = first[0].lower() + first[1:]
    return Description(first, reduced=True, original=original)


# -- the prompts ----------------------------------------------------------------------------------------


def _article(words: str) -> str:
    return indefinite_article(words)


def _with_article(words: str) -> str:
    """`words` with an indefinite article in front unless it already starts with an article."""
    first = words.split(maxsplit=1)[0].lower() if words.split() else ""
    return words if first in ARTICLES else f"{_article(words)} {words}"


def _without_article(words: str) -> str:
    parts = words.split(maxsplit=1)
    return parts[1] if len(parts) > 1 and parts[0].lower() in ARTICLES else words


def _substitute(text: str, pattern: str, replacement: str) -> str:
    """Replace `pattern` (regex) in `text`, absorbing a preceding article when `replacement` has its own."""
    has_article = replacement.split(maxsplit=1)[0].lower() in ARTICLES if replacement.split() else False

    def repl(match: re.Match[str]) -> str:
        article = match.group("article")
        if article and has_article:
            return replacement
        before = match.string[: match.start()]
        joins = DETERMINER_BEFORE.search(before) or MODIFIERS_BEFORE.search(before)
        if not article and has_article and joins:
            return _without_article(replacement)
        if article:
            fixed = _article(replacement) if article.lower() in ("a", "an") else article
            if article[:1].isupper():
                fixed = fixed.capitalize()
            return f"{fixed}{match.group('space')}{replacement}"
        return replacement

    regex = re.compile(rf"(?:(?P<article>\b(?:a|an|the|A|An|The))(?P<space>\s+))?{pattern}")
    return regex.sub(repl, text)


@dataclass(frozen=True)
class Prompts:
    """The subject prompt (for the fine-tuned model) and the draft prompt (for the context model).

    ``description`` is the description as used in the draft (None: the phrase stood in);
    ``description_reduced``: the stored description was not one noun phrase and was reduced (warn once);
    ``shortened``: the description was shortened to keep the draft within the token limit;
    ``cut``: the words of the draft prompt past the token limit that the context model will not read (None:
    nothing is lost); ``overridden``: the draft prompt was given by hand or written by a vision model.
    """

    prompt: str
    draft_prompt: str
    description: str | None = None
    description_reduced: bool = False
    shortened: bool = False
    cut: str | None = None
    overridden: bool = False


TokenCounter = Callable[[str], int]


def clip_token_counter(tokenizer: Any) -> TokenCounter:
    """A counter of `tokenizer`'s tokens for a text, start and end tokens included (CLIP's window: 77)."""

    def count(text: str) -> int:
        return len(tokenizer(text, truncation=False)["input_ids"])

    return count


def words_past_limit(text: str, count_tokens: TokenCounter, limit: int = CLIP_TOKEN_LIMIT) -> str | None:
    """The trailing words of `text` that fall past `limit` tokens (None when everything fits)."""
    if count_tokens(text) <= limit:
        return None
    words = _words(text)
    keep = len(words)
    while keep > 0 and count_tokens(" ".join(words[:keep])) > limit:
        keep -= 1
    return " ".join(words[keep:]) or None


def _draft(text: str, phrase: str, description: str) -> str:
    placeholder = "|".join(re.escape(p) for p in PLACEHOLDERS)
    if re.search(placeholder, text):
        return _substitute(text, f"(?:{placeholder})", description)
    phrase_pattern = rf"\b{re.escape(phrase)}\b"
    if re.search(phrase_pattern, text, flags=re.IGNORECASE):
        return _substitute(text, f"(?i:{phrase_pattern})", description)
    return f"{_with_article(description)} {text}"


def build_prompts(
    user_prompt: str,
    phrase: str,
    description: str | None = None,
    *,
    draft_prompt: str | None = None,
    count_tokens: TokenCounter | None = None,
    token_limit: int = CLIP_TOKEN_LIMIT,
) -> Prompts:
    """Apply the prompt rules: placeholders, or the subject phrase, or prefix "a {phrase}".

    ``{}`` / ``{subject}`` become the phrase (draft: the description); a prompt that already names the phrase
    is kept (draft: the phrase replaced by the description); otherwise the prompt becomes
    ``"a {phrase} {prompt}"``. The description is first reduced to one noun phrase
    (`noun_phrase_description`). With `count_tokens`, the description is shortened (down to the phrase) until
    the draft prompt fits `token_limit` tokens, so the user's context is never what the encoder drops; what
    still falls past the limit is reported in ``cut``. `draft_prompt` (by hand, or from a vision model)
    replaces the rule-made draft. Raises ValueError for an empty prompt or phrase.
    """
    text = " ".join(user_prompt.split())
    phrase = " ".join((phrase or "").split())
    if not text:
        raise ValueError("the prompt is empty")
    if not phrase:
        raise ValueError("the subject phrase is empty")
    placeholder = "|".join(re.escape(p) for p in PLACEHOLDERS)
    if re.search(placeholder, text):
        prompt = _substitute(text, f"(?:{placeholder})", phrase)
    elif re.search(rf"\b{re.escape(phrase)}\b", text, flags=re.IGNORECASE):
        prompt = text
    else:
        prompt = f"{_with_article(phrase)} {text}"
    if draft_prompt is not None and draft_prompt.strip():
        draft = " ".join(draft_prompt.split())
        cut = words_past_limit(draft, count_tokens, token_limit) if count_tokens else None
        return Prompts(prompt, draft, cut=cut, overridden=True)
    usable = noun_phrase_description(description)
    chosen = usable.text or phrase
    draft = _draft(text, phrase, chosen)
    shortened = False
    if count_tokens is not None and usable.text and count_tokens(draft) > token_limit:
        chosen, shortened = phrase, True
        for shorter in shorter_descriptions(usable.text, phrase):
            if count_tokens(_draft(text, phrase, shorter)) <= token_limit:
                chosen = shorter
                break
        draft = _draft(text, phrase, chosen)
    cut = words_past_limit(draft, count_tokens, token_limit) if count_tokens else None
    return Prompts(
        prompt=prompt,
        draft_prompt=draft,
        description=chosen if usable.text else None,
        description_reduced=usable.reduced,
        shortened=shortened,
        cut=cut,
    )


# -- a draft prompt written by a vision model -------------------------------------------------------------

MAX_REWRITE_WORDS = 60


def rewrite_instructions(user_prompt: str, phrase: str, description: str | None) -> str:
    """The instruction a vision model gets to write the draft prompt itself (the reference code's
    "augmented prompt"): one sentence combining the user's prompt and the subject's look."""
    look = f' Its appearance, as described before: "{description}".' if description else ""
    return (
        "Write one prompt for a text-to-image model that renders the subject of the photos in this scene: "
        f'"{user_prompt}". The subject is the {phrase} shown in the photos.{look} '
        "Describe the subject's look (colours, materials, shape, markings) in a noun phrase and keep every "
        "part of the scene from the prompt, after the subject. Answer with the prompt only: one sentence, no "
        f"full stop inside, no quotes, at most {MAX_REWRITE_WORDS} words."
    )


def clean_rewritten_prompt(text: str | None) -> str | None:
    """A vision model's draft prompt, cleaned (quotes, trailing full stop), or None when it is not usable:
    empty, several sentences or lines, or longer than MAX_REWRITE_WORDS words (then the rules are used)."""
    if not text:
        return None
    body = " ".join(text.strip().strip("\"'`").split()).rstrip(".").strip("\"' ")
    if body.lower().startswith("prompt:"):
        body = body[len("prompt:") :].strip()
    if not body or "\n" in text.strip() or SENTENCE_BREAK.search(body):
        return None
    if len(_words(body)) > MAX_REWRITE_WORDS:
        return None
    return body
