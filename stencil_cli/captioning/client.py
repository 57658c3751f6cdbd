"""The OpenAI-compatible vision captioner: requests (photos, instructions, a JSON schema), bounded retries and
deadlines, one clear line for every way a server can fail.

The API key is read from ``OPENAI_API_KEY`` only, passed to the client in memory, and never written anywhere.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import random
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from stencil_cli.base.errors import BadInputError, StencilError
from stencil_cli.base.images import load_rgb
from stencil_cli.captioning.answers import bound_result, load_json, parse_answer
from stencil_cli.captioning.phrases import validate_phrase
from stencil_cli.captioning.protocol import CaptionJob, CaptionResult, Photo
from stencil_cli.captioning.scrubbing import display_url, scrub_secrets, secret_forms
from stencil_cli.core.prompts import MAX_DESCRIPTION_WORDS, clean_rewritten_prompt, rewrite_instructions

KEY_ENV = "OPENAI_API_KEY"
BASE_URL_ENV = "OPENAI_BASE_URL"
DEFAULT_MODEL = "gpt-4o"
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
MAX_SIDE = 512  # photos are downscaled so the longer side is at most this before upload
MAX_PHOTOS_PER_REQUEST = 16
MAX_ANSWER_CHARS = 1_000_000  # a whole answer beyond this is refused before parsing


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
            except json.JSONDecodeError as error:  # a body labelled JSON that is not (a proxy's login page)
                raise self._not_a_completion(error.doc) from None
        if isinstance(response, (str, bytes)):  # the client hands over a non-JSON body as it came
            raise self._not_a_completion(response)
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

    def _not_a_completion(self, body: str | bytes) -> StencilError:
        """The error for a 200 answer whose body is not a chat completion (a web page, plain text)."""
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
        what = "a web page (HTML)" if "<html" in text[:2000].lower() else "something that is not JSON"
        return StencilError(
            f"{self.host} answered with {what}, not a chat completion: is {BASE_URL_ENV} the API's URL "
            "(ending in /v1), and not a proxy's or login page?",
            hint=f"check {BASE_URL_ENV}, or caption offline with `{{captioner=template}}`",
            fields=("captioner",),
        )

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
        data = load_json(self.complete(messages, schema=("draft_prompt", DRAFT_PROMPT_SCHEMA)))
        text = data.get("prompt") if isinstance(data, dict) else None
        return clean_rewritten_prompt(text) if isinstance(text, str) else None

    # -- the captioning itself --

    def caption(self, request: CaptionJob) -> CaptionResult:
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
