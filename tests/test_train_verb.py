"""The training verb (stencil_cli.verbs.train) and the per-subject lock: checks before the model loads,
resumed runs, what an interruption keeps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from photos import add_subject
from runs import interrupted_run

from stencil_cli.base.errors import FieldError, StencilError
from stencil_cli.store.db import open_store
from stencil_cli.store.layout import TRAIN_LOCK_NAME
from stencil_cli.verbs import common
from stencil_cli.verbs import train as train_verb
from stencil_cli.verbs.train import TrainRequest

# -- checks before the model loads ------------------------------------------------------------------------


def test_train_refuses_captions_without_the_phrase_before_loading_a_model(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(*args: Any) -> Any:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train_verb, "load_training_pipeline", no_model)
    store = add_subject(cli, tmp_path)
    first, second = (image["id"] for image in store.get_subject("robot").images)
    store.set_captions("robot", {first: "a photo of a toy robot", second: "a small red thing"}, "manual")
    result = cli("train", "robot", "--subject-model", "tiny")
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert f"1 of 2 captions of 'robot' lack the phrase 'toy robot' (ids {second})" in text
    assert "stencil caption robot --force" in text


def test_resume_and_masks_only_together_are_refused_by_field(stencil_home: Path) -> None:
    with pytest.raises(FieldError) as caught:
        train_verb.train(open_store(), TrainRequest("robot", resume=True, masks_only=True))
    assert caught.value.fields == ("resume", "masks_only")
    assert str(caught.value) == "resume, masks_only do not go together"


# -- resuming ---------------------------------------------------------------------------------------------


def test_resume_refuses_options_that_differ_from_the_runs(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    run = interrupted_run(store, batch_size=6)
    args = ["train", "robot", "--resume", "--batch-size", "6", "--subject-model", "tiny"]
    result = cli(*args, "--lr", "1e-4", "--checkpoint-every", "5", "--precision", "bf16")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"resuming run {run.id} keeps its own settings: drop --lr, --checkpoint-every, --precision" in text
    assert "--batch-size" not in text and "--subject-model" not in text  # typed, but the same as the run's


def test_reopening_a_run_records_its_new_step_count(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    run = interrupted_run(store, batch_size=6)
    reopened = train_verb.reopen_run(store, run, 25)
    after = store.get_run("robot", run.id)
    assert after.status == "running" and after.params["steps"] == 25
    assert after.params["subject_model"] == "tiny"
    assert reopened.status == after.status and reopened.params == after.params


def test_ctrl_c_before_the_loop_keeps_a_resumed_runs_step_and_losses(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    import torch

    store = add_subject(cli, tmp_path)
    run = store.create_run("robot", {"subject_model": "tiny"}, base_model="tiny")
    store.finish_run(run.id, "interrupted", step=5, losses=[0.5, 0.4, 0.3, 0.2, 0.1])
    run = store.get_run("robot", run.id)

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_verb, "make_masks", interrupted)
    pipe = SimpleNamespace(unet=torch.nn.Linear(1, 1))
    with pytest.raises(KeyboardInterrupt):
        train_verb.train_subject(store, store.get_subject("robot"), pipe, None, "tiny", run)
    after = store.get_run("robot", run.id)
    assert after.status == "interrupted"
    assert after.step == 5 and after.losses == [0.5, 0.4, 0.3, 0.2, 0.1]


# -- the per-subject lock ---------------------------------------------------------------------------------


def test_the_lock_is_taken_from_the_start_of_the_file(
    stencil_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store()
    lock = store.subject_dir("robot") / TRAIN_LOCK_NAME
    lock.parent.mkdir(parents=True)
    lock.write_text("12345", encoding="utf-8")  # left by an earlier process: "a+" opens at byte 5
    positions: list[int] = []
    real = common._try_lock

    def recording(handle: Any) -> bool:
        positions.append(handle.tell())
        return real(handle)

    monkeypatch.setattr(common, "_try_lock", recording)
    with common.subject_lock(store, "robot"):
        pass
    assert positions == [0]


@pytest.mark.skipif(os.name == "nt", reason="holds the lock with fcntl")
def test_a_held_lock_names_its_holder_or_says_another_process(stencil_home: Path) -> None:
    import fcntl

    store = open_store()
    lock = store.subject_dir("robot") / TRAIN_LOCK_NAME
    lock.parent.mkdir(parents=True)
    for content, words in (("", "by another process;"), ("4321", "by process 4321;")):
        lock.write_text(content, encoding="utf-8")
        with open(lock, encoding="utf-8") as held:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
            with pytest.raises(StencilError) as caught, common.subject_lock(store, "robot"):
                pass
        assert f"subject 'robot' is already being trained {words}" in str(caught.value)
        assert "pid another" not in str(caught.value)
