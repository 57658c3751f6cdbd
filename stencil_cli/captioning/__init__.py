"""Captioners: an OpenAI vision captioner (structured JSON answer) and an offline template captioner.

A captioner takes a subject's photos and returns, per photo, a caption that contains the subject phrase
(METHOD.md, section 1), plus the phrase itself and, from a vision model, a description of the subject's
appearance. This package never touches the store and never prints: the `caption` verb glues.

- `protocol`: what a captioner gets (`CaptionJob`) and gives (`CaptionResult`);
- `phrases`: the subject phrase (clean, check, find, insert);
- `template`: the offline template captioner;
- `client`: the OpenAI-compatible vision captioner (requests, retries, deadlines, errors);
- `answers`: parsing, checking and repairing a model's answer;
- `scrubbing`: keeping the API key and the URL's credentials out of everything that comes back.
"""

from __future__ import annotations

from stencil_cli.base.errors import BadInputError
from stencil_cli.captioning.answers import (
    MAX_CAPTION_CHARS,
    MAX_DESCRIPTION_CHARS,
    ParsedAnswer,
    bound_result,
    parse_answer,
)
from stencil_cli.captioning.client import (
    BASE_URL_ENV,
    DEFAULT_BACKOFF_S,
    DEFAULT_MODEL,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_S,
    KEY_ENV,
    OpenAICaptioner,
    RetryPolicy,
    check_base_url,
)
from stencil_cli.captioning.phrases import (
    clean_phrase,
    contains_phrase,
    insert_phrase,
    phrase_problem,
    validate_phrase,
)
from stencil_cli.captioning.protocol import Captioner, CaptionJob, CaptionResult, Photo
from stencil_cli.captioning.scrubbing import display_url, scrub_secrets, secret_forms
from stencil_cli.captioning.template import TemplateCaptioner, template_caption

__all__ = [
    "BASE_URL_ENV",
    "DEFAULT_BACKOFF_S",
    "DEFAULT_MODEL",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT_S",
    "KEY_ENV",
    "MAX_CAPTION_CHARS",
    "MAX_DESCRIPTION_CHARS",
    "CaptionJob",
    "CaptionResult",
    "Captioner",
    "OpenAICaptioner",
    "ParsedAnswer",
    "Photo",
    "RetryPolicy",
    "TemplateCaptioner",
    "bound_result",
    "check_base_url",
    "clean_phrase",
    "contains_phrase",
    "display_url",
    "insert_phrase",
    "make_captioner",
    "parse_answer",
    "phrase_problem",
    "scrub_secrets",
    "secret_forms",
    "template_caption",
    "validate_phrase",
]


def make_captioner(
    kind: str,
    *,
    model: str = DEFAULT_MODEL,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    retries: int = DEFAULT_RETRIES,
    backoff_s: float = DEFAULT_BACKOFF_S,
) -> Captioner:
    """Build the captioner called `kind` ('openai' or 'template')."""
    if kind == "template":
        return TemplateCaptioner()
    if kind == "openai":
        if retries < 0:
            raise BadInputError("{retries} must be 0 or more", fields=("retries",))
        return OpenAICaptioner(
            model=model, timeout_s=timeout_s, retry=RetryPolicy(retries=retries, backoff_s=backoff_s)
        )
    raise BadInputError(f"unknown captioner {kind!r}: use openai or template")
