"""`stencil train --lora` and `stencil export` through the CLI (tiny preset): a LoRA run's kind and learning
rate, generating with it, each export format from either kind of run, and the refusals (exit 2, one line,
nothing written, no model loaded)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from photos import add_subject
from PIL import Image
from runs import interrupted_run
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from stencil_cli import models
from stencil_cli.base.pngmeta import read_png_parameters
from stencil_cli.cli import app
from stencil_cli.core import export as export_core
from stencil_cli.store.db import Store, open_store
from stencil_cli.store.records import Run
from stencil_cli.verbs import export as export_verb
from stencil_cli.verbs import train as train_verb
from stencil_cli.verbs.train import TrainRequest

TINY = ("--subject-model", "tiny")
FAST = ("--steps", "3", "--batch-size", "2")
SAMPLE = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
TEXT = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(6))


def _call(unet: Any) -> torch.Tensor:
    with torch.no_grad():
        return unet(SAMPLE, 300, encoder_hidden_states=TEXT).sample


def _stencil_unet(tiny_models_dir: Path, run: dict[str, Any]) -> Any:
    """The UNet stencil generates with for `run` (the base with the run's weights loaded)."""
    from stencil_cli.core.weights import load_trained_weights

    unet = models.load_subject_pipeline(str(tiny_models_dir / "subject"), device="cpu", precision="fp32").unet
    load_trained_weights(unet, Path(run["weights_file"]))
    return unet


def _no_model(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a model was loaded")


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# -- a store with a LoRA run and a full run, trained once for the module ----------------------------------


@pytest.fixture(scope="module")
def trained_home(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A plain `stencil train` then `stencil train --lora 4` of `robot`; the store and both runs' JSON."""
    home = tmp_path_factory.mktemp("export-home") / "stencil-home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "tiny").symlink_to(tiny_models_dir, target_is_directory=True)
    runner = CliRunner()

    def cli(*args: Any) -> Any:
        return runner.invoke(app, [str(a) for a in args])

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STENCIL_HOME", str(home))
        patch.setenv("HF_HUB_OFFLINE", "1")
        add_subject(cli, tmp_path_factory.mktemp("photos"))
        assert cli("caption", "robot", "--captioner", "template").exit_code == 0
        full = cli("train", "robot", *TINY, *FAST, "--json")
        assert full.exit_code == 0, full.output
        lora = cli("train", "robot", *TINY, *FAST, "--lora", "4", "--json")
        assert lora.exit_code == 0, lora.output
    return {"home": home, "lora": json.loads(lora.stdout), "full": json.loads(full.stdout)}


@pytest.fixture
def trained(trained_home: dict[str, Any], stencil_home: Path) -> dict[str, Any]:
    """This test's own copy of the trained store (runs keep their ids; weights paths follow the copy)."""
    shutil.copytree(trained_home["home"], stencil_home, symlinks=True)
    store = open_store()
    runs = {kind: store.get_run("robot", trained_home[kind]["id"]).to_dict() for kind in ("lora", "full")}
    return {**runs, "store": store}


# -- stencil train --lora ------------------------------------------------------------------------------------


def test_train_with_lora_records_a_lora_run_with_the_lora_learning_rate(trained_home: dict[str, Any]) -> None:
    lora, full = trained_home["lora"], trained_home["full"]
    assert lora["kind"] == "lora" and lora["params"]["lora_rank"] == 4 and lora["params"]["lr"] == 1e-4
    assert full["kind"] == "full" and full["params"]["lora_rank"] is None and full["params"]["lr"] == 2e-5
    with safe_open(lora["weights_file"], framework="pt") as handle:
        assert handle.metadata()["kind"] == "lora"
        assert all(".lora_A." in key or ".lora_B." in key for key in handle.keys())  # noqa: SIM118
    assert os.path.getsize(lora["weights_file"]) < os.path.getsize(full["weights_file"]) / 10


def test_train_json_and_runs_json_agree_on_each_runs_kind(trained: dict[str, Any], cli: Any) -> None:
    listed = {row["id"]: row for row in json.loads(cli("runs", "robot", "--json").stdout)}
    for kind in ("lora", "full"):
        assert listed[trained[kind]["id"]]["kind"] == trained[kind]["kind"] == kind


def test_a_typed_lr_wins_over_the_lora_default(stencil_home: Path, cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    config, _ = train_verb.fresh_config(
        store, TrainRequest("robot", lora_rank=8, lr=3e-5, subject_model="tiny")
    )
    assert config.lr == 3e-5 and config.lora_rank == 8 and config.kind == "lora"
    config, _ = train_verb.fresh_config(store, TrainRequest("robot", lora_rank=8, subject_model="tiny"))
    assert config.lr == 1e-4
    config, _ = train_verb.fresh_config(store, TrainRequest("robot", subject_model="tiny"))
    assert config.lr == 2e-5 and config.kind == "full"


def test_gen_renders_with_a_lora_run(trained: dict[str, Any], cli: Any) -> None:
    lora = trained["lora"]
    args = ("--context-model", "tiny", "--steps", "2", "--inner-steps", "1", "--draft-steps", "2")
    run = ("--run", lora["id"], "--seed", "3", "--lora-scale", "0.5", "--json")
    result = cli("gen", "robot", "on the beach", *TINY, *args, *run)
    assert result.exit_code == 0, result.output
    [record] = [json.loads(line) for line in result.stdout.splitlines()]  # gen --json: JSON Lines
    assert record["run_id"] == lora["id"] and Path(record["image_file"]).is_file()
    carried = read_png_parameters(Path(record["image_file"]))
    assert carried["lora_scale"] == 0.5
    assert "Stencil LoRA scale: 0.5" in Image.open(record["image_file"]).text["parameters"]


def test_gen_from_png_renders_the_same_image_again(trained: dict[str, Any], cli: Any) -> None:
    args = ("--context-model", "tiny", "--steps", "2", "--inner-steps", "1", "--draft-steps", "2")
    args += ("--tau", "40")
    first = cli("gen", "robot", "on the beach", *TINY, *args, "--seed", "5", "--lora-scale", "0.7", "--json")
    assert first.exit_code == 0, first.output
    [original] = [json.loads(line) for line in first.stdout.splitlines()]
    again = cli("gen", "--from-png", original["image_file"], "--json")
    assert again.exit_code == 0, again.output
    [record] = [json.loads(line) for line in again.stdout.splitlines()]
    assert record["image_file"] != original["image_file"]
    before = read_png_parameters(Path(original["image_file"]))
    after = read_png_parameters(Path(record["image_file"]))
    for key in ("prompt", "draft_prompt", "seed", "tau", "steps", "run_id", "lora_scale", "subject_model"):
        assert after[key] == before[key], key
    pixels = [np.asarray(Image.open(r["image_file"])) for r in (original, record)]
    assert np.array_equal(*pixels)


def test_gen_with_a_missing_subject_model_fails_before_the_draft_is_drawn(
    trained: dict[str, Any], cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_draft(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the context model loaded before the subject model was found")

    monkeypatch.setattr(models, "load_context_pipeline", no_draft)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli("gen", "robot", "on the beach", "--subject-model", "sd15", "--context-model", "tiny")
    assert result.exit_code == 1, result.output
    assert "not in the Hugging Face cache" in result.output and "stencil models pull" in result.output
    assert "AssertionError" not in result.output


def test_gen_from_png_refuses_what_it_cannot_re_run(
    trained: dict[str, Any], cli: Any, tmp_path: Path
) -> None:
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    cases = [
        (("--from-png", str(tmp_path / "gone.png")), f"--from-png {tmp_path / 'gone.png'}: no such file"),
        (("--from-png", str(plain)), "is not an image stencil generated"),
        (("--from-png", str(tmp_path)), "is a folder"),
        (("robot", "a prompt", "--from-png", str(plain)), "give a prompt or --from-png, not both"),
        (("--seed", "3"), "say which subject to render"),
    ]
    for args, message in cases:
        result = cli("gen", *args)
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(_errors(result.output)) == 1


@pytest.mark.parametrize("scale", ["3", "-1", "nan"])
def test_a_lora_scale_off_its_range_is_refused_before_the_model_loads(
    trained: dict[str, Any], cli: Any, monkeypatch: pytest.MonkeyPatch, scale: str
) -> None:
    monkeypatch.setattr(models, "load_subject_pipeline", _no_model)
    result = cli("gen", "robot", "on the beach", *TINY, "--lora-scale", scale)
    assert result.exit_code == 2 and "--lora-scale must be a number from 0" in result.output, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--lora-alpha", "8"), "--lora-alpha needs --lora"),
        (("--lora", "0"), "--lora must be at least 1 (got 0)"),
        (("--lora", "4", "--lora-alpha", "0"), "--lora-alpha must be a positive number (got 0.0)"),
    ],
)
def test_bad_lora_settings_are_refused_before_the_model_loads(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], message: str
) -> None:
    monkeypatch.setattr(train_verb, "load_training_pipeline", _no_model)
    store = add_subject(cli, tmp_path)
    assert cli("caption", "robot", "--captioner", "template").exit_code == 0
    result = cli("train", "robot", *TINY, *args)
    assert result.exit_code == 2, result.output
    assert _errors(result.output) == [f"error: {message}"] or message in result.output
    assert store.list_runs("robot") == []


def test_resume_keeps_the_runs_lora_rank(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    run = interrupted_run(store, lora_rank=4)
    result = cli("train", "robot", "--resume", "--lora", "8", "--lora-alpha", "8", *TINY)
    assert result.exit_code == 2, result.output
    assert f"resuming run {run.id} keeps its own settings: drop --lora, --lora-alpha" in " ".join(
        result.output.split()
    )
    # typing the run's own rank and alpha (alpha = rank when the run gave none) is no change
    given = frozenset({"lora_rank", "lora_alpha"})
    same = TrainRequest("robot", resume=True, lora_rank=4, lora_alpha=4.0, given=given)
    config, _ = train_verb.resumed_config(store, run, same)
    assert config.lora_rank == 4 and config.kind == "lora" and config.lr == run.params["lr"]


# -- stencil export ----------------------------------------------------------------------------------------


def _export(cli: Any, *args: Any) -> tuple[Any, dict[str, Any]]:
    result = cli("export", "robot", *args, "--json")
    assert result.exit_code == 0, result.output
    return result, json.loads(result.stdout)


@pytest.mark.parametrize("fmt", ["lora", "kohya"])
def test_a_lora_run_exports_a_lora_diffusers_loads_as_stencil_uses_it(
    trained: dict[str, Any], cli: Any, tiny_models_dir: Path, tmp_path: Path, caplog: Any, fmt: str
) -> None:
    target = tmp_path / f"robot-{fmt}.safetensors"
    result, data = _export(cli, "-f", fmt, "-o", target, "--save-dtype", "fp32")
    assert data["path"] == str(target) and data["card"] == str(tmp_path / f"robot-{fmt}.README.md")
    assert data["kind"] == "lora" and data["rank"] == 4 and data["error"] is None
    assert data["run_id"] == trained["lora"]["id"]  # the newest finished run
    assert data["bytes"] == target.stat().st_size and Path(data["card"]).is_file()
    assert "SVD" not in result.output
    pipe = models.load_subject_pipeline(str(tiny_models_dir / "subject"), device="cpu", precision="fp32")
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(target))
    lines = caplog.text.splitlines() + [str(w.message) for w in caught]
    log = "\n".join(line for line in lines if "no lora keys associated to cliptextmodel" not in line.lower())
    assert "unexpected keys" not in log.lower() and "missing" not in log.lower()
    expected = _call(_stencil_unet(tiny_models_dir, trained["lora"]))
    torch.testing.assert_close(_call(pipe.unet), expected, rtol=1e-4, atol=1e-5)


def test_the_default_format_is_kohya_the_one_every_tool_loads(
    trained: dict[str, Any], cli: Any, tmp_path: Path
) -> None:
    from safetensors import safe_open

    target = tmp_path / "robot.safetensors"
    _, data = _export(cli, "-o", target)
    assert data["format"] == "kohya"
    with safe_open(str(target), "pt") as handle:
        keys = list(handle.keys())
    assert keys and all(key.startswith("lora_unet_") for key in keys)
    assert "ComfyUI" in (tmp_path / "robot.README.md").read_text()


def test_a_full_run_exports_a_diffusers_folder_with_the_unet_stencil_uses(
    trained: dict[str, Any], cli: Any, tiny_models_dir: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    full = trained["full"]
    target = tmp_path / "robot-pipeline"
    _, data = _export(cli, "--run", full["id"], "-f", "diffusers", "-o", target, "--save-dtype", "fp32")
    assert data["kind"] == "full" and data["rank"] is None and data["error"] is None
    assert data["card"] == str(target / "README.md") and "toy robot" in (target / "README.md").read_text()
    assert oct(target.stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode
    loaded = StableDiffusionPipeline.from_pretrained(str(target)).unet.state_dict()
    reference = _stencil_unet(tiny_models_dir, full).state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(tensor, reference[key]) for key, tensor in loaded.items())


def test_a_full_run_exported_as_a_lora_reports_the_svd_error(
    trained: dict[str, Any], cli: Any, tmp_path: Path
) -> None:
    full = trained["full"]
    low, data_low = _export(
        cli, "--run", full["id"], "-f", "kohya", "--rank", "1", "-o", tmp_path / "r1.safetensors"
    )
    _, data_high = _export(
        cli, "--run", full["id"], "-f", "kohya", "--rank", "16", "-o", tmp_path / "r16.safetensors"
    )
    for data, rank in ((data_low, 1), (data_high, 16)):
        assert data["kind"] == "full" and data["rank"] == rank and data["error"]["rank"] == rank
        assert 0 < data["error"]["overall"] <= 1 and data["error"]["worst_layer"].startswith("up_blocks.")
    assert data_high["error"]["overall"] < data_low["error"]["overall"]
    text = " ".join(low.output.split())
    error = data_low["error"]
    assert (
        f"SVD rank 1: relative error of the weight difference {error['overall']:.3f} overall, "
        f"worst layer {error['worst']:.3f} ({error['worst_layer']})"
    ) in text
    assert f"biases and norms left out: {error['left_out']:.3f} of the difference" in text
    with safe_open(str(tmp_path / "r16.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())  # noqa: SIM118
        assert handle.metadata()["run_kind"] == "full"
    assert keys and all(key.startswith("lora_unet_") for key in keys)


def test_a_full_run_exports_a_single_file_checkpoint_with_a_card(
    trained: dict[str, Any], cli: Any, tmp_path: Path
) -> None:
    target = tmp_path / "robot.safetensors"
    result = cli("export", "robot", "--run", trained["full"]["id"], "--format", "single-file", "-o", target)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(target)
    assert "single-file checkpoint from full run" in " ".join(result.output.split())
    with safe_open(str(target), framework="pt") as handle:
        assert any(key.startswith("model.diffusion_model.output_blocks.") for key in handle.keys())  # noqa: SIM118
    assert "from_single_file" in (tmp_path / "robot.README.md").read_text()


# -- refusals: one line, exit 2, nothing written, no model loaded -------------------------------------------


def _fake_run(store: Store, status: str, params: dict[str, Any], shape: tuple[int, ...] = (8, 6)) -> Run:
    """A run row of `robot` with the given status and a small weights file (one `shape` weight)."""
    from stencil_cli.core.training import TrainConfig

    run = store.create_run("robot", {**TrainConfig().to_params(), **params, "subject_model": "tiny"}, "tiny")
    weights = store.run_dir("robot", run.id) / "weights.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({"up_blocks.0.resnets.0.conv1.weight": torch.zeros(shape)}, str(weights))
    store.finish_run(run.id, status, weights_file=weights if status == "done" else None)
    return store.get_run("robot", run.id)


@pytest.fixture
def refusing(cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """`robot` with a done full run (largest rank 6), a done LoRA run of rank 4 and an interrupted run;
    loading a model fails the test. `out` is an empty folder, but for `taken.safetensors`."""
    monkeypatch.setattr(models, "load_subject_pipeline", _no_model)
    monkeypatch.setattr(export_core, "export_run", _no_model)
    store = add_subject(cli, tmp_path)
    full = _fake_run(store, "done", {})
    lora = _fake_run(store, "done", {"lora_rank": 4})
    stopped = _fake_run(store, "interrupted", {})
    out = tmp_path / "out"
    out.mkdir()
    (out / "taken.safetensors").write_bytes(b"mine")
    (out / "folder").mkdir()
    (out / "folder" / "keep.txt").write_text("mine")
    (out / "card.README.md").write_text("mine")
    (out / "pipeline").mkdir()  # a diffusers folder that another tool wrote
    (out / "pipeline" / "model_index.json").write_text("{}")
    os.mkfifo(out / "fifo")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(out / "socket"))
    return {
        "store": store.root,
        "full": full.id,
        "lora": lora.id,
        "stopped": stopped.id,
        "out": out,
        "weights": full.weights_file,
        "socket": listener,
    }


A = "{out}/a.safetensors"
REFUSALS = [
    (["-f", "onnx", "-o", A], "--format 'onnx' is unknown: use one of lora, kohya, diffusers"),
    (["--run", "{stopped}", "-f", "lora", "-o", A], "run {stopped} of 'robot' is interrupted, not done"),
    (["-f", "lora", "--rank", "0", "-o", A], "--rank must be a positive whole number (got 0)"),
    (["-f", "lora", "--rank", "-2", "-o", A], "--rank must be a positive whole number"),
    (["--run", "{full}", "-f", "kohya", "--rank", "7", "-o", A], "--rank 7 is more than"),
    (["--run", "{lora}", "-f", "lora", "--rank", "8", "-o", A], "is a LoRA of rank 4"),
    (["-f", "diffusers", "--rank", "4", "-o", "{out}/pipe"], "--rank applies only to the lora and kohya"),
    (["-f", "lora", "-o", "{out}/missing/a.safetensors"], "the folder {out}/missing does not exist"),
    (["-f", "lora", "-o", "{out}/taken.safetensors"], "{out}/taken.safetensors already exists"),
    (["-f", "lora", "-o", "{out}/card.safetensors"], "{out}/card.README.md already exists"),
    (["-f", "lora", "-o", "{out}/folder", "--force"], "{out}/folder is a folder; the lora export is one"),
    (["-f", "diffusers", "-o", "{out}/folder", "--force"], "is a folder that stencil did not write"),
    (["-f", "diffusers", "-o", "{out}/pipeline", "--force"], "is a folder that stencil did not write"),
    (["-f", "single-file", "-o", "{weights}", "--force"], "-o {weights} is inside the store {store}"),
    (["-f", "lora", "-o", "{store}/subjects/robot/x.safetensors"], "is inside the store"),
    (["-f", "lora", "-o", "/dev/null", "--force"], "-o /dev/null is a character device"),
    (["-f", "lora", "-o", "{out}/fifo", "--force"], "-o {out}/fifo is a FIFO (named pipe)"),
    (["-f", "lora", "-o", "{out}/socket", "--force"], "-o {out}/socket is a socket"),
    (["-f", "kohya", "-o", "/proc/robot.safetensors"], "/proc/robot.safetensors: cannot write in the folder"),
    (["-f", "diffusers", "-o", "/sys/kernel/robot"], "-o /sys/kernel/robot: cannot write in the folder"),
    (["-f", "diffusers", "-o", "{out}/taken.safetensors", "--force"], "is a file; a diffusers export is"),
    (["-f", "lora", "--save-dtype", "fp64", "-o", A], "--save-dtype must be one of"),
]


@pytest.mark.parametrize(("args", "message"), REFUSALS, ids=[m[:28] for _, m in REFUSALS])
def test_bad_export_requests_are_refused_with_one_line_and_write_nothing(
    refusing: dict[str, Any], cli: Any, args: list[str], message: str
) -> None:
    out = refusing["out"]
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    values = {key: refusing[key] for key in ("out", "full", "lora", "stopped", "store", "weights")}
    weights = refusing["weights"].read_bytes()
    null_device = os.stat("/dev/null")
    result = cli("export", "robot", *[arg.format(**values) for arg in args])
    assert result.exit_code == 2, result.output
    [line] = _errors(result.output)
    assert message.format(**values) in line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "taken.safetensors").read_bytes() == b"mine"
    assert refusing["weights"].read_bytes() == weights and os.stat("/dev/null") == null_device
    assert not Path("/dev/null.README.md").exists()


def test_a_subject_without_a_finished_run_is_refused(cli: Any, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(models, "load_subject_pipeline", _no_model)
    store = add_subject(cli, tmp_path)
    stopped = _fake_run(store, "interrupted", {})
    result = cli("export", "robot", "-f", "lora", "-o", tmp_path / "a.safetensors")
    assert result.exit_code == 2, result.output
    [line] = _errors(result.output)
    assert f"no finished run to export (run {stopped.id} is interrupted)" in line
    assert not (tmp_path / "a.safetensors").exists()


def test_the_verb_and_the_core_agree_on_the_formats() -> None:
    assert export_verb.FORMATS == export_core.FORMATS
    assert export_verb.LORA_FORMATS == export_core.LORA_FORMATS
    assert tuple(export_core.SAVE_DTYPES) == export_verb.SAVE_DTYPES


@pytest.mark.parametrize("fmt", ["lora", "kohya", "diffusers", "single-file"])
def test_a_file_size_limit_during_an_export_says_disk_full_and_leaves_nothing(
    trained: dict[str, Any], tmp_path: Path, fmt: str
) -> None:
    import resource
    import subprocess
    import sys

    def limit() -> None:  # ``ulimit -f 16``: every export writes a tensor file larger than 16 KiB
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    out = tmp_path / "out"
    out.mkdir()
    target = out / ("robot" if fmt == "diffusers" else "robot.safetensors")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "stencil_cli", "export", "robot", "--run", str(trained["full"]["id"]),
         "-f", fmt, "-o", str(target)],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=300,
        preexec_fn=limit,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    [line] = _errors(result.stderr)
    assert line.startswith(f"error: disk full at {target}"), result.stderr
    assert "unexpected" not in result.stderr and list(out.iterdir()) == []
