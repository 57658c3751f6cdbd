"""Training with the Cross-Attention Guided Loss on the tiny preset: loss, loop, weights, CLI, Ctrl-C."""

from __future__ import annotations

import copy
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from runs import eval_loss
from safetensors import safe_open

from stencil_cli import __version__
from stencil_cli.base.errors import BadInputError, StencilError
from stencil_cli.core.families import unet_inputs
from stencil_cli.core.training import (
    TrainConfig,
    load_checkpoint,
    masked_mse,
    prepare_training_data,
    train_unet,
)
from stencil_cli.core.weights import (
    load_trained_weights,
    save_trained_weights,
    trained_state,
    weights_metadata,
)
from stencil_cli.store.db import open_store
from stencil_cli.verbs.common import subject_lock
from tests.photos import make_photo

PHRASE = "toy robot"
CAPTIONS = ["a toy robot on a wooden table", "a toy robot in the grass", "a red toy robot, close up"]


def _config(**overrides: object) -> TrainConfig:
    values: dict[str, object] = {"steps": 4, "batch_size": 2, "lr": 1e-3, "resolution": 64, "seed": 0}
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Three distinct synthetic photos."""
    images = []
    for seed in range(3):
        image = Image.new("RGB", (96, 80), (30 + 60 * seed, 90, 200 - 50 * seed))
        image.paste((250, 40, 40), (20 + 5 * seed, 20, 60, 60))
        images.append(image)
    return images


@pytest.fixture(scope="module")
def data(tiny_subject_pipe, photos):
    """Latents, embeddings and masks for the photos, computed once."""
    return prepare_training_data(tiny_subject_pipe, photos, CAPTIONS, PHRASE, _config())


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family_data(request, photos):
    """(pipe, training data) of each subject-model family's tiny pipeline, computed once per family."""
    pipe = request.getfixturevalue("tiny_subject_pipe" if request.param == "sd15" else "tiny_sdxl_pipe")
    return pipe, prepare_training_data(pipe, photos, CAPTIONS, PHRASE, _config())


def _fresh_unet(pipe):
    return copy.deepcopy(pipe.unet)


# -- the loss --------------------------------------------------------------------------------------


def test_pixel_outside_the_mask_changes_neither_loss_nor_gradient(family_data) -> None:
    """Perturbing the target where the mask is 0 leaves the loss and every gradient bit-identical."""
    tiny_subject_pipe, data = family_data
    unet = _fresh_unet(tiny_subject_pipe)
    mask = data.masks[:1].clone()
    mask[..., 0, 0] = 0.0  # make sure there is an outside pixel
    mask[..., 4, 4] = 1.0  # and an inside one
    noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def loss_and_grads(target: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        unet.zero_grad(set_to_none=True)
        prediction = unet(noisy, 500, **unet_inputs(data.embeddings[:1])).sample
        loss = masked_mse(prediction, target, mask)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in unet.up_blocks.parameters()]

    base_loss, base_grads = loss_and_grads(target)
    outside = target.clone()
    outside[..., 0, 0] += 10.0
    loss_out, grads_out = loss_and_grads(outside)
    assert torch.equal(base_loss, loss_out)
    assert all(torch.equal(a, b) for a, b in zip(base_grads, grads_out, strict=True))
    inside = target.clone()
    inside[..., 4, 4] += 10.0
    loss_in, grads_in = loss_and_grads(inside)
    assert not torch.equal(base_loss, loss_in)
    assert any(not torch.equal(a, b) for a, b in zip(base_grads, grads_in, strict=True))


def test_masked_loss_is_the_mean_of_the_squared_masked_error() -> None:
    """mean((mask * (eps - eps_hat))^2) over every element, masked ones counting as zeros."""
    prediction = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.zeros_like(prediction)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert masked_mse(prediction, target, mask).item() == pytest.approx((1 + 16) / 4)


# -- the loop --------------------------------------------------------------------------------------


def test_only_up_blocks_change_and_the_rest_is_bit_identical(family_data) -> None:
    """Decoder-only training (the default) moves up_blocks and nothing else; --train all moves the encoder."""
    tiny_subject_pipe, data = family_data
    base = {k: v.clone() for k, v in tiny_subject_pipe.unet.state_dict().items()}
    unet = _fresh_unet(tiny_subject_pipe)
    result = train_unet(unet, tiny_subject_pipe.scheduler, data, _config(steps=2))
    assert result.names and all(name.startswith("up_blocks.") for name in result.names)
    after = unet.state_dict()
    changed = {k for k in base if not torch.equal(base[k], after[k])}
    assert changed, "training changed nothing"
    assert all(k.startswith("up_blocks.") for k in changed)
    assert len(changed) >= len(result.names) // 2
    everything = _fresh_unet(tiny_subject_pipe)
    train_unet(everything, tiny_subject_pipe.scheduler, data, _config(steps=2, train="all"))
    moved = {k for k, v in everything.state_dict().items() if not torch.equal(base[k], v)}
    assert any(k.startswith("down_blocks.") for k in moved)


def test_loss_falls_over_a_short_run(family_data) -> None:
    """A few dozen steps lower the masked loss on a fixed evaluation set."""
    tiny_subject_pipe, data = family_data
    unet = _fresh_unet(tiny_subject_pipe)
    before = eval_loss(unet, tiny_subject_pipe, data)
    result = train_unet(unet, tiny_subject_pipe.scheduler, data, _config(steps=30, batch_size=3))
    after = eval_loss(unet, tiny_subject_pipe, data)
    assert len(result.losses) == 30
    assert after < 0.8 * before


def test_same_seed_gives_the_same_weights(family_data) -> None:
    """Two runs with one seed are bit-identical; another seed differs."""
    tiny_subject_pipe, data = family_data
    runs = []
    for seed in (7, 7, 8):
        unet = _fresh_unet(tiny_subject_pipe)
        train_unet(unet, tiny_subject_pipe.scheduler, data, _config(seed=seed, steps=3))
        runs.append(trained_state(unet, [n for n, _ in unet.named_parameters()], torch.float32))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_resume_from_a_checkpoint_continues_exactly(tiny_subject_pipe, data, tmp_path: Path) -> None:
    """3 steps + checkpoint + 3 resumed steps == 6 steps straight (params, optimiser and RNG restored)."""
    straight = _fresh_unet(tiny_subject_pipe)
    full = train_unet(straight, tiny_subject_pipe.scheduler, data, _config(steps=6))
    checkpoint = tmp_path / "checkpoint.pt"
    first = _fresh_unet(tiny_subject_pipe)
    config = _config(steps=3, checkpoint_every=3)
    train_unet(first, tiny_subject_pipe.scheduler, data, config, checkpoint_path=checkpoint)
    state = load_checkpoint(checkpoint)
    assert state["step"] == 3 and len(state["losses"]) == 3
    resumed = _fresh_unet(tiny_subject_pipe)  # a new process: base weights, state from the file
    result = train_unet(resumed, tiny_subject_pipe.scheduler, data, _config(steps=6), resume=state)
    assert result.steps == 6 and result.losses == pytest.approx(full.losses, abs=0)
    pairs = zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


# -- weights files ---------------------------------------------------------------------------------


def test_saved_weights_reload_into_a_fresh_unet_and_reproduce_outputs(
    tiny_subject_pipe, data, tmp_path: Path
) -> None:
    """Only trained params go in the file, with metadata; a fresh UNet loading it gives the same outputs."""
    config = _config(steps=3, save_dtype="fp32")
    unet = _fresh_unet(tiny_subject_pipe)
    result = train_unet(unet, tiny_subject_pipe.scheduler, data, config)
    path = tmp_path / "weights.safetensors"
    metadata = weights_metadata(config, "tiny", result.names, subject="robot")
    save_trained_weights(path, trained_state(unet, result.names, torch.float32), metadata)
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(result.names)
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file is gone
    fresh = _fresh_unet(tiny_subject_pipe)
    loaded = load_trained_weights(fresh, path)
    assert loaded["base_model"] == "tiny" and loaded["stencil_version"] == __version__
    assert json.loads(loaded["params"])["steps"] == 3 and loaded["subject"] == "robot"
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = unet(sample, 300, encoder_hidden_states=data.embeddings[:2]).sample
        got = fresh(sample, 300, encoder_hidden_states=data.embeddings[:2]).sample
        base = tiny_subject_pipe.unet(sample, 300, encoder_hidden_states=data.embeddings[:2]).sample
    assert torch.equal(expected, got)
    assert not torch.equal(base, got)
    # an fp16 file (--save-dtype fp16) is smaller, and close, not exact
    half = tmp_path / "half.safetensors"
    save_trained_weights(half, trained_state(unet, result.names, torch.float16), metadata)
    with safe_open(str(half), framework="pt") as handle:
        assert handle.get_tensor(result.names[0]).dtype == torch.float16
    assert half.stat().st_size < path.stat().st_size


def test_damaged_or_foreign_weights_are_clear_errors(tiny_subject_pipe, tmp_path: Path) -> None:
    """A truncated file or one for another model raises StencilError, not a traceback."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(StencilError, match="damaged"):
        load_trained_weights(_fresh_unet(tiny_subject_pipe), bad)
    foreign = tmp_path / "foreign.safetensors"
    save_trained_weights(foreign, {"up_blocks.9.nope": torch.zeros(2)}, {"base_model": "other"})
    with pytest.raises(StencilError, match="does not fit"):
        load_trained_weights(_fresh_unet(tiny_subject_pipe), foreign)


def test_a_weights_file_of_another_shape_is_refused_before_any_weight_changes(
    tiny_subject_pipe, tmp_path: Path
) -> None:
    unet = _fresh_unet(tiny_subject_pipe)
    names = [name for name, _ in unet.named_parameters() if name.startswith("up_blocks.")][:2]
    before = {name: tensor.clone() for name, tensor in trained_state(unet, names, torch.float32).items()}
    wrong = {names[0]: torch.ones_like(before[names[0]]), names[1]: torch.ones(3, 3)}
    path = save_trained_weights(tmp_path / "wrong.safetensors", wrong, {"base_model": "other"})
    with pytest.raises(StencilError, match=rf"does not fit this UNet: {names[1]} is \(3, 3\)") as caught:
        load_trained_weights(unet, path)
    assert "trained on other" in str(caught.value)
    after = trained_state(unet, names, torch.float32)
    assert all(torch.equal(after[name], before[name]) for name in names)  # checked first, then copied


# -- the command -----------------------------------------------------------------------------------


def _add_subject(cli, tmp_path: Path, name: str = "robot", captions: bool = True) -> None:
    folder = tmp_path / "photos"
    for seed in range(3):
        make_photo(folder / f"p{seed}.png", seed=seed)
    result = cli("add", name, folder, "--phrase", PHRASE)
    assert result.exit_code == 0, result.output
    if captions:
        store = open_store()
        subject = store.get_subject(name)
        store.set_captions(
            name, {image["id"]: CAPTIONS[i] for i, image in enumerate(subject.images)}, "manual"
        )
        store.close()


def test_train_command_end_to_end(cli, tiny_preset, tmp_path: Path) -> None:
    """A done run row with params and losses, a weights file with metadata, mask pictures, show --masks."""
    _add_subject(cli, tmp_path)
    result = cli("train", "robot", "--subject-model", "tiny", "--steps", "5", "--batch-size", "2",
                 "--lr", "1e-3", "--seed", "3", "--json")
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)
    assert run["status"] == "done" and run["step"] == 5 and len(run["losses"]) == 5
    assert run["params"]["subject_model"] == "tiny" and run["params"]["resolution"] == 64
    assert run["params"]["train"] == "decoder" and run["params"]["seed"] == 3
    assert run["duration_s"] > 0
    weights = Path(run["weights_file"])
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
        names = list(handle.keys())
        assert names and all(name.startswith("up_blocks.") for name in names)
        assert handle.get_tensor(names[0]).dtype == torch.float32  # exact: the default save dtype
    assert metadata["base_model"] == "tiny" and metadata["stencil_version"] == __version__
    assert json.loads(metadata["params"])["lr"] == pytest.approx(1e-3)
    store = open_store()
    assert store.latest_done_run("robot").id == run["id"]
    run_masks = sorted((weights.parent / "masks").glob("*.png"))
    assert len(run_masks) == 3 and len(run["masks"]) == 3
    assert not (weights.parent / "checkpoint.pt").exists()
    shown = cli("show", "robot", "--masks")
    assert shown.exit_code == 0, shown.output
    paths = [Path(line.split()[-1]) for line in shown.stdout.strip().splitlines()]
    assert len(paths) == 3 and all(path.is_file() for path in paths)
    assert Image.open(paths[0]).size == (64, 64)


def test_masks_only_writes_pictures_without_a_run(cli, tiny_preset, tmp_path: Path) -> None:
    """--masks-only saves one picture per photo and creates no run; stale running rows get marked."""
    _add_subject(cli, tmp_path)
    store = open_store()
    stale = store.create_run("robot", {"steps": 1}, "tiny")  # a process that died without cleanup
    assert cli("show", "robot", "--masks").stdout.strip() == ""
    result = cli("train", "robot", "--subject-model", "tiny", "--masks-only", "--json")
    assert result.exit_code == 0, result.output
    masks = json.loads(result.stdout)["masks"]
    assert len(masks) == 3 and all(Path(row["file"]).is_file() for row in masks)
    assert all(0 < row["coverage"] <= 1 for row in masks)
    runs = store.list_runs("robot")
    assert [r.id for r in runs] == [stale.id] and runs[0].status == "interrupted"


def test_refusals(cli, tiny_preset, tmp_path: Path) -> None:
    """Uncaptioned, photo-less, phrase-less captions and a concurrent training are one-line refusals."""
    _add_subject(cli, tmp_path, captions=False)
    result = cli("train", "robot", "--subject-model", "tiny")
    assert result.exit_code == 1 and "stencil caption robot" in result.output
    assert "Traceback" not in result.output
    store = open_store()
    subject = store.get_subject("robot")
    captions = {image["id"]: CAPTIONS[0] for image in subject.images}
    captions[subject.images[1]["id"]] = "a photo of a dog"
    store.set_captions("robot", captions, "manual")
    result = cli("train", "robot", "--subject-model", "tiny")
    assert result.exit_code == 1  # before the model loads
    assert f"(ids {subject.images[1]['id']})" in result.output and "toy robot" in result.output
    with subject_lock(store, "robot"):
        result = cli("train", "robot", "--subject-model", "tiny")
        assert result.exit_code == 1 and "already being trained" in result.output
    for image in subject.images:
        store.remove_image("robot", str(image["id"]))
    result = cli("train", "robot", "--subject-model", "tiny")
    assert result.exit_code == 1 and "no photos" in result.output
    assert cli("train", "robot", "--steps", "0").exit_code == 2


def test_resume_refuses_changed_captions_or_phrase(cli, tiny_preset, tmp_path: Path, monkeypatch) -> None:
    """The run stores a hash of captions + phrase; --resume after either changed is a one-line refusal."""
    from stencil_cli.core import weights

    _add_subject(cli, tmp_path)
    real_save = weights.save_trained_weights

    def crash_before_saving(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "save_trained_weights", crash_before_saving)
    result = cli("train", "robot", "--subject-model", "tiny", "--steps", "2", "--batch-size", "2",
                 "--checkpoint-every", "1")
    assert result.exit_code == 130, result.output
    monkeypatch.setattr(weights, "save_trained_weights", real_save)
    store = open_store()
    (run,) = store.list_runs("robot")
    assert run.status == "interrupted" and len(run.params["captions_sha256"]) == 64
    subject = store.get_subject("robot")
    first = subject.images[0]["id"]
    store.set_captions("robot", {first: "a toy robot on a beach"}, "manual")
    result = cli("train", "robot", "--resume")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "captions or the phrase of 'robot' changed since run" in " ".join(result.stderr.split())
    store.set_captions("robot", {first: CAPTIONS[0]}, "manual")  # back as they were ...
    store.set_captions("robot", {}, "manual", phrase="robot")  # ... but another phrase
    assert cli("train", "robot", "--resume").exit_code == 1
    store.set_captions("robot", {}, "manual", phrase=PHRASE)  # everything as it was: resume works
    result = cli("train", "robot", "--resume", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "done"


def test_lock_is_released_when_its_process_dies(stencil_home: Path) -> None:
    """A process killed while holding the lock does not block the next training."""
    code = (
        "import os, signal\n"
        "from stencil_cli.store.db import open_store\n"
        "from stencil_cli.verbs.common import subject_lock\n"
        "store = open_store()\n"
        "with subject_lock(store, 'robot'):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    process = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert (stencil_home / "subjects" / "robot" / ".train.lock").exists()
    with subject_lock(open_store(), "robot"):
        pass


def _run_row(home: Path) -> dict | None:
    if not (home / "stencil.db").exists():
        return None
    with sqlite3.connect(home / "stencil.db") as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("select * from runs order by id desc limit 1").fetchone()
        return dict(row) if row else None


def test_sigint_leaves_an_interrupted_run_and_resume_finishes_it(
    cli, tiny_preset, tmp_path: Path, stencil_home: Path
) -> None:
    """Ctrl-C in a `python -m stencil_cli train` subprocess: run interrupted, no weights; --resume ends it."""
    _add_subject(cli, tmp_path)
    command = [sys.executable, "-m", "stencil_cli", "train", "robot", "--subject-model", "tiny",
               "--steps", "100000", "--batch-size", "2", "--checkpoint-every", "2"]
    process = subprocess.Popen(command, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=Path(__file__).resolve().parents[1])
    run_dir = None
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            row = _run_row(stencil_home)
            if row and (row["step"] or 0) >= 1:
                run_dir = stencil_home / "subjects" / "robot" / "runs" / str(row["id"])
                if (run_dir / "checkpoint.pt").exists():
                    break
            time.sleep(0.2)
        assert run_dir is not None and process.poll() is None, process.communicate()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    row = _run_row(stencil_home)
    assert row["status"] == "interrupted" and row["step"] >= 2 and row["weights_file"] is None
    assert not list(run_dir.glob("*.safetensors")) and not list(run_dir.glob(".*.tmp"))
    checkpoint_step = load_checkpoint(run_dir / "checkpoint.pt")["step"]
    from stencil_cli.verbs.train import check_resume_steps

    store = open_store()
    with pytest.raises(BadInputError, match="fewer than the"):  # checked before the run is reopened
        check_resume_steps(store, "robot", store.get_run("robot", row["id"]), checkpoint_step - 1)
    check_resume_steps(store, "robot", store.get_run("robot", row["id"]), checkpoint_step)
    result = cli("train", "robot", "--resume", "--steps", str(checkpoint_step + 2), "--json")
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)
    assert run["id"] == row["id"] and run["status"] == "done"
    assert run["step"] == checkpoint_step + 2 and len(run["losses"]) == checkpoint_step + 2
    assert Path(run["weights_file"]).is_file() and not (run_dir / "checkpoint.pt").exists()
    assert cli("train", "robot", "--resume").exit_code == 1  # nothing left to resume


def test_mixed_precision_keeps_fp32_master_weights(tiny_subject_pipe, data) -> None:
    """bf16 autocast trains (params move) while the trained parameters stay fp32."""
    unet = _fresh_unet(tiny_subject_pipe)
    before = unet.up_blocks[0].resnets[0].conv1.weight.clone()
    result = train_unet(unet, tiny_subject_pipe.scheduler, data, _config(steps=2, precision="bf16"))
    params = dict(unet.named_parameters())
    assert all(params[name].dtype == torch.float32 for name in result.names)
    assert not torch.equal(before, unet.up_blocks[0].resnets[0].conv1.weight)


def test_gradient_checkpointing_gives_the_same_weights(tiny_subject_pipe, data) -> None:
    """Recomputing activations changes memory, not the result."""
    plain, checkpointed = _fresh_unet(tiny_subject_pipe), _fresh_unet(tiny_subject_pipe)
    train_unet(plain, tiny_subject_pipe.scheduler, data, _config(steps=2))
    train_unet(checkpointed, tiny_subject_pipe.scheduler, data, _config(steps=2, gradient_checkpointing=True))
    pairs = zip(plain.state_dict().values(), checkpointed.state_dict().values(), strict=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in pairs)
    assert not checkpointed.is_gradient_checkpointing


def test_train_refuses_an_out_of_range_resolution_or_step_count_in_one_line(cli) -> None:
    for resolution in ("0", "100000"):
        result = cli("train", "anything", "--resolution", resolution)
        assert result.exit_code == 2 and "Traceback" not in result.output
    assert cli("train", "anything", "--steps", "99999999999").exit_code == 2


def test_a_bad_training_setting_is_shown_with_its_flag(cli, tmp_path: Path) -> None:
    _add_subject(cli, tmp_path)
    result = cli("train", "robot", "--lr", "-1")
    assert result.exit_code == 2, result.output
    text = " ".join(result.stderr.split())
    assert text.startswith("error: --lr must be a positive number") and "Traceback" not in result.output
    result = cli("train", "robot", "--train", "everything")
    assert result.exit_code == 2 and "--train must be" in " ".join(result.stderr.split())
