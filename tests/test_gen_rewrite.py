"""`stencil gen --rewrite`: the caption model writes the draft prompt (fake OpenAI server), cached."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import test_captioning
import test_generation
from test_captioning import completion
from test_generation import DESCRIPTION, FAST

from stencil_cli.base.pngmeta import read_png_parameters
from stencil_cli.store.db import open_store
from stencil_cli.verbs.generation_plan import GenerateRequest, plan_generation

# the fixtures these tests share with the captioning and generation tests
server = test_captioning.server
openai_env = test_captioning.openai_env
trained = test_generation.trained

WRITTEN = "a shiny red toy robot standing on the grey moon"


def _gen(cli: Any, *args: str) -> Any:
    return cli("gen", *args, *FAST)


def _records(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def _prompt_reply(text: str) -> Any:
    return completion(json.dumps({"prompt": text}))


def _cache_rows() -> list[dict[str, Any]]:
    store = open_store()
    try:
        return list(store.db.query("select * from draft_prompts"))
    finally:
        store.close()


def _plan(**fields: Any) -> Any:
    store = open_store()
    try:
        settings = {"prompts": ["on the moon"], "seed": 1, **fields}
        request = GenerateRequest(name="robot", rewrite=True, **settings)
        return plan_generation(store, request)
    finally:
        store.close()


def test_the_caption_models_draft_prompt_is_drawn_and_a_rerun_reads_it_from_the_cache(
    cli: Any, trained: str, openai_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    openai_env.replies = [_prompt_reply(WRITTEN)]
    first = _gen(cli, trained, "on the moon", "--seed", "3", "--rewrite", "--show-prompts", "--json")
    assert first.exit_code == 0, first.output
    assert len(openai_env.requests) == 1
    assert "on the moon" in openai_env.texts(0) and DESCRIPTION in openai_env.texts(0)
    assert openai_env.image_urls(0)  # the subject's photos are sent
    assert f"draft prompt: {WRITTEN}" in first.stderr
    (record,) = _records(first.stdout)
    draft = read_png_parameters(Path(record["draft_file"]))
    assert draft["draft_prompt"] == WRITTEN and draft["draft_prompt_by"] == "gpt-4o"
    image = read_png_parameters(Path(record["image_file"]))
    assert image["draft_prompt"] == WRITTEN and image["prompt"] == "a toy robot on the moon"

    monkeypatch.delenv("OPENAI_API_KEY")  # a cached draft prompt needs no key and sends nothing
    again = _gen(cli, trained, "on the moon", "--seed", "3", "--rewrite", "--json")
    assert again.exit_code == 0, again.output
    assert len(openai_env.requests) == 1
    assert f"draft prompt (cached): {WRITTEN}" in again.stderr
    (record,) = _records(again.stdout)
    assert read_png_parameters(Path(record["draft_file"]))["draft_prompt"] == WRITTEN


def test_the_cache_is_kept_per_prompt_model_and_description(trained: str, openai_env: Any) -> None:
    openai_env.replies = [_prompt_reply(WRITTEN)]
    assert _plan().items[0].draft_prompt == WRITTEN
    assert _plan().items[0].draft_prompt == WRITTEN and len(openai_env.requests) == 1
    _plan(caption_model="gpt-4o-mini")  # another model: asked again
    assert len(openai_env.requests) == 2
    assert openai_env.requests[1]["body"]["model"] == "gpt-4o-mini"
    store = open_store()
    store.update_subject("robot", description="a blue tin robot with a key in its back")
    store.close()
    _plan()  # a new description: the old draft prompt is stale
    assert len(openai_env.requests) == 3
    plan = _plan(prompts=["on the moon", "on the moon", "in a jungle"], count=2)
    assert len(openai_env.requests) == 4  # one request per distinct prompt not cached yet
    assert {item.draft_prompt for item in plan.items} == {WRITTEN}
    assert len(_cache_rows()) == 4


def test_an_answer_that_is_not_one_sentence_falls_back_to_the_rules_and_is_not_cached(
    trained: str, openai_env: Any
) -> None:
    openai_env.replies = [_prompt_reply("A robot. It stands on the moon.")]
    plan = _plan()
    assert plan.items[0].draft_prompt == f"{DESCRIPTION} on the moon"
    assert plan.items[0].draft_prompt_by is None
    assert any("was not one sentence; using the rule-made one" in note for note in plan.notes)
    assert _cache_rows() == []
    _plan()
    assert len(openai_env.requests) == 2  # nothing was kept: a rerun asks again


def test_the_template_captioner_falls_back_to_the_rule_made_draft_prompt(
    cli: Any, trained: str, openai_env: Any
) -> None:
    result = _gen(
        cli, trained, "on the moon", "--seed", "3", "--rewrite", "--captioner", "template", "--json"
    )
    assert result.exit_code == 0, result.output
    assert "the template captioner writes no draft prompt" in result.stderr
    (record,) = _records(result.stdout)
    draft = read_png_parameters(Path(record["draft_file"]))
    assert draft["draft_prompt"] == f"{DESCRIPTION} on the moon" and draft.get("draft_prompt_by") is None
    assert openai_env.requests == [] and _cache_rows() == []


def test_a_rewritten_draft_prompt_past_the_token_limit_is_kept_and_the_cut_reported(
    cli: Any, trained: str, openai_env: Any
) -> None:
    long = "a shiny red toy robot with round glass eyes and silver antennae standing on the grey dusty moon"
    openai_env.replies = [_prompt_reply(long)]  # the tiny tokenizer reads bytes: more than 77 tokens
    result = _gen(cli, trained, "on the moon", "--seed", "3", "--rewrite", "--json")
    assert result.exit_code == 0, result.output
    assert "the caption model's draft prompt passes the draft model's 77 tokens" in result.stderr
    assert "dusty moon" in result.stderr
    (record,) = _records(result.stdout)
    assert read_png_parameters(Path(record["draft_file"]))["draft_prompt"] == long


def test_without_a_key_rewrite_is_exit_1_naming_the_template_captioner(
    cli: Any, trained: str, server: Any, stencil_home: Path
) -> None:
    server.replies = [_prompt_reply(WRITTEN)]
    result = _gen(cli, trained, "on the moon", "--rewrite")
    assert result.exit_code == 1
    assert "OPENAI_API_KEY" in result.stderr and "--captioner template" in result.stderr
    assert "Traceback" not in result.output
    assert server.requests == []
    assert not list((stencil_home / "subjects" / "robot" / "generations").glob("*/*.png"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--draft-prompt", "a robot"], "--rewrite and --draft-prompt do not go together"),
        (["--no-context"], "--rewrite and --no-context do not go together"),
        (["--draft", "DRAFT"], "--rewrite and --draft do not go together"),
        (["--captioner", "llava"], "--captioner must be openai or template"),
    ],
)
def test_rewrite_is_refused_where_no_draft_prompt_is_drawn(
    cli: Any, trained: str, openai_env: Any, tmp_path: Path, extra: list[str], message: str
) -> None:
    draft = tmp_path / "draft.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 20, 30)).save(draft)
    args = [str(draft) if a == "DRAFT" else a for a in extra]
    result = _gen(cli, trained, "on the moon", "--rewrite", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert openai_env.requests == []


def test_removing_the_subject_removes_its_cached_draft_prompts(
    cli: Any, trained: str, openai_env: Any
) -> None:
    openai_env.replies = [_prompt_reply(WRITTEN)]
    _plan()
    assert len(_cache_rows()) == 1
    result = cli("rm", trained, "--yes")
    assert result.exit_code == 0, result.output
    assert _cache_rows() == []
