"""Captioning: OpenAI vision captions against a real HTTP server on 127.0.0.1, templates, hand edits."""

from __future__ import annotations

import base64
import io
import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from stencil_cli.captioning import (
    OpenAICaptioner,
    Photo,
    RetryPolicy,
    clean_phrase,
    contains_phrase,
    insert_phrase,
    parse_answer,
    template_caption,
)
from stencil_cli.store.db import open_store

KEY = "sk-test-DO-NOT-LEAK-0123456789abcdef"
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230)]
PHRASE = "toy robot"


# -- a fake OpenAI server ---------------------------------------------------------------------------


@dataclass
class Reply:
    """One scripted reply: an HTTP status and JSON body, or a hang (never answer)."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False


def completion(content: str) -> Reply:
    """A chat completion whose message content is `content`."""
    return Reply(
        body={
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": "gpt-4o",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
        }
    )


def error_reply(status: int, message: str, code: str | None = None, **headers: str) -> Reply:
    """An OpenAI-style error body."""
    return Reply(
        status=status,
        body={"error": {"message": message, "type": "error", "code": code, "param": None}},
        headers=headers,
    )


def answer(
    ids: tuple[int, ...] = (1, 2, 3),
    *,
    phrase: str = PHRASE,
    lacking: tuple[int, ...] = (),
    skip: tuple[int, ...] = (),
) -> str:
    """A JSON answer for photos `ids`; `lacking` captions miss the phrase, photos in `skip` are left out."""
    captions = []
    for number in ids:
        if number in skip:
            continue
        if number in lacking:
            text = f"a small plastic figure standing on a wooden desk, photo {number}, soft window light"
        else:
            text = f"a {phrase} standing on a wooden desk in photo {number}, soft window light from the left"
        captions.append({"photo": number, "caption": text})
    return json.dumps(
        {
            "phrase": phrase,
            "description": "a silver toy robot with red eyes and blue feet",
            "captions": captions,
        }
    )


class FakeOpenAI:
    """A chat-completions server on 127.0.0.1 that plays scripted replies and records every request."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                fake.requests.append(
                    {
                        "path": self.path,
                        "authorization": self.headers.get("Authorization"),
                        "body": json.loads(raw or b"{}"),
                    }
                )
                reply = fake.replies.pop(0) if len(fake.replies) > 1 else fake.replies[0]
                if reply.hang:
                    fake.release.wait(10)
                    return
                data = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in reply.headers.items():
                    self.send_header(name.replace("_", "-"), value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # a client that timed out: fine
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        """The base URL the openai client should use."""
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    def texts(self, index: int = 0) -> str:
        """All text of request `index`'s messages, joined."""
        parts = []
        for message in self.requests[index]["body"]["messages"]:
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts += [part["text"] for part in content if part.get("type") == "text"]
        return "\n".join(parts)

    def image_urls(self, index: int = 0) -> list[str]:
        """The data URLs of the images in request `index`."""
        urls = []
        for message in self.requests[index]["body"]["messages"]:
            content = message.get("content")
            if isinstance(content, list):
                urls += [part["image_url"]["url"] for part in content if part.get("type") == "image_url"]
        return urls


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    """A running fake OpenAI server."""
    fake = FakeOpenAI()
    fake.thread.start()
    yield fake
    fake.release.set()
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture
def openai_env(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> FakeOpenAI:
    """Point the openai client at the fake server with a test key; keep retry waits tiny."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("STENCIL_CAPTION_BACKOFF", "0.01")
    return server


def make_photos(folder: Path, count: int = 3, size: tuple[int, int] = (640, 480), start: int = 0) -> Path:
    """Write `count` photos, each dominated by its own colour, into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(start, start + count):
        image = Image.new("RGB", size, COLOURS[index % len(COLOURS)])
        ImageDraw.Draw(image).rectangle([10, 10, 60 + index * 7, 60], fill=(255, 255, 255))
        image.save(folder / f"photo{index}.png")
    return folder


@pytest.fixture
def robot(cli, tmp_path: Path) -> str:
    """A subject 'robot' with 3 photos and no phrase."""
    result = cli("add", "robot", make_photos(tmp_path / "photos"))
    assert result.exit_code == 0, result.output
    return "robot"


def captions_of(name: str) -> dict[int, tuple[str | None, str | None]]:
    """{image id: (caption, source)} read back from the store."""
    store = open_store()
    try:
        subject = store.get_subject(name)
        return {image["id"]: (image["caption"], image["caption_source"]) for image in subject.images}
    finally:
        store.close()


def subject_row(name: str) -> dict[str, Any]:
    """The subject as a dict."""
    store = open_store()
    try:
        return store.get_subject(name).to_dict()
    finally:
        store.close()


def assert_nothing_stored(name: str) -> None:
    """No caption and no phrase was written."""
    assert all(caption is None for caption, _ in captions_of(name).values())
    assert subject_row(name)["phrase"] is None


# -- OpenAI captioner through the CLI -----------------------------------------------------------


def test_request_carries_every_photo_and_the_key_and_a_good_answer_is_stored(cli, robot, openai_env) -> None:
    openai_env.replies = [completion(answer())]
    result = cli("caption", robot)
    assert result.exit_code == 0, result.output
    assert len(openai_env.requests) == 1
    request = openai_env.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["authorization"] == f"Bearer {KEY}"
    assert request["body"]["model"] == "gpt-4o"
    assert request["body"]["response_format"]["type"] == "json_schema"
    urls = openai_env.image_urls()
    assert len(urls) == 3
    for url, colour in zip(urls, COLOURS, strict=True):
        assert url.startswith("data:image/jpeg;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert max(image.size) == 512  # 640x480 downscaled
        pixel = image.convert("RGB").getpixel((image.width - 5, image.height - 5))
        assert all(abs(a - b) < 30 for a, b in zip(pixel, colour, strict=True)), (pixel, colour)  # order kept
    stored = captions_of(robot)
    assert len(stored) == 3
    for caption, source in stored.values():
        assert caption is not None and PHRASE in caption
        assert source == "openai:gpt-4o"
    row = subject_row(robot)
    assert row["phrase"] == PHRASE  # the subject had none: the answer's phrase is stored
    assert row["description"] == "a silver toy robot with red eyes and blue feet"
    for caption, _ in stored.values():
        assert caption in result.stdout


def test_the_fixed_phrase_is_sent_and_the_model_option_used(cli, tmp_path, openai_env) -> None:
    assert cli("add", "cat", make_photos(tmp_path / "p"), "--phrase", "cat").exit_code == 0
    openai_env.replies = [completion(answer(phrase="cat"))]
    result = cli("caption", "cat", "--model", "my-vlm")
    assert result.exit_code == 0, result.output
    body = openai_env.requests[0]["body"]
    assert body["model"] == "my-vlm"
    assert 'use exactly "cat"' in openai_env.texts()
    assert {source for _, source in captions_of("cat").values()} == {"openai:my-vlm"}


def test_malformed_json_is_asked_again_once(cli, robot, openai_env) -> None:
    openai_env.replies = [completion("Sure! Here are your captions: {not json"), completion(answer())]
    result = cli("caption", robot)
    assert result.exit_code == 0, result.output
    assert len(openai_env.requests) == 2
    retry_messages = openai_env.requests[1]["body"]["messages"]
    assert retry_messages[-2] == {"role": "assistant", "content": "Sure! Here are your captions: {not json"}
    assert "not a JSON object" in retry_messages[-1]["content"]
    assert len(openai_env.image_urls(1)) == 3  # the retry carries the photos again
    assert all(caption and PHRASE in caption for caption, _ in captions_of(robot).values())


def test_malformed_json_twice_stores_nothing(cli, robot, openai_env) -> None:
    openai_env.replies = [completion("{not json"), completion("still not json")]
    result = cli("caption", robot)
    assert result.exit_code == 1
    assert len(openai_env.requests) == 2
    assert "nothing was stored" in result.stderr
    assert "Traceback" not in result.output
    assert_nothing_stored(robot)


def test_a_caption_missing_the_phrase_is_retried_then_the_phrase_inserted(cli, robot, openai_env) -> None:
    openai_env.replies = [completion(answer(lacking=(2,))), completion(answer(lacking=(2,)))]
    result = cli("caption", robot)
    assert result.exit_code == 0, result.output
    assert len(openai_env.requests) == 2
    assert "lack the phrase 'toy robot'" in openai_env.requests[1]["body"]["messages"][-1]["content"]
    stored = captions_of(robot)
    second_id = sorted(stored)[1]
    caption, source = stored[second_id]
    assert caption.startswith("a photo of a toy robot: a small plastic figure")
    assert source == "openai:gpt-4o+phrase-inserted"
    for image_id, (caption, source) in stored.items():
        assert contains_phrase(caption, PHRASE)
        if image_id != second_id:
            assert source == "openai:gpt-4o"
    assert "inserted the phrase" in result.stderr


def test_a_caption_missing_the_phrase_fixed_by_the_retry_is_stored_as_answered(
    cli, robot, openai_env
) -> None:
    openai_env.replies = [completion(answer(lacking=(1, 3))), completion(answer())]
    result = cli("caption", robot)
    assert result.exit_code == 0, result.output
    assert {source for _, source in captions_of(robot).values()} == {"openai:gpt-4o"}
    assert not any(caption.startswith("a photo of a") for caption, _ in captions_of(robot).values())


def test_a_missing_photo_is_retried_and_never_stored_incomplete(cli, robot, openai_env) -> None:
    openai_env.replies = [completion(answer(skip=(3,))), completion(answer(skip=(3,)))]
    result = cli("caption", robot)
    assert result.exit_code == 1
    assert "no caption for photo(s) [3]" in result.stderr
    assert_nothing_stored(robot)
    openai_env.replies = [completion(answer(skip=(2,))), completion(answer())]
    openai_env.requests.clear()
    assert cli("caption", robot).exit_code == 0
    assert len(openai_env.requests) == 2
    assert all(caption for caption, _ in captions_of(robot).values())


def test_a_500_then_success_is_retried(cli, robot, openai_env) -> None:
    openai_env.replies = [error_reply(500, "The server had an error"), completion(answer())]
    result = cli("caption", robot)
    assert result.exit_code == 0, result.output
    assert len(openai_env.requests) == 2
    assert all(caption for caption, _ in captions_of(robot).values())


def test_a_429_is_retried_with_bounded_retries(cli, robot, openai_env) -> None:
    openai_env.replies = [error_reply(429, "Rate limit reached", "rate_limit_exceeded"), completion(answer())]
    assert cli("caption", robot).exit_code == 0
    assert len(openai_env.requests) == 2
    assert all(caption for caption, _ in captions_of(robot).values())

    openai_env.requests.clear()
    openai_env.replies = [error_reply(429, "Rate limit reached", "rate_limit_exceeded", retry_after_ms="10")]
    started = time.monotonic()
    result = cli("caption", robot, "--force", "--retries", "2")
    assert result.exit_code == 1
    assert time.monotonic() - started < 5
    assert len(openai_env.requests) == 3  # first try + 2 retries, then give up
    assert "after 3 tries" in result.stderr and "429" in result.stderr
    assert "--captioner template" in result.stderr


def test_a_429_for_missing_quota_is_not_retried(cli, robot, openai_env) -> None:
    openai_env.replies = [error_reply(429, "You exceeded your current quota", "insufficient_quota")]
    result = cli("caption", robot)
    assert result.exit_code == 1
    assert len(openai_env.requests) == 1
    assert "quota" in result.stderr
    assert_nothing_stored(robot)


def test_a_server_that_never_answers_is_a_timeout_error(cli, robot, openai_env) -> None:
    openai_env.replies = [Reply(hang=True)]
    started = time.monotonic()
    result = cli("caption", robot, "--timeout", "0.5")
    elapsed = time.monotonic() - started
    assert result.exit_code == 1
    assert elapsed < 5
    assert "within 0.5 s" in result.stderr and "--timeout" in result.stderr
    assert len(openai_env.requests) == 1
    assert_nothing_stored(robot)


def test_an_unreachable_server_is_retried_then_a_clear_error(cli, robot, monkeypatch) -> None:
    import socket

    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setenv("STENCIL_CAPTION_BACKOFF", "0.01")
    result = cli("caption", robot, "--retries", "1")
    assert result.exit_code == 1
    assert "after 2 tries" in result.stderr and f"127.0.0.1:{port}" in result.stderr
    assert_nothing_stored(robot)


def test_no_key_is_exit_1_naming_the_variable_and_the_template_captioner(cli, robot, server) -> None:
    server.replies = [completion(answer())]
    result = cli("caption", robot)
    assert result.exit_code == 1
    assert "OPENAI_API_KEY" in result.stderr
    assert "--captioner template" in result.stderr
    assert "Traceback" not in result.output
    assert server.requests == []
    assert_nothing_stored(robot)


def test_a_rejected_key_is_a_clear_error_without_echoing_it(cli, robot, openai_env) -> None:
    openai_env.replies = [error_reply(401, f"Incorrect API key provided: {KEY}", "invalid_api_key")]
    result = cli("caption", robot)
    assert result.exit_code == 1
    assert "OPENAI_API_KEY" in result.stderr and "401" in result.stderr
    assert KEY not in result.output


def test_the_key_appears_nowhere_in_the_store_or_the_output(cli, robot, openai_env, stencil_home) -> None:
    outputs = []
    openai_env.replies = [error_reply(500, f"boom {KEY}")]
    outputs.append(cli("caption", robot, "--retries", "0"))
    openai_env.replies = [error_reply(400, f"bad request for {KEY}")]
    outputs.append(cli("caption", robot))
    openai_env.replies = [completion(answer(lacking=(1,))), completion(answer(lacking=(1,)))]
    outputs.append(cli("caption", robot, "--json"))
    outputs.append(cli("show", robot, "--json"))
    openai_env.replies = [error_reply(503, f"overloaded {KEY}")]
    outputs.append(cli("--debug", "caption", robot, "--force", "--retries", "0"))  # with a traceback
    assert [r.exit_code for r in outputs] == [1, 1, 0, 0, 1]
    assert "Traceback" in outputs[-1].stderr
    for result in outputs:
        assert KEY not in result.output
        assert KEY[8:] not in result.output
    files = [path for path in stencil_home.rglob("*") if path.is_file()]
    assert any(path.name == "stencil.db" for path in files)
    for path in files:  # the database, its WAL/SHM files and the photos
        data = path.read_bytes()
        assert KEY.encode() not in data, path
        assert KEY[8:].encode() not in data, path


def test_json_schema_rejected_by_a_compatible_server_falls_back_to_json_object(
    cli, robot, openai_env
) -> None:
    openai_env.replies = [
        error_reply(400, "response_format json_schema is not supported", None),
        completion("```json\n" + answer() + "\n```"),
    ]
    result = cli("caption", robot)
    assert result.exit_code == 0, result.output
    assert [r["body"]["response_format"]["type"] for r in openai_env.requests] == [
        "json_schema",
        "json_object",
    ]
    assert all(caption for caption, _ in captions_of(robot).values())


def test_a_model_that_rejects_temperature_is_asked_again_without_it(cli, robot, openai_env) -> None:
    openai_env.replies = [
        error_reply(400, "Unsupported value: 'temperature' does not support 0.2", "unsupported_value"),
        completion(answer()),
    ]
    result = cli("caption", robot, "--model", "o4-mini")
    assert result.exit_code == 0, result.output
    assert [("temperature" in r["body"]) for r in openai_env.requests] == [True, False]


def test_other_bad_requests_are_one_line_errors(cli, robot, openai_env) -> None:
    openai_env.replies = [error_reply(400, "Invalid image data", "invalid_image")]
    result = cli("caption", robot)
    assert result.exit_code == 1
    assert len(openai_env.requests) == 1
    assert "rejected the request: Invalid image data (invalid_image)" in result.stderr
    assert_nothing_stored(robot)


def test_only_missing_captions_are_filled_unless_forced(cli, robot, openai_env, tmp_path) -> None:
    openai_env.replies = [completion(answer())]
    assert cli("caption", robot).exit_code == 0
    before = captions_of(robot)
    assert cli("add", robot, make_photos(tmp_path / "more", count=1, start=5, size=(300, 300))).exit_code == 0
    openai_env.replies = [completion(answer((4,)))]
    result = cli("caption", robot, "--json")
    assert result.exit_code == 0, result.output
    assert len(openai_env.image_urls(1)) == 1  # only the new photo was sent
    data = json.loads(result.stdout)
    assert len(data["captioned"]) == 1 and data["phrase"] == PHRASE
    after = captions_of(robot)
    assert {k: after[k] for k in before} == before
    openai_env.replies = [completion(answer((1, 2, 3, 4)))]
    assert cli("caption", robot, "--force").exit_code == 0
    assert len(openai_env.image_urls(2)) == 4
    openai_env.requests.clear()
    result = cli("caption", robot)
    assert result.exit_code == 0 and openai_env.requests == []  # nothing left to caption
    assert "already have captions" in result.stderr


def test_caption_json_and_show_json_include_the_captions(cli, robot, openai_env) -> None:
    openai_env.replies = [completion(answer())]
    result = cli("caption", robot, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["subject"] == robot and data["phrase"] == PHRASE
    assert data["source"] == "openai:gpt-4o" and data["repaired"] == []
    assert [image["caption_source"] for image in data["images"]] == ["openai:gpt-4o"] * 3
    shown = json.loads(cli("show", robot, "--json").stdout)
    assert [image["caption"] for image in shown["images"]] == [image["caption"] for image in data["images"]]
    text = cli("show", robot)
    assert data["images"][0]["caption"] in " ".join(text.stdout.split())  # rich may wrap long lines


# -- template captioner -------------------------------------------------------------------------


def test_template_captioner_works_offline_with_the_phrase(cli, tmp_path) -> None:
    assert cli("add", "dog", make_photos(tmp_path / "p"), "--phrase", "corgi dog").exit_code == 0
    result = cli("caption", "dog", "--captioner", "template")
    assert result.exit_code == 0, result.output
    stored = captions_of("dog")
    assert [caption for caption, _ in stored.values()] == [
        "a photo of a corgi dog",
        "a close-up photo of a corgi dog",
        "a good photo of the corgi dog",
    ]
    assert {source for _, source in stored.values()} == {"template"}
    assert subject_row("dog")["description"] is None


def test_template_captioner_without_a_phrase_says_how_to_give_one(cli, robot) -> None:
    result = cli("caption", robot, "--captioner", "template")
    assert result.exit_code == 1
    assert "--phrase" in result.stderr
    assert_nothing_stored(robot)
    result = cli("caption", robot, "--captioner", "template", "--phrase", "owl")
    assert result.exit_code == 0, result.output
    assert subject_row(robot)["phrase"] == "owl"
    assert all(caption and "owl" in caption for caption, _ in captions_of(robot).values())


def test_changing_the_phrase_needs_force_and_recaptions_everything(cli, tmp_path) -> None:
    assert cli("add", "dog", make_photos(tmp_path / "p"), "--phrase", "dog").exit_code == 0
    assert cli("caption", "dog", "--captioner", "template").exit_code == 0
    result = cli("caption", "dog", "--captioner", "template", "--phrase", "puppy")
    assert result.exit_code == 2 and "--force" in result.stderr
    assert subject_row("dog")["phrase"] == "dog"
    assert cli("caption", "dog", "--captioner", "template", "--phrase", "puppy", "--force").exit_code == 0
    assert subject_row("dog")["phrase"] == "puppy"
    assert all("puppy" in caption for caption, _ in captions_of("dog").values())


# -- hand edits ---------------------------------------------------------------------------------


@pytest.fixture
def dog(cli, tmp_path) -> dict[int, str]:
    """A template-captioned subject 'dog' (phrase 'dog'); returns {image id: caption}."""
    assert cli("add", "dog", make_photos(tmp_path / "p"), "--phrase", "dog").exit_code == 0
    assert cli("caption", "dog", "--captioner", "template").exit_code == 0
    return {image_id: caption for image_id, (caption, _) in captions_of("dog").items()}


def test_set_refuses_a_caption_without_the_phrase_unless_forced(cli, dog) -> None:
    first = sorted(dog)[0]
    result = cli("caption", "dog", "--set", str(first), "a cat on a sofa")
    assert result.exit_code == 2
    assert "does not contain the subject phrase 'dog'" in result.stderr
    assert captions_of("dog")[first][0] == dog[first]
    result = cli("caption", "dog", "--set", str(first), "a dog  asleep on a green sofa")
    assert result.exit_code == 0, result.output
    assert captions_of("dog")[first] == ("a dog asleep on a green sofa", "manual")
    assert cli("caption", "dog", "--set", str(first), "a cat on a sofa", "--force").exit_code == 0
    assert captions_of("dog")[first] == ("a cat on a sofa", "manual")
    assert cli("caption", "dog", "--set", "9999", "a dog").exit_code == 1


def _editor(tmp_path: Path, code: str) -> str:
    """An EDITOR command: a Python script that rewrites the file it is given with `code`."""
    script = tmp_path / "editor.py"
    script.write_text(
        "import pathlib, sys\npath = pathlib.Path(sys.argv[1])\ntext = path.read_text()\n" + code
    )
    return f"{sys.executable} {script}"


def test_edit_opens_the_editor_and_stores_changed_lines(cli, dog, tmp_path, monkeypatch) -> None:
    first, second, third = sorted(dog)
    code = (
        f"text = text.replace({dog[second]!r} + '\\n', 'a dog running on a beach at sunset\\n')\n"
        f"text = '\\n'.join(l for l in text.splitlines() if not l.startswith('{third}')) + '\\n'\n"
        "path.write_text(text)\n"
    )
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setenv("EDITOR", _editor(tmp_path, code))
    result = cli("caption", "dog", "--edit")
    assert result.exit_code == 0, result.output
    stored = captions_of("dog")
    assert stored[second] == ("a dog running on a beach at sunset", "manual")
    assert stored[first] == (dog[first], "template")  # unchanged line: untouched
    assert stored[third] == (dog[third], "template")  # deleted line: kept
    assert "1 caption(s) changed" in result.stderr


def test_edit_with_a_bad_line_stores_nothing(cli, dog, tmp_path, monkeypatch) -> None:
    first, second, _ = sorted(dog)
    code = (
        f"text = text.replace({dog[first]!r}, 'a dog in the snow')\n"
        f"text = text.replace({dog[second]!r}, 'a cat in the snow')\n"
        "path.write_text(text)\n"
    )
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setenv("EDITOR", _editor(tmp_path, code))
    result = cli("caption", "dog", "--edit")
    assert result.exit_code == 2
    assert f"photo {second}" in result.stderr and "phrase 'dog'" in result.stderr
    assert {k: v for k, (v, _) in captions_of("dog").items()} == dog
    assert cli("caption", "dog", "--edit", "--force").exit_code == 0
    assert captions_of("dog")[second] == ("a cat in the snow", "manual")


# -- units ----------------------------------------------------------------------------------------


def test_phrase_helpers() -> None:
    assert contains_phrase("A Toy  Robot on a desk", "toy robot")
    assert not contains_phrase("a category of things", "cat")
    assert not contains_phrase("", "cat")
    assert contains_phrase(insert_phrase("a figure on a desk", "owl"), "owl")
    assert insert_phrase("", "owl") == "a photo of an owl"
    assert clean_phrase('  "Toy   robot." ') == "Toy robot"
    assert template_caption("apple", 0) == "a photo of an apple"


def test_parse_answer_reports_problems() -> None:
    photos = [Photo(10, Path("a")), Photo(11, Path("b"))]
    good = parse_answer(answer((10, 11)), photos, None)
    assert good.problems == [] and good.phrase == PHRASE and set(good.captions) == {10, 11}
    assert parse_answer("[]", photos, None).structural
    long_phrase = parse_answer(
        answer((10, 11), phrase="a very long phrase that is not a phrase at all"), photos, None
    )
    assert long_phrase.structural
    fixed = parse_answer(answer((10, 11), phrase="robot"), photos, "toy robot")
    assert fixed.phrase == "toy robot" and fixed.problems  # captions say "robot" but not "toy robot"
    assert fixed.repairable


def test_retry_policy_waits_are_bounded() -> None:
    policy = RetryPolicy(retries=5, backoff_s=1.0, max_backoff_s=4.0)
    assert 0.75 <= policy.wait(0) <= 1.0
    assert policy.wait(10) <= 4.0
    assert policy.wait(0, retry_after=100) == 4.0
    assert policy.wait(0, retry_after=0.5) == 0.5


def test_captioner_batches_large_subjects(server, tmp_path) -> None:
    make_photos(tmp_path / "p", count=3, size=(256, 256))
    photos = [Photo(i, path) for i, path in enumerate(sorted((tmp_path / "p").iterdir()), start=1)]
    server.replies = [completion(answer((1, 2))), completion(answer((3,)))]
    captioner = OpenAICaptioner(
        api_key=KEY, base_url=server.url, max_photos_per_request=2, retry=RetryPolicy(backoff_s=0.01)
    )
    assert KEY not in repr(captioner)
    result = captioner.caption(request := _request(photos))
    assert set(result.captions) == {1, 2, 3} and result.phrase == PHRASE
    assert [len(server.image_urls(i)) for i in range(2)] == [2, 1]
    assert 'use exactly "toy robot"' in server.texts(1)  # batch 2 keeps the phrase
    assert request.phrase is None


def _request(photos: list[Photo]):
    from stencil_cli.captioning import CaptionJob

    return CaptionJob(photos=photos)


def test_credentials_in_the_base_url_are_never_shown(monkeypatch) -> None:
    from stencil_cli.captioning import OpenAICaptioner

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    captioner = OpenAICaptioner(base_url="https://alice:s3cret@llm.example.com:8443/v1")
    assert captioner.host == "llm.example.com:8443"
    assert "s3cret" not in repr(captioner) and "alice" not in repr(captioner)


def test_a_new_phrase_recaptions_the_captions_that_lack_it(cli: Any, tmp_path: Path) -> None:
    from photos import add_subject

    from stencil_cli.verbs.train import check_subject

    store = add_subject(cli, tmp_path, phrase=None)
    first, second = (image["id"] for image in store.get_subject("robot").images)
    assert cli("caption", "robot", "--set", str(first), "a small red thing").exit_code == 0
    assert cli("caption", "robot", "--set", str(second), "a toy robot on grass").exit_code == 0
    result = cli("caption", "robot", "--phrase", "toy robot", "--captioner", "template")
    assert result.exit_code == 0, result.output
    subject = open_store().get_subject("robot")
    assert subject.phrase == "toy robot"
    captions = {image["id"]: image["caption"] for image in subject.images}
    assert "toy robot" in captions[first] and captions[second] == "a toy robot on grass"
    check_subject(open_store(), "robot", use_mask=True)  # trainable now


def test_caption_edit_unchanged_with_uncaptioned_photos_stores_nothing(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from photos import make_photo

    make_photo(tmp_path / "p" / "a.jpg")
    cli("add", "cat", tmp_path / "p", "--phrase", "cat")
    monkeypatch.setenv("EDITOR", "true")  # quits without changing the file
    monkeypatch.delenv("VISUAL", raising=False)
    result = cli("caption", "cat", "--edit")
    assert result.exit_code == 0, result.output
    assert open_store().get_subject("cat").images[0]["caption"] is None
