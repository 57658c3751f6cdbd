"""Prompt rules: descriptions as one noun phrase; draft prompts keep the context within CLIP's limit."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from stencil_cli.captioning import OpenAICaptioner, Photo, TemplateCaptioner, parse_answer
from stencil_cli.core.evaluation import format_prompt, load_dreambench
from stencil_cli.core.prompts import (
    CLIP_TOKEN_LIMIT,
    build_prompts,
    clean_rewritten_prompt,
    clip_token_counter,
    description_problems,
    noun_phrase_description,
)
from stencil_cli.models import byte_level_clip_tokenizer

DREAMBENCH = Path("/work/shared/dreambench")
if not DREAMBENCH.is_dir():  # the shared data sits beside the repository
    DREAMBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "dreambench"

ONE_SENTENCE = "a small red nylon backpack with black straps, a white logo patch and a front zip pocket"
SEVERAL = (
    "A small red backpack made of nylon with black straps, a white logo patch and a front zip pocket. "
    "It has silver zippers. The straps are padded."
)
DOG_SEVERAL = "The subject is a fluffy corgi with a white chest and tan back. Its ears are large and upright."


def words_and_marks(text: str) -> int:
    """A stand-in for CLIP's BPE: one token per word and per punctuation mark, plus start and end."""
    return len(re.findall(r"\w+|[^\w\s]", text)) + 2


def byte_tokens() -> Any:
    """The tiny preset's CLIP tokenizer: one token per character, so 75 characters fill the window."""
    return clip_token_counter(byte_level_clip_tokenizer())


def context_parts(prompt: str, phrase: str) -> tuple[str, str]:
    """The user's words around the phrase: modifiers before it (article dropped) and the clause after it."""
    before, _, after = prompt.partition(phrase)
    modifiers = " ".join(before.split()[1:]) if before.split()[:1] in (["a"], ["an"]) else before.strip()
    return modifiers, after.strip()


# -- descriptions ---------------------------------------------------------------------------------------


def test_a_description_of_several_sentences_is_reduced_to_its_first_noun_phrase() -> None:
    reduced = noun_phrase_description(SEVERAL)
    assert reduced.reduced
    assert reduced.text == (
        "a small red backpack made of nylon with black straps, a white logo patch and a front zip pocket"
    )
    assert not description_problems(reduced.text)
    dog = noun_phrase_description(DOG_SEVERAL)
    assert dog.text == "a fluffy corgi with a white chest and tan back" and dog.reduced
    # a noun phrase is kept as it is, and not flagged
    kept = noun_phrase_description(ONE_SENTENCE)
    assert kept.text == ONE_SENTENCE and not kept.reduced


def test_a_description_that_is_no_noun_phrase_gives_way_to_the_phrase_with_a_flag() -> None:
    gone = noun_phrase_description("It has silver zippers. It is red.")
    assert gone.text is None and gone.reduced
    prompts = build_prompts("next to the Eiffel tower", "backpack", "It has silver zippers. It is red.")
    assert prompts.draft_prompt == "a backpack next to the Eiffel tower"
    assert prompts.description_reduced and prompts.description is None


def test_a_long_description_is_cut_to_25_words_at_a_clause_boundary() -> None:
    long = "a backpack " + " ".join(f"with pocket{i}," for i in range(30))
    reduced = noun_phrase_description(long)
    assert reduced.text is not None and len(reduced.text.split()) <= 25
    assert not reduced.text.endswith((",", "with"))


def test_the_issue_example_reads_as_one_sentence() -> None:
    prompts = build_prompts("a backpack next to the Eiffel tower", "backpack", SEVERAL)
    assert prompts.draft_prompt == (
        "a small red backpack made of nylon with black straps, a white logo patch and a front zip pocket "
        "next to the Eiffel tower"
    )
    assert prompts.description_reduced


# -- the draft prompt against every DreamBench prompt ---------------------------------------------------


def dreambench_prompts() -> list[tuple[str, str]]:
    """(prompt, phrase) for every object and live-subject template (backpack and dog)."""
    if not (DREAMBENCH / "prompts_and_classes.txt").is_file():
        pytest.skip("the DreamBench prompt file is not beside the repository")
    bench = load_dreambench(DREAMBENCH)
    assert len(bench.object_prompts) == 25 and len(bench.live_prompts) == 25
    return [(format_prompt(t, "backpack"), "backpack") for t in bench.object_prompts] + [
        (format_prompt(t, "dog"), "dog") for t in bench.live_prompts
    ]


@pytest.mark.parametrize("counter", ["none", "clip-like", "tiny-bytes"])
@pytest.mark.parametrize("kind", ["one", "several"])
def test_every_dreambench_draft_keeps_the_context_clause_whole_after_one_description(
    kind: str, counter: str
) -> None:
    count = {"none": None, "clip-like": words_and_marks, "tiny-bytes": byte_tokens()}[counter]
    for prompt, phrase in dreambench_prompts():
        description = (ONE_SENTENCE if kind == "one" else SEVERAL) if phrase == "backpack" else DOG_SEVERAL
        prompts = build_prompts(prompt, phrase, description, count_tokens=count)
        draft = prompts.draft_prompt
        modifiers, clause = context_parts(prompt, phrase)
        # the whole context clause, last, with no sentence break before it (or anywhere)
        assert draft.endswith(clause), (prompt, draft)
        assert not re.search(r"[.!?;]", draft), (prompt, draft)
        if modifiers:
            assert re.match(rf"an? {modifiers} ", draft), (prompt, draft)
        # the description (as used) exactly once; the subject phrase stands in only when it was dropped
        used = re.sub(r"^(?:a|an|the) ", "", prompts.description or phrase)
        assert draft.count(used) == 1, (prompt, draft)
        if prompts.description is not None:
            full = noun_phrase_description(description).text
            assert full is not None and full.startswith(prompts.description)
        # within CLIP's window: nothing of the user's prompt falls past it
        if count is not None:
            assert count(draft) <= CLIP_TOKEN_LIMIT, (prompt, draft)
            assert prompts.cut is None
        assert prompts.prompt == prompt


def test_on_the_tiny_tokenizer_the_eiffel_tower_survives_and_the_description_is_shortened() -> None:
    count = byte_tokens()
    prompts = build_prompts("a backpack next to the Eiffel tower", "backpack", SEVERAL, count_tokens=count)
    assert prompts.draft_prompt.endswith("next to the Eiffel tower")
    assert prompts.shortened and prompts.cut is None
    assert count(prompts.draft_prompt) <= CLIP_TOKEN_LIMIT
    # without the counter the description is whole, and the tiny encoder would lose the Eiffel tower
    whole = build_prompts("a backpack next to the Eiffel tower", "backpack", SEVERAL).draft_prompt
    assert count(whole) > CLIP_TOKEN_LIMIT


def test_a_user_prompt_longer_than_the_window_reports_what_is_cut() -> None:
    long_prompt = "on a beach " + " ".join(["with golden sand and tall palm trees"] * 12)
    prompts = build_prompts(long_prompt, "dog", "a corgi", count_tokens=words_and_marks)
    assert prompts.cut is not None and prompts.cut.endswith("palm trees")
    assert prompts.draft_prompt.startswith("a dog on a beach")  # the description went first


def test_a_draft_prompt_given_by_hand_replaces_the_rules() -> None:
    prompts = build_prompts("in the snow", "dog", "a corgi", draft_prompt="  a  corgi puppy in deep snow ")
    assert prompts.draft_prompt == "a corgi puppy in deep snow" and prompts.overridden
    assert prompts.prompt == "a dog in the snow"
    long = build_prompts("x", "dog", draft_prompt="dog " * 100, count_tokens=words_and_marks)
    assert long.cut is not None


# -- the captioner's description and the vision-model draft prompt --------------------------------------


def test_a_multi_sentence_description_in_an_answer_is_a_problem_and_the_repair_reduces_it(
    tmp_path: Path,
) -> None:
    photos = [Photo(1, tmp_path / "a.png")]
    text = json.dumps(
        {"phrase": "backpack", "description": SEVERAL, "captions": [{"photo": 1, "caption": "a backpack"}]}
    )
    parsed = parse_answer(text, photos, None)
    assert any("noun phrase" in problem for problem in parsed.problems)
    assert parsed.repairable
    result = parsed.to_result("openai:test", repair=True)
    assert result.description == noun_phrase_description(SEVERAL).text
    assert any("reduced the description" in note for note in result.notes)
    good = parse_answer(text.replace(SEVERAL, ONE_SENTENCE), photos, None)
    assert not good.problems


def test_the_vision_model_writes_one_sentence_or_the_rules_take_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    photos = [Photo(1, tmp_path / "a.png")]
    captioner = OpenAICaptioner(api_key="sk-test", base_url="http://127.0.0.1:9")
    sent: list[Any] = []

    def fake_complete(messages: list[dict[str, Any]], *, schema: Any = None) -> str:
        sent.append((messages, schema))
        return answers.pop(0)

    monkeypatch.setattr(captioner, "complete", fake_complete)
    answers = ['{"prompt": "\\"A small red nylon backpack next to the Eiffel tower.\\""}']
    user_prompt = "a backpack next to the Eiffel tower"
    draft = captioner.write_draft_prompt(photos, user_prompt, "backpack", ONE_SENTENCE)
    assert draft == "A small red nylon backpack next to the Eiffel tower"
    messages, schema = sent[0]
    instruction = messages[1]["content"][0]["text"]
    assert "a backpack next to the Eiffel tower" in instruction and ONE_SENTENCE in instruction
    assert messages[1]["content"][1]["type"] == "image_url" and schema[0] == "draft_prompt"
    answers = ['{"prompt": "A red backpack. It stands next to the Eiffel tower."}']
    assert captioner.write_draft_prompt(photos, "next to the Eiffel tower", "backpack", None) is None
    assert TemplateCaptioner().write_draft_prompt(photos, "in the snow", "dog", None) is None


def test_clean_rewritten_prompt() -> None:
    assert clean_rewritten_prompt("  'a corgi in the snow.' ") == "a corgi in the snow"
    assert clean_rewritten_prompt("Prompt: a corgi in the snow") == "a corgi in the snow"
    assert clean_rewritten_prompt("a corgi.\nIn the snow") is None
    assert clean_rewritten_prompt("word " * 61) is None
    assert clean_rewritten_prompt("") is None


@pytest.mark.parametrize(
    ("words", "article"),
    [
        ("unicorn plush", "a"),
        ("umbrella", "an"),
        ("European cat", "a"),
        ("one-eyed teddy", "a"),
        ("hour glass", "an"),
        ("orange backpack", "an"),
        ("toy robot", "a"),
        ("useful tool", "a"),
        ("", "a"),
    ],
)
def test_one_article_rule_by_sound_for_prompts_and_captions(words: str, article: str) -> None:
    from stencil_cli.base.text import indefinite_article
    from stencil_cli.captioning.phrases import article as caption_article

    assert indefinite_article(words) == article == caption_article(words)


def test_a_unicorn_prompt_reads_a_photo_of_a_unicorn() -> None:
    from stencil_cli.captioning.phrases import insert_phrase

    assert insert_phrase("", "unicorn plush").startswith("a photo of a unicorn plush")
