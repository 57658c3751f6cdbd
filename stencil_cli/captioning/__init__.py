"""Captioners: an OpenAI vision captioner (structured JSON answer) and an offline template captioner.

A captioner takes a subject's photos and returns, per photo, a caption that contains the subject phrase
(METHOD.md, section 1), plus the phrase itself and, from a vision model, a description of the subject's
appearance. This module never touches the store and never prints: the `caption` command glues.

The API key is read from ``OPENAI_API_KEY`` only, passed to the client in memory, and never written anywhere.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import random
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlsplit

from PIL import Image

from stencil_cli.base.errors import BadInputError, StencilError
from stencil_cli.base.images import load_rgb
from stencil_cli.base.text import sanitize_text
from stencil_cli.core.prompts import (
    MAX_DESCRIPTION_WORDS,
    clean_rewritten_prompt,
    description_problems,
    noun_phrase_description,
    rewrite_instructions,
)

KEY_ENV = "OPENAI_API_KEY"
BASE_URL_ENV = "OPENAI_BASE_URL"
DEFAULT_MODEL = "gpt-4o"
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
MAX_SIDE = 512  # photos are downscaled so the longer side is at most this before upload
MAX_PHOTOS_PER_REQUEST = 16
MAX_PHRASE_WORDS = 6
MAX_PHRASE_CHARS = 60
MAX_DESCRIPTION_CHARS = 1000  # longer descriptions are cut at a word boundary
MAX_CAPTION_CHARS = 600  # 15-40 words asked; CLIP reads 77 tokens anyway
MAX_ANSWER_CHARS = 1_000_000  # a whole answer beyond this is refused before parsing

TEMPLATES = (
    "a photo of {a} {phrase}",
    "a close-up photo of {a} {phrase}",
    "a good photo of the {phrase}",
    "a bright photo of the {phrase}",
    "a cropped photo of {a} {phrase}",
    "a photo of the {phrase} seen from the side",
    "a clean photo of {a} {phrase}",
    "a photo of my {phrase}",
)


# -- data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Photo:
    """One photo to caption: its store id and its file."""

    id: int
    path: Path


@dataclass(frozen=True)
class CaptionRequest:
    """What a captioner gets: the subject's phrase (None if the user gave none) and the photos to caption."""

    photos: Sequence[Photo]
    phrase: str | None = None
    class_word: str | None = None


@dataclass
class CaptionResult:
    """A complete, validated answer: one caption per requested photo, each containing `phrase`."""

    phrase: str
    captions: dict[int, str]
    source: str
    description: str | None = None
    repaired: list[int] = field(default_factory=list)  # photo ids whose caption got the phrase inserted
    notes: list[str] = field(default_factory=list)  # what was retried or repaired, for the user


class Captioner(Protocol):
    """Anything that turns a CaptionRequest into a CaptionResult (or raises StencilError)."""

    name: str

    def caption(self, request: CaptionRequest) -> CaptionResult:
        """Caption every photo of `request`."""
        ...


# -- phrase helpers -------------------------------------------------------------------------------


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
    """'a' or 'an' for `phrase` (by its first letter; good enough for captions)."""
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def insert_phrase(caption: str, phrase: str) -> str:
    """Make `caption` contain `phrase`: prefix it with 'a photo of a PHRASE' (used after a failed retry)."""
    caption = caption.strip()
    prefix = f"a photo of {article(phrase)} {phrase}"
    return f"{prefix}: {caption}" if caption else prefix


def template_caption(phrase: str, index: int) -> str:
    """The `index`-th template caption for `phrase` ("a photo of a cat", "a close-up photo of a cat", ...)."""
    template = TEMPLATES[index % len(TEMPLATES)]
    return template.format(a=article(phrase), phrase=phrase)


# -- template captioner ---------------------------------------------------------------------------


class TemplateCaptioner:
    """Offline captions from templates ("a photo of a {phrase}"); needs a phrase, gives no description."""

    name = "template"

    def caption(self, request: CaptionRequest) -> CaptionResult:
        """Caption each photo with a rotating template around the subject's phrase (or class word)."""
        phrase = validate_phrase(request.phrase) or validate_phrase(request.class_word)
        if phrase is None:
            raise StencilError(
                "the template captioner needs the subject's phrase, and this subject has none",
                hint="pass {phrase='cat'} (or set it with `stencil add NAME {add.phrase=...}`)",
                fields=("phrase", "add.phrase"),
            )
        captions = {photo.id: template_caption(phrase, index) for index, photo in enumerate(request.photos)}
        return CaptionResult(phrase=phrase, captions=captions, source="template")

    def write_draft_prompt(
        self, photos: Sequence[Photo], user_prompt: str, phrase: str, description: str | None
    ) -> str | None:
        """No vision model: None, so the prompt rules (`prompts.build_prompts`) write the draft prompt."""
        return None


# -- OpenAI vision captioner ----------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff for network errors, HTTP 429 and 5xx."""

    retries: int = DEFAULT_RETRIES
    backoff_s: float = DEFAULT_BACKOFF_S  # first wait; doubles each time (with jitter)
    max_backoff_s: float = MAX_BACKOFF_S

    def wait(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0-based); honours a server's Retry-After, capped."""
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.max_backoff_s)
        delay = self.backoff_s * (2**attempt)
        return min(delay * (0.75 + 0.25 * random.random()), self.max_backoff_s)


ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "phrase": {"type": "string", "description": "short subject phrase, 1-4 words, e.g. 'toy robot'"},
        "description": {
            "type": "string",
            "description": f"the subject's appearance as ONE noun phrase, no full stop, at most "
            f"{MAX_DESCRIPTION_WORDS} words, e.g. 'a small red nylon backpack with black straps'",
        },
        "captions": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "photo": {"type": "integer", "description": "the photo's number as labelled"},
                    "caption": {"type": "string"},
                },
                "required": ["photo", "caption"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["phrase", "description", "captions"],
    "additionalProperties": False,
}

SYSTEM_PROMPT = """You write training captions for a personalised text-to-image model.
All photos show the same subject (one object, animal or person) that the model will learn.
Answer with JSON only, in this shape:
{"phrase": "...", "description": "...", "captions": [{"photo": 1, "caption": "..."}, ...]}
- phrase: the short words the subject is bound to, 1-4 lowercase words naming what it is
  (e.g. "cat", "toy robot", "red backpack"); no names, no articles.
- description: the subject's appearance as ONE noun phrase that names the subject, with no full stop and at
  most 25 words: colours, materials, shapes, markings (e.g. "a small red nylon backpack with black straps
  and a white logo patch"). Describe the subject only, not the backgrounds. It replaces the phrase inside
  other prompts ("<description> next to the Eiffel tower"), so it must not be a sentence.
- captions: exactly one per photo, using the photo numbers given. Each caption is one detailed sentence
  of 15-40 words that contains the phrase verbatim early on, and describes the setting, background,
  lighting, pose and viewpoint of that photo (details that belong to the photo, not to the subject)."""


REWRITE_SYSTEM_PROMPT = 'You write text-to-image prompts. Answer with JSON only: {"prompt": "..."}'
DRAFT_PROMPT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"prompt": {"type": "string", "description": "one sentence, the subject first"}},
    "required": ["prompt"],
    "additionalProperties": False,
}


def _fixed_phrase_rule(phrase: str) -> str:
    return f'The phrase is fixed: use exactly "{phrase}" as the phrase and in every caption.'


class OpenAICaptioner:
    """Captions from a vision model behind the OpenAI chat completions API (OpenAI or a compatible server)."""

    def __init__(
        self,
        *,
        model: str = DEFAULT_MODEL,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        max_side: int = MAX_SIDE,
        detail: str = "high",
        response_format: str = "json_schema",
        max_photos_per_request: int = MAX_PHOTOS_PER_REQUEST,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        key = api_key if api_key is not None else os.environ.get(KEY_ENV, "")
        if not key.strip():
            raise StencilError(
                f"{KEY_ENV} is not set: export your OpenAI API key as {KEY_ENV} "
                f"(or {BASE_URL_ENV} for a compatible server), or caption offline with "
                "`{captioner=template}`",
                fields=("captioner",),
            )
        if timeout_s <= 0:
            raise BadInputError("{timeout} must be a positive number of seconds", fields=("timeout",))
        if response_format not in ("json_schema", "json_object"):
            raise BadInputError("response format must be json_schema or json_object")
        self._key = key.strip()
        self.model = model
        self.base_url = base_url or os.environ.get(BASE_URL_ENV) or "https://api.openai.com/v1"
        self._secrets = secret_forms(self._key, self.base_url)
        check_base_url(self.base_url, self._secrets)
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.max_side = max_side
        self.detail = detail
        self.response_format = response_format
        self.temperature: float | None = 0.2
        self.max_photos_per_request = max(1, max_photos_per_request)
        self._sleep = sleep
        self._client: Any = None
        self.name = f"openai:{model}"
        self.requests_sent = 0

    def __repr__(self) -> str:
        return f"OpenAICaptioner(model={self.model!r}, host={self.host!r})"  # never the key

    @property
    def host(self) -> str:
        """The server's host and port (for messages), without any credentials the URL may carry."""
        parts = urlsplit(self.base_url)
        if not parts.hostname:
            return "the configured server"
        return f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname

    def _openai(self) -> Any:
        if self._client is None:
            import openai

            # our RetryPolicy does the retrying (bounded, configurable backoff), so the client's is off
            self._client = openai.OpenAI(
                api_key=self._key, base_url=self.base_url, timeout=self.timeout_s, max_retries=0
            )
        return self._client

    # -- request building --

    def encode_photo(self, path: Path) -> str:
        """The photo downscaled (longer side <= max_side) as a JPEG data URL."""
        image = load_rgb(path)
        image.thumbnail((self.max_side, self.max_side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

    def build_messages(self, photos: Sequence[Photo], phrase: str | None) -> list[dict[str, Any]]:
        """The chat messages for one request: instructions, then each photo labelled with its number."""
        numbers = ", ".join(str(photo.id) for photo in photos)
        intro = f"Here are {len(photos)} photos of the subject, labelled with their numbers ({numbers})."
        if phrase:
            intro += " " + _fixed_phrase_rule(phrase)
        content: list[dict[str, Any]] = [{"type": "text", "text": intro}]
        for photo in photos:
            content.append({"type": "text", "text": f"Photo {photo.id}:"})
            content.append(
                {
                    "type": "image_url",
                    "image_url": {"url": self.encode_photo(photo.path), "detail": self.detail},
                }
            )
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]

    def _format_param(
        self, name: str = "subject_captions", schema: dict[str, Any] = ANSWER_SCHEMA
    ) -> dict[str, Any]:
        if self.response_format == "json_object":
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}

    # -- transport --

    def _scrub(self, text: str) -> str:
        return scrub_secrets(text, self._secrets)

    def _create_within_deadline(self, client: Any, **kwargs: Any) -> Any:
        """`client.chat.completions.create(**kwargs)`, bounded as a whole by `timeout_s`.

        The client's own timeout bounds each network operation, not the call: a server dripping its answer
        a byte at a time would never trip it. The request runs in a worker thread; past the deadline the
        client is closed (which ends the worker's socket read) and TimeoutError is raised here.
        """
        box: dict[str, Any] = {}
        finished = threading.Event()

        def work() -> None:
            try:
                box["value"] = client.chat.completions.create(**kwargs)
            except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
                box["error"] = error
            finally:
                finished.set()

        worker = threading.Thread(target=work, name="stencil-caption-request", daemon=True)
        worker.start()
        if not finished.wait(self.timeout_s):
            self._client = None  # a fresh client for any later request
            threading.Thread(target=_close_quietly, args=(client,), daemon=True).start()
            raise TimeoutError(f"no complete answer within {self.timeout_s:g} s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def complete(
        self,
        messages: list[dict[str, Any]],
        *,
        schema: tuple[str, dict[str, Any]] = ("subject_captions", ANSWER_SCHEMA),
    ) -> str:
        """Send one chat completion (with bounded retries) and return the answer's text.

        `schema` is the (name, JSON schema) the answer must follow (json_schema response format).
        """
        import openai

        client = self._openai()
        attempt = 0
        while True:
            try:
                self.requests_sent += 1
                extra: dict[str, Any] = {} if self.temperature is None else {"temperature": self.temperature}
                response = self._create_within_deadline(
                    client,
                    model=self.model,
                    messages=messages,
                    response_format=self._format_param(*schema),
                    **extra,
                )
                break
            except RecursionError:
                raise StencilError(
                    f"{self.host} sent an answer nested too deeply to read; nothing was stored",
                    hint="check the server, try another {model}, or use `{captioner=template}`",
                    fields=("model", "captioner"),
                ) from None
            except (openai.APITimeoutError, TimeoutError):
                raise StencilError(
                    f"no answer from {self.host} within {self.timeout_s:g} s",
                    hint="raise the limit with {timeout=SECONDS}, or try again later",
                    fields=("timeout",),
                ) from None
            except openai.AuthenticationError:
                raise StencilError(
                    f"{self.host} refused the key in {KEY_ENV} (HTTP 401)",
                    hint=f"check {KEY_ENV}, or caption offline with `{{captioner=template}}`",
                    fields=("captioner",),
                ) from None
            except openai.BadRequestError as error:
                if self.response_format == "json_schema" and "response_format" in self._message(error):
                    self.response_format = "json_object"  # an older/compatible server: plain JSON mode
                    continue
                if self.temperature is not None and "temperature" in self._message(error):
                    self.temperature = None  # reasoning models accept only their default temperature
                    continue
                raise StencilError(f"{self.host} rejected the request: {self._message(error)}") from None
            except openai.NotFoundError as error:
                raise StencilError(
                    f"{self.host} does not know model {self.model!r} (HTTP 404): {self._message(error)}",
                    hint="pick another with {model}",
                    fields=("model",),
                ) from None
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as error:
                quota = isinstance(error, openai.RateLimitError) and "insufficient_quota" in self._message(
                    error
                )
                if quota or attempt >= self.retry.retries:
                    raise StencilError(
                        self._give_up_message(error, attempt),
                        hint=self._give_up_hint(quota),
                        fields=("captioner",),
                    ) from None
                self._sleep(self.retry.wait(attempt, self._retry_after(error)))
                attempt += 1
            except openai.APIStatusError as error:
                raise StencilError(
                    f"{self.host} answered HTTP {error.status_code}: {self._message(error)}"
                ) from None
        if isinstance(response, (str, bytes)):  # the client hands over a non-JSON body as it came
            body = response.decode("utf-8", "replace") if isinstance(response, bytes) else response
            what = "a web page (HTML)" if "<html" in body[:2000].lower() else "something that is not JSON"
            raise StencilError(
                f"{self.host} answered with {what}, not a chat completion: is {BASE_URL_ENV} the API's URL "
                "(ending in /v1), and not a proxy's or login page?",
                hint=f"check {BASE_URL_ENV}, or caption offline with `{{captioner=template}}`",
                fields=("captioner",),
            )
        choices = getattr(response, "choices", None) or []
        if not choices:
            return ""
        message = choices[0].message
        text = (message.content or message.refusal or "") if message is not None else ""
        if not isinstance(text, str):
            return ""
        if len(text) > MAX_ANSWER_CHARS:
            raise StencilError(
                f"{self.host} sent an answer of {len(text):,} characters "
                f"(the limit is {MAX_ANSWER_CHARS:,}); nothing was stored",
                hint="try another {model}, or use `{captioner=template}`",
                fields=("model", "captioner"),
            )
        return self._scrub(text)

    def _message(self, error: Exception) -> str:
        body = getattr(error, "body", None)
        text = ""
        if isinstance(body, dict):
            inner = body.get("error", body)
            if isinstance(inner, dict):
                text = str(inner.get("message") or "").strip()
                if inner.get("code"):
                    text = f"{text} ({inner['code']})" if text else str(inner["code"])
        text = text or str(getattr(error, "message", "") or error)
        return self._scrub(" ".join(text.split()))[:300]

    @staticmethod
    def _retry_after(error: Exception) -> float | None:
        response = getattr(error, "response", None)
        headers = getattr(response, "headers", None)
        if headers is None:
            return None
        for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
            value = headers.get(name)
            if value is not None:
                try:
                    return float(value) / divisor
                except ValueError:
                    return None
        return None

    def _give_up_message(self, error: Exception, attempt: int) -> str:
        tries = f"after {attempt + 1} tries" if attempt else "on the first try"
        status = getattr(error, "status_code", None)
        if status == 429:
            what = "rate limit or quota (HTTP 429)"
        elif status is not None:
            what = f"server error (HTTP {status})"
        else:
            what = f"cannot reach {self.host}"
        detail = self._message(error) if status is not None else ""
        return f"captioning failed {tries}: {what}" + (f": {detail}" if detail else "")

    @staticmethod
    def _give_up_hint(quota: bool) -> str:
        if quota:
            return "the account has no quota left: check its billing, or use `{captioner=template}`"
        return f"try again later, check {BASE_URL_ENV} / your network, or use `{{captioner=template}}`"

    # -- the draft prompt (--rewrite) --

    def write_draft_prompt(
        self, photos: Sequence[Photo], user_prompt: str, phrase: str, description: str | None
    ) -> str | None:
        """One fluent draft prompt for the context model, written by the vision model from the user's prompt
        and the subject's photos (the reference code's "augmented prompt"); None when the answer is not one
        usable sentence (then the prompt rules write the draft). One request; at most 4 photos are sent."""
        content: list[dict[str, Any]] = [
            {"type": "text", "text": rewrite_instructions(user_prompt, phrase, description)}
        ]
        for photo in list(photos)[:4]:
            content.append(
                {"type": "image_url", "image_url": {"url": self.encode_photo(photo.path), "detail": "low"}}
            )
        messages = [
            {"role": "system", "content": REWRITE_SYSTEM_PROMPT},
            {"role": "user", "content": content},
        ]
        data = _load_json(self.complete(messages, schema=("draft_prompt", DRAFT_PROMPT_SCHEMA)))
        text = data.get("prompt") if isinstance(data, dict) else None
        return clean_rewritten_prompt(text) if isinstance(text, str) else None

    # -- the captioning itself --

    def caption(self, request: CaptionRequest) -> CaptionResult:
        """Caption the photos, one request per batch of max_photos_per_request, validated and repaired."""
        photos = list(request.photos)
        if not photos:
            raise BadInputError("no photos to caption")
        phrase = validate_phrase(request.phrase)
        result: CaptionResult | None = None
        for start in range(0, len(photos), self.max_photos_per_request):
            batch = photos[start : start + self.max_photos_per_request]
            part = self._caption_batch(batch, phrase)
            phrase = part.phrase  # later batches keep the phrase the first one settled
            if result is None:
                result = part
            else:
                result.captions.update(part.captions)
                result.repaired.extend(part.repaired)
                result.notes.extend(part.notes)
        assert result is not None
        return self._scrub_result(bound_result(result))

    def _scrub_result(self, result: CaptionResult) -> CaptionResult:
        """No secret reaches the store: an answer echoing the key or the URL's credentials is scrubbed."""
        result.captions = {photo_id: self._scrub(text) for photo_id, text in result.captions.items()}
        result.description = self._scrub(result.description) if result.description else result.description
        result.notes = [self._scrub(note) for note in result.notes]
        return result

    def _caption_batch(self, photos: list[Photo], phrase: str | None) -> CaptionResult:
        messages = self.build_messages(photos, phrase)
        first_text = self.complete(messages)
        first = parse_answer(first_text, photos, phrase)
        if not first.problems:
            return first.to_result(self.name)
        # one retry: show the model its answer and what is wrong with it
        retry_messages = [
            *messages,
            {"role": "assistant", "content": first_text or "(empty answer)"},
            {
                "role": "user",
                "content": "Your answer is not valid: "
                + "; ".join(first.problems[:10])
                + ". Answer again with the complete JSON for all photos."
                + (f" {_fixed_phrase_rule(first.phrase)}" if first.phrase else ""),
            },
        ]
        second = parse_answer(self.complete(retry_messages), photos, phrase or first.phrase)
        notes = [f"the first answer was invalid ({'; '.join(first.problems[:3])}); asked again"]
        for candidate in (second, first):
            if candidate.repairable:
                result = candidate.to_result(self.name, repair=True)
                result.notes[:0] = notes
                return result
        problems = "; ".join(second.problems[:3])
        raise StencilError(
            f"{self.model} gave no usable captions after one retry ({problems}); nothing was stored",
            hint="run the command again, try another {model}, or use `{captioner=template}`",
            fields=("model", "captioner"),
        )


# -- answer validation ----------------------------------------------------------------------------


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
    data = _load_json(text)
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


def _load_json(text: str | None) -> Any:
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


# -- hostile answers: control characters, secrets, sizes -------------------------------------------------

# terminal escape sequences: CSI (ESC [ ... final), OSC (ESC ] ... BEL or ESC \), other two-byte escapes
PHRASE_PUNCTUATION = frozenset(" -'’&.,+")


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


def check_base_url(url: str, secrets: Sequence[str] = ()) -> None:
    """Raise BadInputError with one clear line unless `url` is a usable http(s) API URL."""
    problem = None
    try:
        parts = urlsplit(url)
        if any(char.isspace() for char in url) or any(unicodedata.category(c) == "Cc" for c in url):
            problem = "it contains spaces or control characters"
        elif parts.scheme not in ("http", "https"):
            problem = "it must start with http:// or https://"
        elif not parts.hostname:
            problem = "it names no host"
        else:
            parts.port  # noqa: B018 - raises ValueError for a port that is not 0-65535
    except ValueError as error:
        problem = f"it cannot be parsed: {error}"
    if problem:
        shown = scrub_secrets(display_url(url), secrets)[:200]
        raise BadInputError(
            f"{BASE_URL_ENV} is not a usable URL ({problem}): {shown}",
            hint="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1",
        )


def _close_quietly(client: Any) -> None:
    with contextlib.suppress(Exception):  # best effort: the call was abandoned already
        client.close()


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
