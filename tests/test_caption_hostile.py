"""Captioning against hostile or broken servers (a real HTTP server on 127.0.0.1): slow drips, HTML pages,
deep nesting, huge or escape-laden answers, echoed secrets, bad base URLs."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from stencil_cli.base.errors import BadInputError, StencilError
from stencil_cli.base.text import sanitize_text
from stencil_cli.captioning import (
    MAX_CAPTION_CHARS,
    MAX_DESCRIPTION_CHARS,
    CaptionJob,
    OpenAICaptioner,
    Photo,
    RetryPolicy,
    TemplateCaptioner,
    check_base_url,
    parse_answer,
    phrase_problem,
    scrub_secrets,
    secret_forms,
)
from stencil_cli.cli.kit import error_line

KEY = "sk-test-hostile-0123456789abcdefXYZ"
PHRASE = "toy robot"

Script = Callable[[BaseHTTPRequestHandler, dict[str, Any]], None]


class Server:
    """A loopback server whose every POST runs `script(handler, request_json)`."""

    def __init__(self) -> None:
        self.script: Script = lambda handler, body: None
        self.requests = 0
        self.stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests += 1
                with contextlib.suppress(OSError):  # the client went away
                    outer.script(self, json.loads(raw or b"{}"))

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    fake = Server()
    yield fake
    fake.close()


def send(
    handler: BaseHTTPRequestHandler, data: bytes, *, status: int = 200, kind: str = "application/json"
) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", kind)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def chat(content: str) -> bytes:
    return json.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
        }
    ).encode()


def answer(phrase: str = PHRASE, description: str = "a small red robot", caption: str | None = None) -> str:
    text = caption if caption is not None else f"a {phrase} on a wooden table by a window"
    return json.dumps(
        {"phrase": phrase, "description": description, "captions": [{"photo": 1, "caption": text}]}
    )


@pytest.fixture
def photos(tmp_path: Path) -> list[Photo]:
    path = tmp_path / "p.png"
    Image.new("RGB", (300, 300), (200, 30, 30)).save(path)
    return [Photo(1, path)]


def captioner(server: Server, **kwargs: Any) -> OpenAICaptioner:
    kwargs.setdefault("api_key", KEY)
    kwargs.setdefault("base_url", server.url)
    kwargs.setdefault("retry", RetryPolicy(retries=0, backoff_s=0.01))
    return OpenAICaptioner(**kwargs)


# -- time ---------------------------------------------------------------------------------------------


def test_the_timeout_bounds_a_server_that_drips_its_answer(server: Server, photos) -> None:
    def drip(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        data = chat(answer())
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        for byte in data:  # one byte every 0.2 s: each read is quick, the whole answer takes minutes
            if server.stop.is_set():
                return
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(0.2)

    server.script = drip
    start = time.monotonic()
    with pytest.raises(StencilError, match=r"within 1\.5 s") as caught:
        captioner(server, timeout_s=1.5).caption(CaptionJob(photos=photos))
    assert time.monotonic() - start < 6
    assert "raise the limit with timeout=SECONDS" in str(caught.value)  # a library caller reads the field
    assert "raise the limit with --timeout SECONDS" in error_line(caught.value)  # the CLI shows the flag


# -- answers that are not chat completions ---------------------------------------------------------


def test_a_200_html_page_is_one_clear_line_and_not_retried(server: Server, photos) -> None:
    server.script = lambda h, body: send(h, b"<html><body>Please log in</body></html>", kind="text/html")
    with pytest.raises(StencilError) as caught:
        captioner(server, retry=RetryPolicy(retries=3, backoff_s=0.01)).caption(CaptionJob(photos=photos))
    message = str(caught.value)
    assert "web page" in message and "OPENAI_BASE_URL" in message and "\n" not in message
    assert server.requests == 1


@pytest.mark.parametrize("kind", ["application/json", "application/json; charset=utf-8", "text/plain"])
def test_a_200_html_page_labelled_as_json_is_one_clear_line(server: Server, photos, kind: str) -> None:
    page = b"<!DOCTYPE html><html><body>Proxy login</body></html>"
    server.script = lambda h, body: send(h, page, kind=kind)
    with pytest.raises(StencilError) as caught:
        captioner(server).caption(CaptionJob(photos=photos))
    message = str(caught.value)
    assert "answered with a web page (HTML), not a chat completion" in message and "\n" not in message
    assert server.requests == 1


def test_a_deeply_nested_body_is_a_clear_error_not_a_recursion_error(server: Server, photos) -> None:
    server.script = lambda h, body: send(h, b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(StencilError, match="nested too deeply"):
        captioner(server).caption(CaptionJob(photos=photos))


@pytest.mark.parametrize("depth", [100, 200_000])
def test_a_deeply_nested_answer_is_an_invalid_answer(server: Server, photos, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    assert parse_answer(nested, photos, None).problems == ["the answer is not a JSON object"]
    server.script = lambda h, body: send(h, chat(nested))
    with pytest.raises(StencilError, match="no usable captions"):
        captioner(server).caption(CaptionJob(photos=photos))


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "api.openai.com/v1",
        "ftp://example.com/v1",
        "http:///v1",
        "http://example.com:99999/v1",
        "http://[::1/v1",
        "http://exa mple.com/v1",
        "http://alice:s3cretpw@exa mple.com/v1",
    ],
)
def test_an_unusable_base_url_is_one_line_without_credentials(url: str, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    with pytest.raises(BadInputError) as caught:
        OpenAICaptioner(api_key=KEY)
    message = str(caught.value)
    assert message.startswith("OPENAI_BASE_URL is not a usable URL") and "\n" not in message
    assert "s3cretpw" not in message and "alice" not in message
    check_base_url("http://127.0.0.1:8000/v1")
    check_base_url("https://alice:pw@llm.example.com/v1")


# -- sizes --------------------------------------------------------------------------------------------


def test_huge_descriptions_and_captions_are_cut_keeping_the_phrase(server: Server, photos) -> None:
    long_caption = "a " + PHRASE + " " + "very " * 2000 + "shiny"
    tail_phrase = "word " * 500 + PHRASE
    server.script = lambda h, body: send(h, chat(answer(description="red " * 2_500_000)))
    with pytest.raises(StencilError, match=r"characters \(the limit is 1,000,000\); nothing was stored"):
        captioner(server).caption(CaptionJob(photos=photos))  # a 10 MB answer is refused whole
    server.script = lambda h, body: send(h, chat(answer(description="red " * 50_000, caption=long_caption)))
    result = captioner(server).caption(CaptionJob(photos=photos))
    assert len(result.description or "") <= MAX_DESCRIPTION_CHARS
    assert len(result.captions[1]) <= MAX_CAPTION_CHARS and PHRASE in result.captions[1]
    assert any("description" in note for note in result.notes)  # cut, or reduced to one noun phrase
    server.script = lambda h, body: send(h, chat(answer(caption=tail_phrase)))
    result = captioner(server).caption(CaptionJob(photos=photos))
    assert len(result.captions[1]) <= MAX_CAPTION_CHARS and PHRASE in result.captions[1]


# -- control characters and phrases -------------------------------------------------------------------


def test_terminal_escapes_and_bidi_overrides_never_get_through(server: Server, photos) -> None:
    nasty = "\x1b]0;pwned\x07\x1b[2J\u202etoy\u202c robot\u200b \x07\x00on a table\r\nnext"
    server.script = lambda h, body: send(h, chat(answer(description=nasty, caption=f"a {PHRASE}: {nasty}")))
    result = captioner(server).caption(CaptionJob(photos=photos))
    for text in (result.description or "", result.captions[1]):
        assert not any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 or c in "\u202e\u202c\u200b" for c in text), text
        assert "pwned" not in text and "[2J" not in text
    assert result.description == "toy robot on a table next"
    assert sanitize_text("caf\u00e9 \u65e5\u672c ok") == "caf\u00e9 \u65e5\u672c ok"  # real text is kept


@pytest.mark.parametrize("phrase", ["../../etc x; rm -rf", "cat`id`", "$(reboot)", "a|b", "x" * 61, "-"])
def test_a_phrase_with_shell_or_path_characters_is_refused(server: Server, photos, phrase: str) -> None:
    assert phrase_problem(phrase)
    with pytest.raises(BadInputError, match="the phrase"):
        TemplateCaptioner().caption(CaptionJob(photos=photos, phrase=phrase))
    with pytest.raises(BadInputError, match="the phrase"):
        captioner(server).caption(CaptionJob(photos=photos, phrase=phrase))
    served = [answer(phrase=phrase, caption=f"a {phrase} here"), answer()]
    server.script = lambda h, body: send(h, chat(served.pop(0)))
    result = captioner(server).caption(CaptionJob(photos=photos))  # the bad phrase is refused, asked again
    assert result.phrase == PHRASE and server.requests == 2


@pytest.mark.parametrize(
    "phrase", ["cat", "toy robot", "rock'n'roll guitar", "r2-d2", "m&m candy", "caf\u00e9 cup"]
)
def test_ordinary_phrases_pass(phrase: str) -> None:
    assert phrase_problem(phrase) is None


# -- secrets ------------------------------------------------------------------------------------------


def _echo_headers(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
    headers = " ".join(f"{name}={value}" for name, value in handler.headers.items())
    send(handler, chat(answer(description=f"echo {headers}", caption=f"a {PHRASE} seen with {headers}")))


def _leaks(text: str, *secrets: str) -> list[str]:
    found = []
    for secret in secrets:
        for form in (secret, base64.b64encode(secret.encode()).decode()):
            if form in text:
                found.append(form)
    return found


def test_an_echoed_key_and_url_credentials_are_scrubbed_from_the_answer(server: Server, photos) -> None:
    server.script = _echo_headers
    url = server.url.replace("http://", "http://alice:s3cretpw@")
    result = captioner(server, base_url=url).caption(CaptionJob(photos=photos))
    stored = json.dumps([result.captions, result.description, result.notes, result.phrase])
    assert "authorization" in stored.lower()  # the server did echo it
    assert _leaks(stored, KEY, "s3cretpw", "alice:s3cretpw") == []


def test_an_error_echoing_the_credentials_is_scrubbed(server: Server, photos) -> None:
    def refuse(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        headers = " ".join(f"{name}={value}" for name, value in handler.headers.items())
        send(handler, json.dumps({"error": {"message": f"bad request {headers}"}}).encode(), status=400)

    server.script = refuse
    url = server.url.replace("http://", "http://alice:s3cretpw@")
    with pytest.raises(StencilError) as caught:
        captioner(server, base_url=url).caption(CaptionJob(photos=photos))
    assert _leaks(str(caught.value), KEY, "s3cretpw", "alice:s3cretpw") == []


def test_secret_forms_catch_base64_at_every_alignment() -> None:
    forms = secret_forms("sk-abcdefgh12345678", "https://bob:hunter22@x.example/v1")
    for prefix in ("", "a", "ab", "abc"):
        for secret in ("sk-abcdefgh12345678", "bob:hunter22", "Bearer sk-abcdefgh12345678"):
            encoded = base64.b64encode((prefix + secret + "!").encode()).decode()
            scrubbed = scrub_secrets(f"x {encoded} y", forms)
            assert scrubbed != f"x {encoded} y", (prefix, secret)
    assert scrub_secrets("plain words stay", forms) == "plain words stay"
