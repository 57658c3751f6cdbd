"""The DreamBench runner (stencil_cli.verbs.bench): its settings, its out folder, sharding, the merge, and
that it adds, captions, trains and generates through the same verbs as the CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from photos import add_subject

from stencil_cli.base.errors import BadInputError, FieldError, StencilError
from stencil_cli.verbs import bench
from stencil_cli.verbs.common import subject_lock
from stencil_cli.verbs.generate import SavedDraft, SavedImage


def _job(name: str = "robot") -> bench.SubjectJob:
    return bench.SubjectJob(name, "robot", False, ["a {0} {1}"], [(0, 0)])


# -- settings and the out folder ----------------------------------------------------------------------------


def test_bench_config_refuses_seeds_that_do_not_fit(tmp_path: Path) -> None:
    last = 2**63 - 1
    where = {"dataset": tmp_path, "out": tmp_path, "subjects": ["dog"], "images_per_prompt": 4}
    bench.BenchConfig(**where, seed=last - 3).validate()
    config = bench.BenchConfig(**where, seed=last - 2)
    with pytest.raises(FieldError, match="seed must be in") as caught:
        config.validate()
    assert caught.value.fields == ("seed",)


def test_bench_config_names_the_training_steps_train_steps(tmp_path: Path) -> None:
    config = bench.BenchConfig(dataset=tmp_path, out=tmp_path, subjects=["dog"], train_steps=0)
    with pytest.raises(FieldError) as caught:
        config.validate()
    assert caught.value.fields == ("train_steps",)  # not `steps`: those are the DDIM steps here


def test_the_bench_command_shows_a_bad_training_step_count_as_train_steps(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stencil_cli.cli import bench as bench_command

    class ZeroTrainSteps(bench.BenchConfig):
        def __init__(self, **values: Any) -> None:
            super().__init__(**{**values, "train_steps": 0})  # past the flag's min=1: the config names it

    monkeypatch.setattr(bench_command, "BenchConfig", ZeroTrainSteps)
    dataset = tmp_path / "dreambench"
    dataset.mkdir()
    result = cli("bench", "dreambench", dataset, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    text = " ".join(result.stderr.split())
    assert "--train-steps must be at least 1 (got 0)" in text and "Traceback" not in result.output


def test_bench_refuses_an_out_path_that_is_a_file(cli: Any, tmp_path: Path) -> None:
    out_file = tmp_path / "results.jpg"
    out_file.write_text("x")
    result = cli("bench", "dreambench", tmp_path, "--out", out_file)
    assert result.exit_code == 2 and "is a file" in result.stderr


def test_the_fingerprint_and_the_training_key_are_the_settings_marked_on_the_fields(tmp_path: Path) -> None:
    config = bench.BenchConfig(dataset=tmp_path, out=tmp_path, subjects=["dog"])
    assert list(config.fingerprint()) == [
        "train_steps", "batch_size", "lr", "steps", "inner_steps", "inversion", "draft_steps", "tau", "seed",
        "captioner", "caption_model", "subject_model", "context_model", "precision", "no_t5", "eval_dino",
        "eval_clip",
    ]  # fmt: skip
    assert sorted(config.train_key()) == sorted(
        ["train_steps", "batch_size", "lr", "seed", "subject_model", "precision", "captioner"]
    )
    config.tau = 20.0
    assert config.fingerprint()["tau"] == 20.0 and "tau" not in config.train_key()


@pytest.mark.parametrize("captioner", ["openai", "template"])
def test_every_bench_setting_reaches_the_launched_processes(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captioner: str
) -> None:
    from test_evaluation import make_fake_dreambench

    from stencil_cli.cli import bench as bench_command
    from stencil_cli.store.db import open_store

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")  # the vision captioner needs a key; nothing is asked
    dataset = make_fake_dreambench(tmp_path / "dreambench").resolve()
    given = {
        "dataset": dataset, "out": (tmp_path / "out").resolve(), "subjects": ["dog"], "prompts": 2,
        "images_per_prompt": 3, "train_steps": 7, "batch_size": 3, "lr": 3e-5, "steps": 20, "inner_steps": 4,
        "inversion": "npi", "draft_steps": 9, "tau": 35.5, "seed": 11, "captioner": captioner,
        "caption_model": "gpt-x" if captioner == "openai" else None, "subject_model": "tiny",
        "context_model": "tiny", "device": "cpu", "precision": "fp32", "no_t5": True,
        "eval_dino": "org/dino-x", "eval_clip": "org/clip-x",
        "models_root": open_store().root,  # each process settles it again from the same store
    }  # fmt: skip
    names = [item.name for item in dataclasses.fields(bench.BenchConfig)]
    assert sorted(given) == sorted(names)
    defaults = bench.BenchConfig(dataset=tmp_path, out=tmp_path, subjects=[])
    same = [name for name in names if getattr(defaults, name) == given[name]]
    assert same == (["caption_model"] if captioner == "template" else ["captioner"])  # the others changed
    config = bench.BenchConfig(**given)
    launched: list[bench.BenchConfig] = []
    monkeypatch.setattr(bench_command, "_run_here", lambda config: launched.append(config))
    result = cli(*bench_command.child_args(config))
    assert result.exit_code == 0, result.output
    assert dataclasses.asdict(launched[0]) == dataclasses.asdict(config)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"dataset": "x"}'])
def test_an_unreadable_bench_file_is_a_clear_error(tmp_path: Path, content: str) -> None:
    config = bench.BenchConfig(dataset=tmp_path, out=tmp_path / "out", subjects=["dog"])
    bench.check_out_folder(config)  # creates it
    path = config.out / bench.BENCH_FILE
    bench.check_out_folder(config)  # reads it back: the same settings
    path.write_text(content, encoding="utf-8")
    with pytest.raises(BadInputError, match="bench.json cannot be read as a benchmark's settings"):
        bench.check_out_folder(config)


# -- sharding and the merge ---------------------------------------------------------------------------------


def test_a_failing_shard_still_reaches_the_final_barrier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stencil_cli.core import evaluation

    waits: list[int] = []
    state = SimpleNamespace(device=SimpleNamespace(type="cpu"), wait_for_everyone=lambda: waits.append(1))
    config = bench.BenchConfig(dataset=tmp_path, out=tmp_path / "out", subjects=["cat", "dog"])
    monkeypatch.setattr(evaluation, "load_dreambench", lambda path: None)
    jobs = [bench.SubjectJob(name, name, False, ["a {0} {1}"], [(0, 0)]) for name in ("cat", "dog")]
    monkeypatch.setattr(bench, "plan", lambda config, dataset: jobs)

    def fail(self: Any, job: Any) -> None:
        raise RuntimeError(f"{job.name} failed")

    monkeypatch.setattr(bench.Runner, "run_subject", fail)
    monkeypatch.setattr(bench, "locate_models", lambda config: None)  # models are not what this is about
    with pytest.raises(RuntimeError, match="dog failed"):
        bench.run_benchmark(config, bench.Shard(rank=1, world=2, state=state))
    assert len(waits) == 2  # the start barrier and the final one


def test_a_missing_eval_model_is_reported_before_the_first_subject_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_preset: Path
) -> None:
    from stencil_cli.core import evaluation

    config = bench.BenchConfig(
        dataset=tmp_path,
        out=tmp_path / "out",
        subjects=["cat"],
        subject_model="tiny",
        context_model="tiny",
        eval_dino="facebook/dino-vits16",
        eval_clip="openai/clip-vit-base-patch32",
    )
    config.models_root = tiny_preset.parent.parent
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(evaluation, "load_dreambench", lambda path: None)
    jobs = [bench.SubjectJob("cat", "cat", False, [], [])]
    monkeypatch.setattr(bench, "plan", lambda config, dataset: jobs)

    def trained_first(self: Any, job: Any) -> None:
        raise AssertionError("a subject trained before the eval models were found")

    monkeypatch.setattr(bench.Runner, "run_subject", trained_first)
    missing = "eval model facebook/dino-vits16 .* is not in the Hugging Face cache"
    with pytest.raises(StencilError, match=missing):
        bench.run_benchmark(config)


def test_merge_results_names_every_missing_subject(tmp_path: Path) -> None:
    config = bench.BenchConfig(dataset=tmp_path, out=tmp_path, subjects=["cat", "dog"])
    with pytest.raises(StencilError, match=r"2 of 2 subject\(s\) have no result .* \(cat, dog\)"):
        bench.merge_results(config, ["cat", "dog"])


# -- the runner goes through the verbs --------------------------------------------------------------------


def test_benchmark_training_takes_the_lock_and_marks_stale_runs(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stencil_cli.verbs import train as train_verb

    store = add_subject(cli, tmp_path)
    stale = store.create_run("robot", {"subject_model": "tiny"}, base_model="tiny")
    runner = bench.Runner(bench.BenchConfig(dataset=tmp_path, out=tmp_path, subjects=["robot"]), store, "cpu")
    with subject_lock(store, "robot"), pytest.raises(StencilError, match="already being trained"):
        runner.train(_job())
    assert store.get_run("robot", stale.id).status == "running"  # the holder's run is left alone

    def stop(*args: Any, **kwargs: Any) -> Any:
        raise StencilError("stop here")

    monkeypatch.setattr(train_verb, "check_subject", stop)
    with pytest.raises(StencilError, match="stop here"):
        runner.train(_job())
    assert store.get_run("robot", stale.id).status == "interrupted"


def test_the_runner_adds_captions_trains_and_generates_through_the_verbs(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stencil_cli.verbs.caption import CaptionRequest
    from stencil_cli.verbs.generation_plan import GenerateRequest, NamedItems
    from stencil_cli.verbs.subjects import AddRequest
    from stencil_cli.verbs.train import TrainRequest, TrainResult

    store = add_subject(cli, tmp_path)
    run = store.create_run("robot", {"subject_model": "tiny"}, base_model="tiny")
    calls: dict[str, Any] = {}

    def fake_add(store_: Any, request: AddRequest) -> Any:
        calls["add"] = request
        return SimpleNamespace(skipped=[])

    def fake_caption(store_: Any, request: CaptionRequest, **kwargs: Any) -> None:
        calls["caption"] = request

    def fake_train(store_: Any, request: TrainRequest, **kwargs: Any) -> TrainResult:
        calls["train"] = request
        return TrainResult(request.name, run, [])

    def fake_plan(store_: Any, request: GenerateRequest, named: NamedItems, **kwargs: Any) -> str:
        calls["plan"] = (request, named, kwargs)
        return "the plan"

    def fake_generate(store_: Any, plan: str, **kwargs: Any) -> Any:
        calls["generate"] = plan
        yield SavedDraft("p00-0", tmp_path / "draft-p00-0.png")  # a draft: not an image
        yield SavedImage(None, None)  # type: ignore[arg-type]

    for name, fake in (
        ("add_photos", fake_add),
        ("caption", fake_caption),
        ("train", fake_train),
        ("plan_generation", fake_plan),
        ("generate", fake_generate),
    ):
        monkeypatch.setattr(bench, name, fake)
    config = bench.BenchConfig(dataset=tmp_path, out=tmp_path, subjects=["dog"], train_steps=7)
    runner = bench.Runner(config, store, "cpu")
    job = _job("dog")
    runner.add(job)
    runner.caption(job)
    trained = runner.train(_job())
    made: list[int] = []
    runner.generate(_job(), [(0, 0)], lambda: made.append(1))

    assert calls["add"].name == "dog" and calls["add"].paths == [tmp_path / "dog"] and calls["add"].skip_bad
    assert calls["caption"] == CaptionRequest("dog", captioner="openai")  # as `stencil caption`
    assert trained is run
    request = calls["train"]
    assert request.name == "robot" and request.steps == 7 and request.device == "cpu"
    assert request.extra_params == {"bench": config.train_key()} and not request.resume
    planned, named, options = calls["plan"]
    assert planned.name == "robot" and planned.taus == [config.tau] and named.reuse_drafts
    assert named.folder == bench.BENCH_BATCH and options == {"models_root": config.models_root}
    assert [(item.prompt, item.seed, item.stem) for item in named.items] == [("a {0} {1}", 0, "p00-0")]
    assert calls["generate"] == "the plan" and made == [1]


def test_a_training_field_error_in_the_runner_names_train_steps(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = add_subject(cli, tmp_path)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise FieldError("steps", "{} must be at least 1 (got 0)")

    monkeypatch.setattr(bench, "train", refuse)
    runner = bench.Runner(bench.BenchConfig(dataset=tmp_path, out=tmp_path, subjects=["robot"]), store, "cpu")
    with pytest.raises(FieldError) as caught:
        runner.train(_job())
    assert caught.value.fields == ("train_steps",)
    assert str(caught.value) == "train_steps must be at least 1 (got 0)"


def test_the_benchmark_captions_like_stencil_caption_and_needs_a_key(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    from test_evaluation import make_fake_dreambench

    dataset = make_fake_dreambench(tmp_path / "dreambench")
    assert bench.BenchConfig(dataset=dataset, out=tmp_path, subjects=[]).captioner == "openai"
    result = cli("bench", "dreambench", dataset, "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "OPENAI_API_KEY is not set" in result.stderr and "--captioner template" in result.stderr
    assert not (tmp_path / "out").exists()  # refused before any work


def test_a_template_table_is_marked_not_comparable_and_lists_every_setting() -> None:
    settings = {
        "captioner": "template", "caption_model": None, "subject_model": "tiny", "context_model": "tiny",
        "train_steps": 1, "steps": 2, "inner_steps": 1, "inversion": "nti", "tau": 60.0,
        "eval_dino": "tiny", "eval_clip": "tiny", "lr": 2e-5,
    }  # fmt: skip
    overall = {"images": 0, "dino": None, "clip_t": None, "clip_i": None, "gpu_seconds": None}
    results = {
        "settings": settings, "prompts_per_subject": 1, "images_per_prompt": 1, "subjects": [],
        "overall": overall,
    }  # fmt: skip
    report = bench.markdown_report(results)
    assert "Not comparable with the paper" in report and "lr `2e-05`" in report
    vision = {**settings, "captioner": "openai", "caption_model": "gpt-4o"}
    openai = bench.markdown_report({**results, "settings": vision})
    assert "Not comparable" not in openai and "captions by `gpt-4o`" in openai
