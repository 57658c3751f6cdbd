"""`train --lora N` is bounded before any training: by a documented maximum before the model loads, and by
the adapted layers' sizes once it has (a rank above min(in, out) only adds parameters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from photos import add_subject
from storecheck import check_store

from stencil_cli.store.db import open_store

MAX_LORA_RANK = 1024  # stencil_cli.core.training.MAX_LORA_RANK, as docs/training.md documents it


@pytest.fixture
def captioned(cli: Any, tmp_path: Path, tiny_preset: Path) -> Path:
    store = add_subject(cli, tmp_path)
    subject = store.get_subject("robot")
    store.set_captions("robot", {image["id"]: "a photo of a toy robot" for image in subject.images}, "manual")
    return store.root


@pytest.mark.parametrize(
    ("rank", "message"),
    [
        (100_000, f"--lora must be at most {MAX_LORA_RANK} (got 100000)"),
        (MAX_LORA_RANK, f"--lora {MAX_LORA_RANK} is more than this model's adapted layers allow (32"),
        (33, "--lora 33 is more than this model's adapted layers allow (32"),
    ],
)
def test_a_lora_rank_beyond_the_layers_is_refused_before_training(
    captioned: Path, cli: Any, rank: int, message: str
) -> None:
    result = cli("train", "robot", "--subject-model", "tiny", "--steps", "1", "--lora", rank)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in " ".join(result.stderr.split()), result.stderr
    assert open_store().list_runs("robot") == []  # no run was started
    assert check_store(captioned) == []


def test_the_largest_rank_the_layers_allow_trains(captioned: Path, cli: Any) -> None:
    result = cli(
        "train", "robot", "--subject-model", "tiny", "--steps", "1", "--batch-size", "1", "--lora", "32"
    )
    assert result.exit_code == 0, result.output
