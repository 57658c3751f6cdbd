"""Fixes from the review of workflows.py, dreambench.py and the commands (each test fails without its fix)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from stencil_cli import workflows
from stencil_cli.errors import BadInputError, StencilError
from stencil_cli.store import Store, open_store


def _add(cli: Any, tmp_path: Path, name: str = "robot", phrase: str | None = "toy robot") -> Store:
    """Add a subject with two photos (no captions) and return the open store."""
    folder = tmp_path / f"photos-{name}"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (256, 256), (40 * i + 20, 90, 160)).save(folder / f"{i}.png")
    args = ["add", name, str(folder)] + (["--phrase", phrase] if phrase else [])
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return open_store()


def _age(path: Path, seconds: float = 3600.0) -> None:
    old = path.stat().st_mtime - seconds
    os.utime(path, (old, old))


# -- 1: seeds that fit a row; the row right after the file; clean removes row-less images --------------------


def test_gen_refuses_seeds_that_do_not_fit_a_stored_row(cli: Any) -> None:
    too_big = cli("gen", "robot", "on the moon", "--seed", str(2**63))
    assert too_big.exit_code == 2 and "Traceback" not in too_big.output
    last_two = cli("gen", "robot", "on the moon", "--seed", str(2**63 - 1), "-n", "2")
    assert last_two.exit_code == 2, last_two.output
    assert "--seed must be in [0, 9223372036854775806] for 2 image(s)" in " ".join(last_two.output.split())


def test_bench_config_refuses_seeds_that_do_not_fit(tmp_path: Path) -> None:
    from stencil_cli.dreambench import BenchConfig

    last = 2**63 - 1
    fits = BenchConfig(dataset=tmp_path, out=tmp_path, subjects=["dog"], seed=last - 3, images_per_prompt=4)
    fits.validate()
    config = BenchConfig(dataset=tmp_path, out=tmp_path, subjects=["dog"], seed=last - 2, images_per_prompt=4)
    with pytest.raises(BadInputError, match="--seed must be in"):
        config.validate()


def _job(store: Store, name: str, run_id: int) -> workflows.GenerationJob:
    return workflows.GenerationJob(
        store=store,
        subject=store.get_subject(name),
        run={"id": run_id},
        prompt="a toy robot",
        draft_prompt="a toy robot",
        seeds=[1],
        taus=[60.0],
        mode="context",
        subject_model="tiny",
        context_model="tiny",
        device="cpu",
        precision="fp32",
        no_t5=False,
        resolution=64,
    )


def test_a_failing_row_insert_leaves_no_copy_and_clean_removes_the_store_file(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stencil_cli.generation import GenerationSettings

    store = _add(cli, tmp_path)
    run = store.create_run("robot", {"subject_model": "tiny"}, base_model="tiny")
    job = _job(store, "robot", run["id"])
    folder = store.generation_dir("robot") / "batch"
    kept = folder / "s0-tau60.png"
    picture = Image.new("RGB", (8, 8))
    settings = GenerationSettings()
    workflows.save_generation(job, settings, seed=0, tau=60.0, image=picture, path=kept, draft_path=None)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    monkeypatch.setattr(store, "add_generation", refuse)
    path, copy = folder / "s1-tau60.png", tmp_path / "out" / "s1-tau60.png"
    with pytest.raises(OverflowError):
        workflows.save_generation(
            job, GenerationSettings(), seed=1, tau=60.0, image=Image.new("RGB", (8, 8)), path=path,
            draft_path=None, copy_to=copy,
        )  # fmt: skip
    assert path.is_file() and not copy.exists()
    monkeypatch.undo()
    grid, draft = folder / "grid.png", folder / "draft-s1.png"
    Image.new("RGB", (8, 8)).save(grid)
    Image.new("RGB", (8, 8)).save(draft)
    for file in (kept, path, grid, draft):
        _age(file)
    recent = folder / "s2-tau60.png"
    Image.new("RGB", (8, 8)).save(recent)
    removed = store.clean()
    assert sorted(p.name for p in removed) == ["draft-s1.png", "s1-tau60.png"]
    assert kept.is_file() and grid.is_file() and recent.is_file()


# -- 2: a resumed run keeps its recorded progress when stopped before the loop -----------------------------


def test_ctrl_c_before_the_loop_keeps_a_resumed_runs_step_and_losses(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    import torch

    store = _add(cli, tmp_path)
    run = store.create_run("robot", {"subject_model": "tiny"}, base_model="tiny")
    store.finish_run(run["id"], "interrupted", step=5, losses=[0.5, 0.4, 0.3, 0.2, 0.1])
    run = store.get_run("robot", run["id"])

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(workflows, "make_masks", interrupted)
    pipe = SimpleNamespace(unet=torch.nn.Linear(1, 1))
    with pytest.raises(KeyboardInterrupt):
        workflows.train_subject(store, store.get_subject("robot"), pipe, None, "tiny", run)
    after = store.get_run("robot", run["id"])
    assert after["status"] == "interrupted"
    assert after["step"] == 5 and after["losses"] == [0.5, 0.4, 0.3, 0.2, 0.1]


# -- 3: the benchmark trains under the subject lock and marks stale runs ------------------------------------


def test_benchmark_training_takes_the_lock_and_marks_stale_runs(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stencil_cli.dreambench import BenchConfig, Runner, SubjectJob

    store = _add(cli, tmp_path)
    stale = store.create_run("robot", {"subject_model": "tiny"}, base_model="tiny")
    runner = Runner(BenchConfig(dataset=tmp_path, out=tmp_path, subjects=["robot"]), store, "cpu")
    job = SubjectJob("robot", "robot", False, ["a {0} {1}"], [(0, 0)])
    with workflows.subject_lock(store, "robot"), pytest.raises(StencilError, match="already being trained"):
        runner.train(job)
    assert store.get_run("robot", stale["id"])["status"] == "running"  # the holder's run is left alone

    def stop(*args: Any, **kwargs: Any) -> Any:
        raise StencilError("stop here")

    monkeypatch.setattr(workflows, "check_subject", stop)
    with pytest.raises(StencilError, match="stop here"):
        runner.train(job)
    assert store.get_run("robot", stale["id"])["status"] == "interrupted"


# -- 4: captions that lack the phrase: refused before the model loads; a new phrase recaptions them ---------


def test_train_refuses_captions_without_the_phrase_before_loading_a_model(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(*args: Any) -> Any:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(workflows, "load_training_pipeline", no_model)
    store = _add(cli, tmp_path)
    first, second = (image["id"] for image in store.get_subject("robot").images)
    store.set_captions("robot", {first: "a photo of a toy robot", second: "a small red thing"}, "manual")
    result = cli("train", "robot", "--subject-model", "tiny")
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert f"1 of 2 captions of 'robot' lack the phrase 'toy robot' (ids {second})" in text
    assert "stencil caption robot --force" in text


def test_a_new_phrase_recaptions_the_captions_that_lack_it(cli: Any, tmp_path: Path) -> None:
    store = _add(cli, tmp_path, phrase=None)
    first, second = (image["id"] for image in store.get_subject("robot").images)
    assert cli("caption", "robot", "--set", str(first), "a small red thing").exit_code == 0
    assert cli("caption", "robot", "--set", str(second), "a toy robot on grass").exit_code == 0
    result = cli("caption", "robot", "--phrase", "toy robot", "--captioner", "template")
    assert result.exit_code == 0, result.output
    subject = open_store().get_subject("robot")
    assert subject.phrase == "toy robot"
    captions = {image["id"]: image["caption"] for image in subject.images}
    assert "toy robot" in captions[first] and captions[second] == "a toy robot on grass"
    workflows.check_subject(open_store(), "robot", use_mask=True)  # trainable now


# -- 5, 19: eval with every selected file missing fails before the eval models load ------------------------


def test_eval_with_every_image_file_missing_fails_before_loading_models(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stencil_cli import evaluation

    def no_models(*args: Any) -> Any:
        raise AssertionError("the eval models were loaded")

    monkeypatch.setattr(evaluation, "load_eval_models", no_models)
    store = _add(cli, tmp_path)
    run = store.create_run("robot", {"subject_model": "tiny"}, base_model="tiny")
    for seed in (1, 2):
        gone = store.generation_dir("robot") / f"s{seed}.png"
        store.add_generation("robot", {"run_id": run["id"], "prompt": "p", "seed": seed, "image_path": gone})
    result = cli("eval", "robot", "--eval-models", "tiny")
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "generation 1: image file missing" in text and "generation 2: image file missing" in text
    assert "none of the 2 selected image file(s) of 'robot' exist" in text


def test_score_generations_reports_each_missing_file_by_id(cli: Any, tmp_path: Path) -> None:
    from unittest import mock

    from stencil_cli import evaluation

    store = _add(cli, tmp_path)
    subject = store.get_subject("robot")
    there = tmp_path / "there.png"
    Image.new("RGB", (8, 8)).save(there)
    rows = [
        {"id": 1, "image_file": str(there), "prompt": "p"},
        {"id": 2, "image_file": str(tmp_path / "gone.png"), "prompt": "p"},
    ]
    missing: list[int] = []
    score = mock.Mock(to_dict=lambda: {"dino": 1.0})
    with (
        mock.patch.object(evaluation, "embed_references", return_value=mock.Mock(count=2)),
        mock.patch.object(evaluation, "score_images", return_value=[score]),
        mock.patch.object(store, "set_generation_scores"),
    ):
        scored = workflows.score_generations(
            store, subject, rows, mock.Mock(), on_missing=lambda row: missing.append(row["id"])
        )
    assert [row["id"] for row in scored] == [1] and missing == [2]


# -- 6, 10: the lock is taken at byte 0; the holder is named in words either way ---------------------------


def test_the_lock_is_taken_from_the_start_of_the_file(
    stencil_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store()
    lock = store.subject_dir("robot") / workflows.LOCK_NAME
    lock.parent.mkdir(parents=True)
    lock.write_text("12345", encoding="utf-8")  # left by an earlier process: "a+" opens at byte 5
    positions: list[int] = []
    real = workflows._try_lock

    def recording(handle: Any) -> bool:
        positions.append(handle.tell())
        return real(handle)

    monkeypatch.setattr(workflows, "_try_lock", recording)
    with workflows.subject_lock(store, "robot"):
        pass
    assert positions == [0]


@pytest.mark.skipif(os.name == "nt", reason="holds the lock with fcntl")
def test_a_held_lock_names_its_holder_or_says_another_process(stencil_home: Path) -> None:
    import fcntl

    store = open_store()
    lock = store.subject_dir("robot") / workflows.LOCK_NAME
    lock.parent.mkdir(parents=True)
    for content, words in (("", "by another process;"), ("4321", "by process 4321;")):
        lock.write_text(content, encoding="utf-8")
        with open(lock, encoding="utf-8") as held:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
            with pytest.raises(StencilError) as caught, workflows.subject_lock(store, "robot"):
                pass
        assert f"subject 'robot' is already being trained {words}" in str(caught.value)
        assert "pid another" not in str(caught.value)


# -- 7: --resume refuses typed options that differ from the run's; a new --steps is recorded ----------------


def _interrupted_run(store: Store) -> dict[str, Any]:
    from stencil_cli.training import TrainConfig

    params = {**TrainConfig(steps=10, batch_size=6).to_params(), "subject_model": "tiny"}
    run = store.create_run("robot", params, base_model="tiny")
    store.finish_run(run["id"], "interrupted", step=3, losses=[0.3, 0.2, 0.1])
    checkpoint = store.run_dir("robot", run["id"]) / workflows.CHECKPOINT_NAME
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"not read: the refusal comes first")
    return store.get_run("robot", run["id"])


def test_resume_refuses_options_that_differ_from_the_runs(cli: Any, tmp_path: Path) -> None:
    store = _add(cli, tmp_path)
    run = _interrupted_run(store)
    args = ["train", "robot", "--resume", "--batch-size", "6", "--subject-model", "tiny"]
    result = cli(*args, "--lr", "1e-4", "--checkpoint-every", "5", "--precision", "bf16")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    drop = "drop --lr, --checkpoint-every, --precision (only --steps and --device may change"
    assert f"--resume continues run {run['id']} with its own settings: {drop}" in text
    assert "--batch-size" not in text and "--subject-model" not in text  # typed, but the same as the run's


def test_reopening_a_run_records_its_new_step_count(cli: Any, tmp_path: Path) -> None:
    store = _add(cli, tmp_path)
    run = _interrupted_run(store)
    workflows.reopen_run(store, run, 25)
    after = store.get_run("robot", run["id"])
    assert after["status"] == "running" and after["params"]["steps"] == 25
    assert after["params"]["subject_model"] == "tiny"


# -- 8: a failing shard still reaches the barrier; the merge names every missing subject -------------------


def test_a_failing_shard_still_reaches_the_final_barrier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from stencil_cli import dreambench, evaluation

    waits: list[int] = []
    state = SimpleNamespace(device=SimpleNamespace(type="cpu"), wait_for_everyone=lambda: waits.append(1))
    config = dreambench.BenchConfig(dataset=tmp_path, out=tmp_path / "out", subjects=["cat", "dog"])
    monkeypatch.setattr(evaluation, "load_dreambench", lambda path: None)
    jobs = [dreambench.SubjectJob(name, name, False, ["a {0} {1}"], [(0, 0)]) for name in ("cat", "dog")]
    monkeypatch.setattr(dreambench, "plan", lambda config, bench: jobs)

    def fail(self: Any, job: Any) -> None:
        raise RuntimeError(f"{job.name} failed")

    monkeypatch.setattr(dreambench.Runner, "run_subject", fail)
    with pytest.raises(RuntimeError, match="dog failed"):
        dreambench.run_benchmark(config, dreambench.Shard(rank=1, world=2, state=state))
    assert len(waits) == 2  # the start barrier and the final one


def test_merge_results_names_every_missing_subject(tmp_path: Path) -> None:
    from stencil_cli import dreambench

    config = dreambench.BenchConfig(dataset=tmp_path, out=tmp_path, subjects=["cat", "dog"])
    with pytest.raises(StencilError, match=r"2 of 2 subject\(s\) have no result .* \(cat, dog\)"):
        dreambench.merge_results(config, ["cat", "dog"])


# -- 9: doctor says what a missing OpenAI key means --------------------------------------------------------


def test_doctor_says_the_openai_key_is_needed_for_the_openai_captioner(
    cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    result = cli("doctor")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "needed for --captioner openai; use --captioner template offline" in text
    assert "fall back to templates" not in text


# -- 11: a relative path to the model a run was trained on is not "another model" ----------------------------


def test_gen_does_not_warn_for_a_relative_path_to_the_trained_model(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stencil_cli.commands import gen as gen_cmd

    store = _add(cli, tmp_path)
    model = tmp_path / "my-model"
    model.mkdir()
    run = store.create_run("robot", {"subject_model": str(model.resolve())}, base_model=str(model.resolve()))
    weights = store.run_dir("robot", run["id"]) / "weights.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"not read here")
    store.finish_run(run["id"], "done", weights_path=weights)
    warnings: list[str] = []
    monkeypatch.setattr(gen_cmd, "warn", warnings.append)
    monkeypatch.chdir(tmp_path)
    for given, warned in (("my-model", False), ("tiny", True)):
        warnings.clear()
        job = gen_cmd._make_job(
            store, "robot", "on the moon", "plain", run_id=None, seeds=[1], taus=[], draft=None,
            show_prompts=False, models=gen_cmd.Models(given, None, "cpu", "fp32", False),
        )  # fmt: skip
        assert job.subject_model == given
        assert bool(warnings) is warned, warnings


# -- 12: an unreadable bench.json is an error, not "no settings" ---------------------------------------------


@pytest.mark.parametrize("content", ["{not json", "[]", '{"dataset": "x"}'])
def test_an_unreadable_bench_file_is_a_clear_error(tmp_path: Path, content: str) -> None:
    from stencil_cli import dreambench

    config = dreambench.BenchConfig(dataset=tmp_path, out=tmp_path / "out", subjects=["dog"])
    dreambench.check_out_folder(config)  # creates it
    path = config.out / dreambench.BENCH_FILE
    dreambench.check_out_folder(config)  # reads it back: the same settings
    path.write_text(content, encoding="utf-8")
    with pytest.raises(BadInputError, match="bench.json cannot be read as a benchmark's settings"):
        dreambench.check_out_folder(config)


# -- 20: a failed demo step leaves no half-made subject ------------------------------------------------------


def test_a_failed_demo_step_removes_the_half_made_subject(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from stencil_cli.commands import train as train_cmd

    def fail(*args: Any, **kwargs: Any) -> None:
        raise StencilError("training broke")

    monkeypatch.setattr(train_cmd, "train", fail)
    result = cli("demo", "--name", "robo")
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "training broke" in text and "removed the half-made demo subject robo" in text
    store = open_store()
    assert store.subject_names() == [] and not store.subject_dir("robo").exists()


def test_qa_bad_inputs_are_one_line_exit_2(cli, tmp_path: Path) -> None:
    from stencil_cli.commands.gen import _load_draft
    from stencil_cli.errors import BadInputError

    for bad in (tmp_path, Path("")):
        with pytest.raises(BadInputError, match="folder|empty"):
            _load_draft(bad)
    for resolution in ("0", "100000"):
        result = cli("train", "anything", "--resolution", resolution)
        assert result.exit_code == 2
    assert cli("train", "anything", "--steps", "99999999999").exit_code == 2
    out_file = tmp_path / "results.jpg"
    out_file.write_text("x")
    bench = cli("bench", "dreambench", tmp_path, "--out", out_file)
    assert bench.exit_code == 2 and "is a file" in bench.stderr


def test_caption_edit_unchanged_with_uncaptioned_photos_stores_nothing(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from photos import make_photo

    make_photo(tmp_path / "p" / "a.jpg")
    cli("add", "cat", tmp_path / "p", "--phrase", "cat")
    monkeypatch.setenv("EDITOR", "true")  # quits without changing the file
    monkeypatch.delenv("VISUAL", raising=False)
    result = cli("caption", "cat", "--edit")
    assert result.exit_code == 0, result.output
    assert open_store().get_subject("cat").images[0]["caption"] is None
