"""The command line under bad input, races, damaged files and full disks: one clear line, the right exit
code, nothing half-written, and nothing lost."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from photos import add_subject
from PIL import Image
from storecheck import check_store

from stencil_cli.base import locks
from stencil_cli.base.errors import DiskFullError, FieldError, StencilError
from stencil_cli.base.events import Event
from stencil_cli.store.db import Store, open_store
from stencil_cli.store.layout import CHECKPOINT_NAME, WEIGHTS_NAME
from stencil_cli.store.records import Run
from stencil_cli.store.subjects import SubjectChangedError
from stencil_cli.verbs import generate as generate_verb
from stencil_cli.verbs import generation_plan
from stencil_cli.verbs import train as train_verb
from stencil_cli.verbs.caption import CaptionRequest
from stencil_cli.verbs.caption import caption as caption_verb
from stencil_cli.verbs.generation_plan import GenerateRequest, plan_generation
from stencil_cli.verbs.train import TrainRequest

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
PHRASE = "toy robot"


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _write_weights(path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"up_blocks.0.weight": np.zeros(4, dtype=np.float32)}, str(path))


def _done_run(store: Store) -> Run:
    """A done run of `robot` whose weights file has a sound header (its tensors are never loaded here)."""
    run = store.create_run("robot", {"subject_model": "tiny", "resolution": 64}, base_model="tiny")
    weights = store.run_dir("robot", run.id) / "weights.safetensors"
    _write_weights(weights)
    store.finish_run(run.id, "done", weights_file=weights)
    return store.get_run("robot", run.id)


def _captioned(cli: Any, tmp_path: Path) -> Store:
    store = add_subject(cli, tmp_path)
    subject = store.get_subject("robot")
    captions = {image["id"]: f"a photo of a toy robot, view {i}" for i, image in enumerate(subject.images)}
    store.set_captions("robot", captions, "manual")
    return store


def _no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from stencil_cli import models

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_subject_pipeline", refuse)
    monkeypatch.setattr(models, "load_context_pipeline", refuse)
    monkeypatch.setattr(train_verb, "load_training_pipeline", refuse)


def _stencil(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "stencil_cli", *args],
        cwd=PACKAGE_ROOT,
        env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)},
        text=True,
        **kwargs,
    )


# -- usage errors and pipes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["train", "x", "--steps", "0"], "--steps"),
        (["gen", "x", "y", "-n", "abc"], "--count"),
        (["rm", "x", "--no-such-flag"], "--no-such-flag"),
        (["no-such-command"], "no-such-command"),
        (["train"], "NAME"),
    ],
)
def test_a_usage_error_is_one_error_line_with_exit_2(cli: Any, argv: list[str], named: str) -> None:
    result = cli(*argv)
    assert result.exit_code == 2, result.output
    lines = _lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr
    assert "╭" not in result.stderr and not result.stdout


def test_json_into_a_pipe_closed_early_exits_quietly(cli: Any, tmp_path: Path) -> None:
    add_subject(cli, tmp_path)
    proc = _stencil("show", "robot", "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `| true`: the reader is gone before stencil writes
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert err == ""


# -- bounds before any work --------------------------------------------------------------------------------


def test_train_seed_and_batch_size_are_bounded_like_gen_before_any_work(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_model(monkeypatch)
    _captioned(cli, tmp_path)
    for flag, value in (("--seed", str(2**64)), ("--seed", "-1"), ("--batch-size", "100000")):
        result = cli("train", "robot", flag, value)
        assert result.exit_code == 2, result.output
        assert len(_lines(result.stderr)) == 1 and flag in result.stderr
    assert open_store().list_runs("robot") == []
    with pytest.raises(FieldError) as caught:  # the verb refuses too (the DreamBench runner calls it)
        train_verb.train(open_store(), TrainRequest("nobody", seed=2**63))
    assert caught.value.fields == ("seed",)
    with pytest.raises(FieldError) as caught:
        train_verb.train(open_store(), TrainRequest("nobody", batch_size=65))
    assert caught.value.fields == ("batch_size",)
    assert generation_plan.MAX_SEED == train_verb.MAX_SEED == 2**63 - 1


def test_gen_count_is_capped_before_the_subject_is_looked_up(cli: Any) -> None:
    result = cli("gen", "nobody", "on the moon", "-n", "1000000000")
    assert result.exit_code == 2 and "--count" in result.stderr
    assert "no subject" not in result.stderr


# -- who uses a subject ------------------------------------------------------------------------------------


def test_rm_waits_for_and_then_refuses_a_subject_in_use(cli: Any, tmp_path: Path) -> None:
    add_subject(cli, tmp_path)
    code = (
        "import time\nfrom stencil_cli.store.db import open_store\n"
        "from stencil_cli.verbs.common import using_subject\n"
        "with using_subject(open_store(), 'robot'):\n    print('using', flush=True)\n    time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=PACKAGE_ROOT
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "using"
        refused = cli("rm", "robot", "--yes", "--wait", "0.3")
        assert refused.exit_code == 1, refused.output
        text = " ".join(refused.stderr.split())
        assert "in use by another stencil command" in text and "waited 0.3 s" in text
        assert open_store().subject_names() == ["robot"]
    finally:
        holder.kill()
        holder.wait()
    assert cli("rm", "robot", "--yes", "--wait", "0").exit_code == 0
    assert check_store(open_store().root) == []


def test_gen_caption_and_train_hold_the_subject_while_they_work(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _captioned(cli, tmp_path)
    _done_run(store)
    seen: dict[str, bool] = {}

    def fake_generate(store: Store, plan: Any, progress: Any) -> Any:
        seen["gen"] = locks.is_in_use(store.root, "robot")
        yield from ()

    monkeypatch.setattr(generate_verb, "_generate", fake_generate)
    plan = plan_generation(store, GenerateRequest("robot", ["on the moon"], seed=1, no_context=True))
    assert list(generate_verb.generate(store, plan)) == []

    def hook(event: Event) -> None:
        seen["caption"] = locks.is_in_use(store.root, "robot")

    caption_verb(store, CaptionRequest("robot", captioner="template", force=True), progress=hook)

    def fake_load(*args: Any, **kwargs: Any) -> Any:
        seen["train"] = locks.is_in_use(store.root, "robot")
        raise StencilError("stop here")

    monkeypatch.setattr(train_verb, "load_training_pipeline", fake_load)
    with pytest.raises(StencilError, match="stop here"):
        train_verb.train(store, TrainRequest("robot", subject_model="tiny", device="cpu"))
    assert seen == {"gen": True, "caption": True, "train": True}
    assert not locks.is_in_use(store.root, "robot")  # all released


def test_a_gen_whose_subject_was_removed_and_added_again_stores_nothing(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_model(monkeypatch)
    store = _captioned(cli, tmp_path)
    _done_run(store)
    plan = plan_generation(store, GenerateRequest("robot", ["on the moon"], seed=1, no_context=True))
    assert cli("rm", "robot", "--yes").exit_code == 0  # another process removes it after the plan ...
    add_subject(cli, tmp_path / "again")  # ... and a new subject of the same name appears
    with pytest.raises(SubjectChangedError):
        list(generate_verb.generate(store, plan))
    assert open_store().list_generations("robot") == []
    assert check_store(store.root) == []


# -- gen: Ctrl-C and early checks ------------------------------------------------------------------------


def test_ctrl_c_during_gen_prints_the_finished_images(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stencil_cli.cli import gen as gen_command

    store = _captioned(cli, tmp_path)
    _done_run(store)

    def first_then_ctrl_c(store: Store, plan: Any, **kwargs: Any) -> Any:
        writer = generate_verb._Writer(store, plan)
        yield writer.save_image(plan.items[0], 60.0, Image.new("RGB", (8, 8)), {}, {})
        raise KeyboardInterrupt

    monkeypatch.setattr(gen_command, "generate", first_then_ctrl_c)
    result = cli("gen", "robot", "on the moon", "-n", "2", "--seed", "0", "--json")
    assert result.exit_code == 130, result.output
    made = [json.loads(line) for line in result.stdout.splitlines()]  # JSON Lines, one per finished image
    assert len(made) == 1 and made[0]["seed"] == 0 and Path(made[0]["image_file"]).is_file()
    assert "interrupted" in result.stderr
    plain = cli("gen", "robot", "on the moon", "-n", "2", "--seed", "5")
    assert plain.exit_code == 130 and len(_lines(plain.stdout)) == 1
    assert plain.stdout.strip().endswith("s5-tau60.png")
    assert check_store(store.root) == []


def test_gen_refuses_damaged_weights_and_an_unusable_output_before_any_model_loads(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_model(monkeypatch)
    store = _captioned(cli, tmp_path)
    run = _done_run(store)
    assert run.weights_file is not None
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for output in (a_file, a_file / "below"):
        result = cli("gen", "robot", "on the moon", "-o", output)
        assert result.exit_code == 2, result.output
        assert len(_lines(result.stderr)) == 1 and "-o" in result.stderr
    whole = run.weights_file.read_bytes()
    for damaged in (whole[: len(whole) // 2], os.urandom(200), b""):
        run.weights_file.write_bytes(damaged)
        result = cli("gen", "robot", "on the moon")
        assert result.exit_code == 1, result.output
        text = " ".join(result.stderr.split())
        assert "are damaged" in text and "stencil train robot" in text
    assert open_store().list_generations("robot") == []


def test_demo_refuses_an_empty_prompt_or_unusable_output_before_adding_anything(
    cli: Any, tmp_path: Path
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for args in (["--prompt", "   "], ["-o", str(a_file)]):
        result = cli("demo", *args)
        assert result.exit_code == 2, result.output
        assert len(_lines(result.stderr)) == 1
    assert open_store().subject_names() == []


# -- train: missing photos, corrupt checkpoints, a full disk ---------------------------------------------


def test_train_and_caption_refuse_photos_whose_files_are_gone_naming_them(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_model(monkeypatch)
    store = _captioned(cli, tmp_path)
    image = store.get_subject("robot").images[1]
    Path(image["file"]).unlink()
    for argv in (("train", "robot", "--subject-model", "tiny"), ("caption", "robot", "--force")):
        result = cli(*argv, "--captioner", "template") if argv[0] == "caption" else cli(*argv)
        assert result.exit_code == 1, result.output
        text = " ".join(result.stderr.split())
        assert f"photo(s) {image['id']} of 'robot' are missing their files" in text
        assert image["file"] in text and "stencil add robot" in text
    assert open_store().list_runs("robot") == []
    shown = cli("show", "robot", "--json")
    assert [photo["missing"] for photo in json.loads(shown.stdout)["images"]] == [False, True]
    assert "(file missing)" in cli("show", "robot").stdout


def test_adding_a_photo_again_restores_its_deleted_file(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    image = store.get_subject("robot").images[0]
    Path(image["file"]).unlink()
    result = cli("add", "robot", tmp_path / "photos-robot", "--json")
    assert result.exit_code == 0, result.output
    assert [row["id"] for row in json.loads(result.stdout)["restored"]] == [image["id"]]
    assert Path(image["file"]).is_file()
    again = cli("add", "robot", tmp_path / "photos-robot")
    assert "restored" not in again.stderr
    assert check_store(store.root) == []


def _interrupted_with_checkpoint(cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from stencil_cli.core import weights

    _captioned(cli, tmp_path)

    def ctrl_c(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(weights, "save_trained_weights", ctrl_c)
        result = cli(
            "train",
            "robot",
            "--subject-model",
            "tiny",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--checkpoint-every",
            "1",
        )
    assert result.exit_code == 130, result.output
    (run,) = open_store().list_runs("robot")
    return open_store().run_dir("robot", run.id) / CHECKPOINT_NAME


def test_resuming_a_checkpoint_with_non_finite_values_says_it_is_corrupt(
    cli: Any, tiny_preset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    checkpoint = _interrupted_with_checkpoint(cli, tmp_path, monkeypatch)
    state = torch.load(checkpoint, weights_only=True)
    name = sorted(state["params"])[0]
    state["params"][name].fill_(float("nan"))
    torch.save(state, checkpoint)
    result = cli("train", "robot", "--resume")
    assert result.exit_code == 1, result.output
    text = " ".join(result.stderr.split())
    assert f"checkpoint {checkpoint} is corrupt (non-finite values in params.{name})" in text
    assert "lower --lr" not in text and "without --resume" in text


def test_a_disk_full_at_the_weights_keeps_the_steps_in_a_checkpoint_to_resume(
    cli: Any, tiny_preset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    _captioned(cli, tmp_path)
    real_save = safetensors.torch.save_file

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", disk_full)
        result = cli("train", "robot", "--subject-model", "tiny", "--steps", "3", "--batch-size", "2")
    assert result.exit_code == 1, result.output
    store = open_store()
    (run,) = store.list_runs("robot")
    weights = store.run_dir("robot", run.id) / WEIGHTS_NAME
    checkpoint = store.run_dir("robot", run.id) / CHECKPOINT_NAME
    text = " ".join(result.stderr.split())
    (error,) = [line for line in _lines(result.stderr) if line.startswith("error:")]
    error = " ".join(error.split())
    assert error.startswith(f"error: disk full at {weights}")
    assert f"the 3 trained steps are kept in the checkpoint {checkpoint}" in text
    assert "stencil train robot --resume" in text
    assert run.status == "failed" and run.step == 3 and len(run.losses) == 3
    assert checkpoint.is_file() and not weights.exists()
    assert safetensors.torch.save_file is real_save
    resumed = cli("train", "robot", "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    done = json.loads(resumed.stdout)
    assert done["status"] == "done" and done["step"] == 3 and Path(done["weights_file"]).is_file()
    assert check_store(store.root) == []


def test_a_disk_too_full_for_the_checkpoint_too_says_nothing_was_kept(
    cli: Any, tiny_preset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch
    import torch

    _captioned(cli, tmp_path)

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    monkeypatch.setattr(torch, "save", disk_full)
    result = cli("train", "robot", "--subject-model", "tiny", "--steps", "2", "--batch-size", "2")
    assert result.exit_code == 1, result.output
    text = " ".join(result.stderr.split())
    assert "disk full at" in text and "nothing could be kept" in text
    (run,) = open_store().list_runs("robot")
    assert run.status == "failed" and not any(open_store().run_dir("robot", run.id).glob("*.tmp"))


# -- captions and phrases -----------------------------------------------------------------------------------


def test_phrases_are_validated_on_add_and_caption(cli: Any, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (256, 256), (20, 90, 160)).save(folder / "0.png")
    result = cli("add", "robot", folder, "--phrase", "../../etc x; rm -rf")
    assert result.exit_code == 2, result.output
    assert "may only hold letters" in result.stderr and len(_lines(result.stderr)) == 1
    assert open_store().subject_names() == []
    assert cli("add", "robot", folder).exit_code == 0
    result = cli("caption", "robot", "--captioner", "template", "--phrase", "a/b; c")
    assert result.exit_code == 2 and "may only hold letters" in result.stderr
    assert open_store().get_subject("robot").phrase is None


def test_an_editor_saving_non_utf8_text_is_one_line_and_stores_nothing(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _captioned(cli, tmp_path)
    before = [image["caption"] for image in store.get_subject("robot").images]
    editor = tmp_path / "editor.sh"
    editor.write_text("#!/bin/sh\nprintf '1\\t\\377\\376 a toy robot\\n' > \"$1\"\n")
    editor.chmod(editor.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("EDITOR", str(editor))
    monkeypatch.setenv("VISUAL", str(editor))
    result = cli("caption", "robot", "--edit")
    assert result.exit_code == 2, result.output
    assert "not UTF-8" in result.stderr and len(_lines(result.stderr)) == 1
    assert [image["caption"] for image in open_store().get_subject("robot").images] == before


def test_hand_written_captions_lose_control_characters_and_are_capped(cli: Any, tmp_path: Path) -> None:
    store = _captioned(cli, tmp_path)
    first = store.get_subject("robot").images[0]["id"]
    hostile = "a toy robot\x1b]0;pwned\x07 \x1b[2J on a \u202etable"
    result = cli("caption", "robot", "--set", str(first), hostile)
    assert result.exit_code == 0, result.output
    assert open_store().get_subject("robot").images[0]["caption"] == "a toy robot on a table"
    result = cli("caption", "robot", "--set", str(first), "a toy robot " + "x" * 700)
    assert result.exit_code == 2 and "at most 600" in result.stderr


def test_stored_escape_sequences_are_not_printed_raw(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    first = store.get_subject("robot").images[0]["id"]
    hostile = "a toy robot \x1b]0;pwned\x07\x1b[2J\u202e"  # as an older version may have stored it
    store.set_captions("robot", {first: hostile}, "openai", description="red \x1b[31mrobot")
    for argv in (("show", "robot"), ("caption", "robot", "--captioner", "template")):
        result = cli(*argv)
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.stdout and "\u202e" not in result.stdout
        assert "a toy robot" in result.stdout


# -- the store: lost databases, repair, clean, doctor ----------------------------------------------------


def test_a_lost_database_warns_keeps_folders_and_repair_indexes_them(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    root = store.root
    store.close()
    (root / "stencil.db").unlink()
    listed = cli("ls")
    assert listed.exit_code == 0 and "without a database row: robot" in " ".join(listed.stderr.split())
    cleaned = cli("store", "clean", "--older-than", "0")
    assert cleaned.exit_code == 0 and (root / "subjects" / "robot" / "images").is_dir()
    repaired = cli("store", "repair", "--json")
    assert repaired.exit_code == 0, repaired.output
    report = json.loads(repaired.stdout)
    assert report["subjects"] == ["robot"] and report["images"] == 2
    assert len(open_store().get_subject("robot").images) == 2
    assert "without a database row" not in cli("ls").stderr
    assert check_store(root) == []


def test_clean_removes_a_folder_without_a_row_only_when_named_and_confirmed(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    stray = store.root / "subjects" / "stray" / "images"
    stray.mkdir(parents=True)
    (stray / "old.png").write_bytes(b"x")
    refused = cli("store", "clean", "--older-than", "0", "--remove-unindexed", "stray")
    assert refused.exit_code == 2 and "--yes" in refused.stderr and stray.is_dir()
    named_subject = cli("store", "clean", "--older-than", "0", "--remove-unindexed", "robot", "--yes")
    assert named_subject.exit_code == 2 and "stencil rm robot" in named_subject.stderr
    unknown = cli("store", "clean", "--older-than", "0", "--remove-unindexed", "nobody", "--yes")
    assert unknown.exit_code == 1
    removed = cli("store", "clean", "--older-than", "0", "--remove-unindexed", "stray", "--yes")
    assert removed.exit_code == 0, removed.output
    assert not stray.parent.exists() and open_store().subject_names() == ["robot"]
    assert check_store(store.root) == []


def test_doctor_reports_a_damaged_database_and_missing_photo_files(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    image = store.get_subject("robot").images[0]
    Path(image["file"]).unlink()
    report = cli("doctor", "--json")
    assert report.exit_code == 0, report.output
    check = json.loads(report.stdout)["store_check"]
    assert check["ok"] and [row["id"] for row in check["missing_files"]] == [image["id"]]
    db = store.root / "stencil.db"
    store.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    db.write_bytes(os.urandom(4096))
    # in a fresh process: SQLite shares a file's WAL index between the connections of one process
    text = _stencil("doctor", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = text.communicate(timeout=120)
    assert text.returncode == 1 and "Traceback" not in out + err
    assert "is damaged" in " ".join(out.split())
    data = _stencil("doctor", "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = data.communicate(timeout=120)
    assert data.returncode == 1, err
    check = json.loads(out)["store_check"]
    assert check["ok"] is False and "is damaged" in check["error"]


def test_disk_full_errors_name_the_file(tmp_path: Path) -> None:
    error = DiskFullError(tmp_path / "weights.safetensors")
    assert str(error).startswith(f"disk full at {tmp_path / 'weights.safetensors'}")
