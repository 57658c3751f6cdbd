"""Non-finite numbers never become a result: NaN weights are refused by `gen` and `export` (no NaN image, no
SVD crash), and a null-text inversion that diverges (`--null-lr 1e30`) stops with one line, saving nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from photos import add_subject
from safetensors.torch import save_file
from storecheck import check_store

from stencil_cli.core.training import TrainConfig, trainable_names
from stencil_cli.store.db import Store, open_store


def _one_error(result: Any) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "unexpected" not in result.stderr and "Traceback" not in result.stderr
    return " ".join(result.stderr[result.stderr.index("error:") :].split())


@pytest.fixture
def nan_run(cli: Any, tmp_path: Path, tiny_preset: Path, tiny_subject_pipe: Any) -> Store:
    """`robot` with a done full run whose weights (the tiny UNet's real decoder shapes) hold a NaN."""
    store = add_subject(cli, tmp_path)
    subject = store.get_subject("robot")
    store.set_captions("robot", {image["id"]: "a photo of a toy robot" for image in subject.images}, "manual")
    params = dict(tiny_subject_pipe.unet.named_parameters())
    names = trainable_names(tiny_subject_pipe.unet, "decoder")
    tensors = {name: params[name].detach().clone() for name in names}
    tensors[names[0]][0] = float("nan")
    run = store.create_run(
        "robot", {**TrainConfig().to_params(), "subject_model": "tiny", "resolution": 64}, base_model="tiny"
    )
    weights = store.run_dir("robot", run.id) / "weights.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(weights), metadata={"kind": "full", "trained": "decoder"})
    store.finish_run(run.id, "done", weights_file=weights)
    return store


def test_gen_refuses_nan_weights_and_saves_no_image(nan_run: Store, cli: Any) -> None:
    result = cli("gen", "robot", "on the moon", "--no-context", "--steps", "2", "--seed", "1")
    assert result.exit_code == 1, result.output
    assert "holds non-finite values (NaN or infinity)" in _one_error(result)
    assert open_store().list_generations("robot") == []
    assert check_store(nan_run.root) == []


@pytest.mark.parametrize("fmt", ["kohya", "single-file"])
def test_export_refuses_nan_weights_in_one_line(nan_run: Store, cli: Any, tmp_path: Path, fmt: str) -> None:
    target = tmp_path / "robot.safetensors"
    result = cli("export", "robot", "-f", fmt, "-o", target)
    assert result.exit_code == 1, result.output
    assert "holds non-finite values (NaN or infinity)" in _one_error(result)
    assert not target.exists() and not (tmp_path / "robot.README.md").exists()


def test_a_diverging_null_text_inversion_stops_with_one_line(
    cli: Any, tmp_path: Path, tiny_preset: Path
) -> None:
    store = add_subject(cli, tmp_path)
    subject = store.get_subject("robot")
    store.set_captions("robot", {image["id"]: "a photo of a toy robot" for image in subject.images}, "manual")
    trained = cli("train", "robot", "--subject-model", "tiny", "--steps", "1", "--batch-size", "1")
    assert trained.exit_code == 0, trained.output
    draft = subject.images[0]["file"]
    result = cli(
        "gen", "robot", "on the moon", "--draft", draft, "--null-lr", "1e30", "--steps", "4", "--seed", "1"
    )
    assert result.exit_code == 1, result.output
    text = _one_error(result)
    assert "non-finite" in text and "--null-lr" in text, text
    assert "RuntimeWarning" not in result.stderr
    assert open_store().list_generations("robot") == []
    assert check_store(store.root, allow_orphan_files=True) == []
