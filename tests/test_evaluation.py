"""Evaluation: DINO / CLIP-I / CLIP-T scores, DreamBench parsing, `stencil eval`, the runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stencil_cli import models
from stencil_cli.base.errors import BadInputError, StencilError
from stencil_cli.core import evaluation
from stencil_cli.models import EvalModelRefs, EvalModels, load_eval_models, parse_eval_models

SHARED_DREAMBENCH = Path(__file__).resolve().parents[1] / ".." / "shared" / "dreambench"

# A two-subject DreamBench in the real file's format (one object, one live subject), for the runner tests.
PROMPT_FILE = """Classes

subject_name,class
backpack,backpack
dog,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a {0} {1} in a chef outfit'.format(unique_token, class_token)
]
"""

TINY_RUN = [
    "--prompts", "2", "--images-per-prompt", "1", "--train-steps", "1", "--batch-size", "2",
    "--steps", "2", "--inner-steps", "1", "--draft-steps", "1",
    "--subject-model", "tiny", "--context-model", "tiny", "--device", "cpu", "--precision", "fp32",
    "--eval-models", "tiny", "--captioner", "template",
]  # fmt: skip


def random_image(seed: int, size: int = 64) -> Image.Image:
    """A reproducible noise picture."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


def smooth_image(seed: int, size: int = 256) -> Image.Image:
    """A smooth colour gradient (a plausible photo stand-in, large enough for `stencil add`)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    colour = rng.random(3)
    pixels = np.stack([np.outer(ramp, ramp) * c + (1 - c) * ramp[None, :] for c in colour], axis=-1)
    return Image.fromarray((pixels * 255).astype("uint8"))


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_eval_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny eval models, built once per session."""
    from stencil_cli.models import ensure_tiny_eval

    return ensure_tiny_eval(tmp_path_factory.mktemp("tiny-eval") / "tiny-eval")


@pytest.fixture
def tiny_eval(tiny_eval_build: Path, stencil_home: Path) -> Path:
    """Make `--eval-models tiny` available in this test's store (a symlink to the session build)."""
    target = stencil_home / "models" / "tiny-eval"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(tiny_eval_build, target_is_directory=True)
    return target


@pytest.fixture(scope="session")
def eval_models(tiny_eval_build: Path) -> EvalModels:
    """The tiny DINO and CLIP, loaded through the same from_pretrained path as the real ones."""
    refs = EvalModelRefs(str(tiny_eval_build / "dino"), str(tiny_eval_build / "clip"))
    return load_eval_models(refs, "cpu")


@pytest.fixture
def fake_dreambench(tmp_path: Path) -> Path:
    """A DreamBench folder with two subjects of two small photos each."""
    return make_fake_dreambench(tmp_path / "dreambench")


# -- scores -----------------------------------------------------------------------------------------------


def test_identical_images_score_one(eval_models: EvalModels) -> None:
    image = random_image(1)
    [scores] = evaluation.score_images(eval_models, [image], [image], ["a dog"])
    assert scores.dino == pytest.approx(1.0, abs=1e-5)
    assert scores.clip_i == pytest.approx(1.0, abs=1e-5)
    other = random_image(2)
    [different] = evaluation.score_images(eval_models, [other], [image], ["a dog"])
    assert different.dino < 0.99999 and different.clip_i < 0.99999


def test_scores_are_cosines_in_range_and_means(eval_models: EvalModels) -> None:
    generated = [random_image(i) for i in range(3)] + [Image.new("RGB", (80, 48), "black")]
    references = [random_image(10), smooth_image(3, 64)]
    prompts = ["a dog in the jungle", "a red backpack", "", "x" * 300]  # empty and over-long prompts too
    scores = evaluation.score_images(eval_models, generated, references, prompts)
    assert len(scores) == 4
    for item in scores:
        for value in item.to_dict().values():
            assert -1.0 <= value <= 1.0
    # DINO is the mean pairwise cosine against every reference
    dino_gen = evaluation.dino_embeddings(eval_models, generated[:1])
    dino_ref = evaluation.dino_embeddings(eval_models, references)
    assert scores[0].dino == pytest.approx(float((dino_gen @ dino_ref.T).mean()), abs=1e-5)
    mean = evaluation.mean_scores(scores)
    assert mean["dino"] == pytest.approx(sum(s.dino for s in scores) / 4)
    assert evaluation.mean_scores([]) == {"dino": None, "clip_i": None, "clip_t": None}


def test_dino_uses_the_cls_token_not_the_pooler(eval_models: EvalModels) -> None:
    assert eval_models.dino.pooler is None  # loaded with add_pooling_layer=False
    image = random_image(4)
    pixels = eval_models.dino_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        cls = eval_models.dino(pixel_values=pixels).last_hidden_state[:, 0]
    expected = torch.nn.functional.normalize(cls, dim=-1)
    assert torch.allclose(evaluation.dino_embeddings(eval_models, [image]), expected, atol=1e-6)


def test_clip_t_uses_the_prompt_text(eval_models: EvalModels) -> None:
    image = random_image(5)
    prompts = ["a dog in the jungle", "a purple teapot on a mirror"]
    scores = evaluation.score_images(eval_models, [image, image], [image], prompts)
    assert scores[0].clip_t != pytest.approx(scores[1].clip_t, abs=1e-6)
    text = evaluation.clip_text_embeddings(eval_models, prompts)
    picture = evaluation.clip_image_embeddings(eval_models, [image])
    assert scores[1].clip_t == pytest.approx(float(picture[0] @ text[1]), abs=1e-5)
    assert scores[0].clip_i == scores[1].clip_i  # the image scores do not depend on the text


def test_parse_eval_models() -> None:
    default = parse_eval_models(None)
    assert (default.dino, default.clip) == ("facebook/dino-vits16", "openai/clip-vit-base-patch32")
    assert parse_eval_models("tiny") == EvalModelRefs("tiny", "tiny")
    assert parse_eval_models("a/b,c/d") == EvalModelRefs("a/b", "c/d")
    assert parse_eval_models("clip=c/d") == EvalModelRefs("facebook/dino-vits16", "c/d")
    for bad in ("a/b", "a/b,c/d,e/f", "dino=a/b,c/d", "vit=a/b", "a/b,"):
        with pytest.raises(BadInputError):
            parse_eval_models(bad)


def test_uncached_eval_model_offline_says_how_to_pull(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(
        StencilError, match=r"facebook/dino-vits16 .* not in the Hugging Face cache"
    ) as caught:
        load_eval_models(EvalModelRefs(), "cpu")
    assert "stencil models pull dino clip" in str(caught.value)
    with pytest.raises(StencilError, match=r"stencil models pull acme/vit"):
        load_eval_models(EvalModelRefs("acme/vit", "tiny"), "cpu")


def test_models_pull_dino_clip_then_offline_eval_loads_them(
    cli,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_eval_build: Path,
    eval_models: EvalModels,
) -> None:
    """`stencil models pull dino clip` (fake Hub: safetensors only on refs/pr/N) fills the cache so that the
    default eval models load offline, unpinned and pinned to the PR revision."""
    from tests import fakehub

    cache = tmp_path / "hub"
    repos = fakehub.eval_repos(tiny_eval_build / "dino", tiny_eval_build / "clip")
    fakehub.install(monkeypatch, cache, repos)
    result = cli("models", "pull", "dino", "clip")
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = models.cached_eval_model("facebook/dino-vits16", cache)
    assert found is not None and found.weights == found.files
    loaded = load_eval_models(EvalModelRefs(), "cpu")
    images = [random_image(5), random_image(6)]
    prompts = ["a dog in the snow", "a red backpack"]
    expected = evaluation.score_images(eval_models, images[:1], images[1:], prompts[:1])[0].to_dict()
    scores = evaluation.score_images(loaded, images[:1], images[1:], prompts[:1])[0].to_dict()
    assert scores == pytest.approx(expected, abs=1e-5)
    assert torch.allclose(
        evaluation.clip_text_embeddings(loaded, prompts),
        evaluation.clip_text_embeddings(eval_models, prompts),
    )
    pinned = EvalModelRefs("facebook/dino-vits16@refs/pr/2", "openai/clip-vit-base-patch32@refs/pr/5")
    again = load_eval_models(pinned, "cpu")
    assert torch.allclose(
        evaluation.dino_embeddings(again, images), evaluation.dino_embeddings(eval_models, images), atol=1e-6
    )


@pytest.mark.parametrize("layout", ["split", "one-snapshot"])
def test_offline_hub_model_loads_from_the_cache(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_eval_build: Path,
    eval_models: EvalModels,
    layout: str,
) -> None:
    """Safetensors live on a `refs/pr/N` snapshot; configs on main's ("split", an online first run) or beside
    the weights ("one-snapshot", `hf download --revision refs/pr/N`). Offline, both are found."""
    import shutil

    cache = tmp_path / "hub"
    repo = cache / "models--facebook--dino-vits16"
    pr_sha, main_sha = "1" * 40, "2" * 40
    source = tiny_eval_build / "dino"
    (repo / "snapshots" / pr_sha).mkdir(parents=True)
    (repo / "snapshots" / main_sha).mkdir(parents=True)
    shutil.copy(source / "model.safetensors", repo / "snapshots" / pr_sha)
    config_home = main_sha if layout == "split" else pr_sha
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(source / name, repo / "snapshots" / config_home / name)
    (repo / "refs" / "refs" / "pr").mkdir(parents=True)
    (repo / "refs" / "refs" / "pr" / "1").write_text(pr_sha)
    (repo / "refs" / "main").write_text(main_sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    found = models.cached_eval_model("facebook/dino-vits16", cache)
    assert found is not None
    assert (found.weights.name, found.files.name) == (pr_sha, config_home)
    refs = EvalModelRefs("facebook/dino-vits16", str(tiny_eval_build / "clip"))
    loaded = load_eval_models(refs, "cpu")
    image = random_image(3)
    expected = evaluation.dino_embeddings(eval_models, [image])
    assert torch.allclose(evaluation.dino_embeddings(loaded, [image]), expected, atol=1e-6)
    assert models.split_revision("owner/name@refs/pr/1") == ("owner/name", "refs/pr/1")


# -- DreamBench prompts -----------------------------------------------------------------------------------


@pytest.mark.skipif(not SHARED_DREAMBENCH.is_dir(), reason="shared DreamBench folder absent")
def test_shared_prompt_file_parses() -> None:
    bench = evaluation.load_dreambench(SHARED_DREAMBENCH)
    assert len(bench.subjects) == 30
    assert len(bench.object_prompts) == 25 and len(bench.live_prompts) == 25
    live = sorted(name for name, subject in bench.subjects.items() if subject.live)
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    for name in bench.subjects:
        assert len(bench.prompts(name)) == 25
    assert bench.subjects["robot_toy"].class_word == "toy"
    assert bench.subjects["bear_plushie"].class_word == "stuffed animal"
    assert bench.prompts("dog")[10] == "a dog wearing a red hat"  # live list
    assert bench.prompts("backpack")[10] == "a backpack with a wheat field in the background"  # object list
    assert bench.prompts("robot_toy")[-1] == "a cube shaped toy"
    assert evaluation.format_prompt(bench.object_prompts[0], "dog", "sks") == "a sks dog in the jungle"
    present = evaluation.available_subjects(bench, SHARED_DREAMBENCH)
    assert {"backpack", "cat", "dog", "robot_toy", "teapot"} <= set(present)


def test_subject_selection_errors(fake_dreambench: Path) -> None:
    bench = evaluation.load_dreambench(fake_dreambench)
    assert evaluation.select_subjects(bench, fake_dreambench, None) == ["backpack", "dog"]
    with pytest.raises(BadInputError, match="unknown DreamBench subject 'dgo'; did you mean 'dog'"):
        evaluation.select_subjects(bench, fake_dreambench, ["dgo"])
    prompt_file = fake_dreambench / "prompts_and_classes.txt"
    prompt_file.write_text("Classes\n\nsubject_name,class\n", encoding="utf-8")
    with pytest.raises(BadInputError, match="no object prompts"):
        evaluation.load_dreambench(fake_dreambench)


def test_bench_bad_input_is_a_clear_error(cli, tmp_path: Path, fake_dreambench: Path) -> None:
    empty = tmp_path / "not-dreambench"
    empty.mkdir()
    result = cli("bench", "dreambench", empty)
    assert result.exit_code == 2
    assert "has no prompts_and_classes.txt" in result.output and "Traceback" not in result.output
    result = cli("bench", "dreambench", fake_dreambench, "--subjects", "dog,teapot")
    assert result.exit_code == 2
    assert "unknown DreamBench subject 'teapot'" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "2000"], "Invalid value for '--steps'"),
        (["--lr", "0"], "--lr must be a positive number (got 0.0)"),
        (["--lr", "-1e-5"], "--lr must be a positive number"),
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--tau", "1001"], "--tau must be in [0, 1000]"),
    ],
)
def test_bench_settings_that_cannot_work_are_refused_before_any_work(
    cli, tmp_path: Path, fake_dreambench: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "results"
    result = cli("bench", "dreambench", fake_dreambench, "--out", out, *TINY_RUN, *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not out.exists()  # nothing was started


def test_bench_config_validates_everything_it_will_use(fake_dreambench: Path, tmp_path: Path) -> None:
    from stencil_cli.base.errors import FieldError
    from stencil_cli.cli.kit import flag_name
    from stencil_cli.verbs.bench import BenchConfig

    good = BenchConfig(dataset=fake_dreambench, out=tmp_path, subjects=["dog"])
    good.validate()
    for changes, field, message in [
        ({"steps": 2000}, "steps", "--steps must be in [1, 1000] (got 2000)"),
        ({"train_steps": 0}, "train_steps", "--train-steps must be at least 1 (got 0)"),
        ({"lr": float("inf")}, "lr", "--lr must be a positive number"),
        ({"inner_steps": 0}, "inner_steps", "--inner-steps must be at least 1"),
        ({"inversion": "ddim"}, "inversion", "--inversion must be nti or npi"),
    ]:
        config = BenchConfig(dataset=fake_dreambench, out=tmp_path, subjects=["dog"], **changes)
        with pytest.raises(FieldError) as caught:
            config.validate()
        assert caught.value.fields == (field,)  # the setting's own name; the CLI shows its flag
        shown = caught.value.render({name: flag_name(name) for name in caught.value.fields})
        assert shown == message or message in shown


# -- stencil eval -----------------------------------------------------------------------------------------


def test_eval_command_scores_and_stores(
    cli, tmp_path: Path, tiny_eval: Path, eval_models: EvalModels
) -> None:
    from stencil_cli.store.db import open_store

    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(2):
        smooth_image(k).save(photos / f"{k}.png")
    assert cli("add", "rex", photos, "--phrase", "dog").exit_code == 0
    store = open_store()
    subject = store.get_subject("rex")
    first = store.add_generation(
        subject, {"prompt": "a dog in the snow", "seed": 0, "image_file": Path(subject.images[0]["file"])}
    )
    out = store.generation_dir("rex") / "x.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    random_image(7).save(out)
    second = store.add_generation(subject, {"prompt": "on the beach", "seed": 1, "image_file": out})

    result = cli("eval", "rex", "--eval-models", "tiny", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [row["id"] for row in data["generations"]] == [first.id, second.id]
    by_id = {row["id"]: row for row in data["generations"]}
    # generation 1 is photo 0 itself: its CLIP-I is the mean of 1.0 and its cosine with photo 1
    photo_embeddings = evaluation.clip_image_embeddings(eval_models, [smooth_image(0), smooth_image(1)])
    expected = (1.0 + float(photo_embeddings[0] @ photo_embeddings[1])) / 2
    assert by_id[first.id]["scores"]["clip_i"] == pytest.approx(expected, abs=1e-4)
    assert by_id[second.id]["clip_t_text"] == "a dog on the beach"  # the subject prompt, phrase included
    stored = store.get_generation(second.id).scores
    assert stored["clip_t"] == pytest.approx(by_id[second.id]["scores"]["clip_t"])
    assert stored["eval_models"] == {"dino": "tiny", "clip": "tiny"}
    assert data["mean"]["dino"] == pytest.approx(
        (by_id[first.id]["scores"]["dino"] + by_id[second.id]["scores"]["dino"]) / 2
    )

    only = cli("eval", "rex", "--eval-models", "tiny", "--generations", str(second.id))
    assert only.exit_code == 0 and "on the beach" in only.stdout and "snow" not in only.stdout
    assert f"on the beach | {out}" in only.stdout  # tau, seed and file tell two images apart
    assert only.stdout.splitlines()[0].split()[4:7] == ["tau", "seed", "prompt"]
    missing = cli("eval", "rex", "--eval-models", "tiny", "--generations", "999")
    assert missing.exit_code == 1 and "no generation(s) 999" in missing.output
    assert "stencil images rex" in missing.output
    assert cli("eval", "rex", "--generations", "x").exit_code == 2


def test_eval_with_every_image_file_missing_fails_before_loading_models(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from photos import add_subject

    def no_models(*args, **kwargs):
        raise AssertionError("the eval models were loaded")

    monkeypatch.setattr(models, "load_eval_models", no_models)
    store = add_subject(cli, tmp_path)
    subject = store.get_subject("robot")
    run = store.create_run("robot", {"subject_model": "tiny"}, base_model="tiny")
    for seed in (1, 2):
        gone = store.generation_dir("robot") / f"s{seed}.png"
        store.add_generation(subject, {"run_id": run.id, "prompt": "p", "seed": seed, "image_file": gone})
    result = cli("eval", "robot", "--eval-models", "tiny")
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "generation 1: image file missing" in text and "generation 2: image file missing" in text
    assert "none of the 2 selected image file(s) of 'robot' exist" in text


def test_score_generations_reports_each_missing_file_by_id(cli, tmp_path: Path) -> None:
    from unittest import mock

    from photos import add_subject

    from stencil_cli.verbs.evaluate import score_generations

    store = add_subject(cli, tmp_path)
    subject = store.get_subject("robot")
    there = store.generation_dir("robot") / "there.png"
    there.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(there)
    rows = [
        store.add_generation(subject, {"prompt": "p", "seed": 1, "image_file": there}),
        store.add_generation(subject, {"prompt": "p", "seed": 2, "image_file": there.with_name("gone.png")}),
    ]
    missing: list[int] = []
    score = mock.Mock(to_dict=lambda: {"dino": 1.0})
    loaded = mock.Mock(refs=mock.Mock(to_dict=lambda: {"dino": "tiny", "clip": "tiny"}))
    with (
        mock.patch.object(evaluation, "embed_references", return_value=mock.Mock(count=2)),
        mock.patch.object(evaluation, "score_images", return_value=[score]),
    ):
        scored = score_generations(store, subject, rows, loaded, on_missing=lambda g: missing.append(g.id))
    assert [image.id for image in scored] == [rows[0].id] and missing == [rows[1].id]
    assert store.get_generation(rows[0].id).scores["dino"] == 1.0
    assert store.get_generation(rows[1].id).scores is None


# -- the runner -------------------------------------------------------------------------------------------


def score_rows(results: dict) -> list[tuple]:
    """The merged table without timings, rounded to the table's precision."""
    return [
        (row["subject"], row["images"], *(round(row[key], 4) for key in ("dino", "clip_t", "clip_i")))
        for row in results["subjects"]
    ]


def table_without_time(markdown: str) -> list[str]:
    """The Markdown table minus its GPU-seconds column."""
    return [line.rsplit("|", 2)[0] for line in markdown.splitlines() if line.startswith("|")]


def make_fake_dreambench(root: Path) -> Path:
    """A DreamBench folder with two subjects (an object and a live one) of two small photos each."""
    for index, name in enumerate(("backpack", "dog")):
        (root / name).mkdir(parents=True)
        for k in range(2):
            smooth_image(10 * index + k).save(root / name / f"{k:02d}.png")
    (root / "prompts_and_classes.txt").write_text(PROMPT_FILE, encoding="utf-8")
    return root


def link_tiny_models(home: Path, tiny_models: Path, tiny_eval_models: Path) -> None:
    """Make the tiny preset and the tiny eval models available in the store at `home`."""
    (home / "models").mkdir(parents=True, exist_ok=True)
    for name, source in (("tiny", tiny_models), ("tiny-eval", tiny_eval_models)):
        if not (home / "models" / name).exists():
            (home / "models" / name).symlink_to(source, target_is_directory=True)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for the runner tests (restored after): the CI CPUs are shared, and two threads
    fighting other processes for two cores make tiny convolutions hundreds of times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def reference_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path, tiny_eval_build: Path, one_thread: None
) -> tuple[Path, Path]:
    """An uninterrupted single-process run of the runner on the tiny preset: (out folder, dataset)."""
    from typer.testing import CliRunner

    from stencil_cli.cli import app

    base = tmp_path_factory.mktemp("reference-run")
    dataset = make_fake_dreambench(base / "dreambench")
    link_tiny_models(base / "home", tiny_models_dir, tiny_eval_build)
    out = base / "single"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STENCIL_HOME", str(base / "home"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        args = ["bench", "dreambench", str(dataset), "--out", str(out), *TINY_RUN, "--json"]
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, dataset


@pytest.fixture
def runner_home(stencil_home: Path, tiny_models_dir: Path, tiny_eval_build: Path, one_thread: None) -> Path:
    """This test's store with the tiny preset and tiny eval models linked in."""
    link_tiny_models(stencil_home, tiny_models_dir, tiny_eval_build)
    return stencil_home


def test_runner_completes_and_resumes_after_interruption(
    cli, tmp_path: Path, reference_run: tuple[Path, Path], runner_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stencil_cli.core import generation
    from stencil_cli.store.db import Store
    from stencil_cli.verbs import bench

    reference_run, fake_dreambench = reference_run
    reference = json.loads((reference_run / "results.json").read_text())
    assert [row["subject"] for row in reference["subjects"]] == ["backpack", "dog"]
    assert reference["overall"]["images"] == 4 and all(row["images"] == 2 for row in reference["subjects"])
    for key in ("dino", "clip_t", "clip_i"):
        assert -1 <= reference["overall"][key] <= 1
    for name in ("backpack", "dog"):
        assert (reference_run / "subjects" / name / "contact-sheet.png").is_file()
    assert (reference_run / "scores.png").is_file() and (reference_run / "results.md").is_file()
    dog = json.loads((reference_run / "subjects" / "dog" / "result.json").read_text())
    assert [p["prompt"] for p in dog["prompts"]] == ["a dog in the jungle", "a dog wearing a red hat"]
    assert dog["prompts"][1]["text"] == "a dog wearing a red hat" and dog["gpu_seconds"] > 0

    real_guided = generation.guided_images
    calls: list[str] = []

    def interrupt_at_fourth(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 4:  # the second image of the second subject
            raise KeyboardInterrupt
        return real_guided(*args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(generation, "guided_images", interrupt_at_fourth)
    result = cli("bench", "dreambench", fake_dreambench, "--out", out, *TINY_RUN)
    assert result.exit_code == 130
    assert (out / "subjects" / "backpack" / "result.json").is_file()
    assert not (out / "subjects" / "dog" / "result.json").exists()
    assert not (out / "results.json").exists()
    backpack_mtime = (out / "subjects" / "backpack" / "result.json").stat().st_mtime_ns

    calls.clear()
    trained: list[str] = []
    real_train = bench.Runner.train

    def counting_train(self, job):
        trained.append(job.name)
        return real_train(self, job)

    monkeypatch.setattr(bench.Runner, "train", counting_train)
    result = cli("bench", "dreambench", fake_dreambench, "--out", out, *TINY_RUN)
    assert result.exit_code == 0, result.output
    assert calls == ["a dog wearing a red hat"]  # only the missing image was made
    assert trained == ["dog"]  # its finished run was found again, not retrained
    store = Store(out / "store")
    assert [run.status for run in store.list_runs("dog")] == ["done"]
    assert len(store.list_generations("dog")) == 2
    # the runner trains and generates through the same code as `stencil train` / `stencil gen`
    row = store.list_generations("dog")[0]
    assert {"guidance", "null_lr", "draft_steps", "inner_steps", "inversion", "bench"} <= row.params.keys()
    assert row.draft_file is not None and row.draft_file.is_file()
    (run,) = store.list_runs("dog")
    assert len(list((store.run_dir("dog", run.id) / "masks").glob("*.png"))) == 2
    assert run.params["bench"]["train_steps"] == run.params["steps"]
    store.close()
    assert (out / "subjects" / "backpack" / "result.json").stat().st_mtime_ns == backpack_mtime
    resumed = json.loads((out / "results.json").read_text())
    assert score_rows(resumed) == score_rows(reference)

    # a finished benchmark is not redone; other settings in the same folder are refused
    calls.clear()
    assert cli("bench", "dreambench", fake_dreambench, "--out", out, *TINY_RUN).exit_code == 0
    assert calls == []
    changed = cli("bench", "dreambench", fake_dreambench, "--out", out, *TINY_RUN, "--tau", "200")
    assert changed.exit_code == 2 and "other settings (tau" in changed.output


def test_two_process_sharded_run_matches_single_process(
    cli, tmp_path: Path, reference_run: tuple[Path, Path], runner_home: Path
) -> None:
    reference_run, fake_dreambench = reference_run
    out = tmp_path / "sharded"
    result = cli("bench", "dreambench", fake_dreambench, "--out", out, *TINY_RUN, "--num-processes", "2")
    assert result.exit_code == 0, result.output
    sharded = json.loads((out / "results.json").read_text())
    reference = json.loads((reference_run / "results.json").read_text())
    assert score_rows(sharded) == score_rows(reference)
    assert table_without_time((out / "results.md").read_text()) == table_without_time(
        (reference_run / "results.md").read_text()
    )
    # each process ran one subject (round robin), on the CPU
    made_by = {
        name: json.loads((out / "subjects" / name / "result.json").read_text())["process"]
        for name in ("backpack", "dog")
    }
    assert made_by == {
        "backpack": {"rank": 0, "world": 2, "device": "cpu"},
        "dog": {"rank": 1, "world": 2, "device": "cpu"},
    }
    assert "backpack" in result.stdout and "overall" in result.stdout
    assert os.environ.get("WORLD_SIZE") is None  # the test process itself stays a single process
