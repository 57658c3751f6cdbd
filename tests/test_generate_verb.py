"""The generation verb (stencil_cli.verbs.generate): what the plan settles before any model loads, and how
each image is written with its row."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from photos import add_subject
from PIL import Image

from stencil_cli.base.errors import FieldError
from stencil_cli.store.db import Store
from stencil_cli.store.records import Run
from stencil_cli.verbs import generate as generate_verb
from stencil_cli.verbs import generation_plan
from stencil_cli.verbs.generation_plan import GenerateRequest, plan_generation


def _done_run(store: Store, model: str = "tiny") -> Run:
    """A done run of `robot` on `model` whose weights file exists (never read: no model loads here)."""
    run = store.create_run("robot", {"subject_model": model, "resolution": 64}, base_model=model)
    weights = store.run_dir("robot", run.id) / "weights.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_safetensors(weights)  # a sound header; the tensors are never loaded here
    store.finish_run(run.id, "done", weights_file=weights)
    return store.get_run("robot", run.id)


def write_tiny_safetensors(path: Path) -> None:
    """A small valid safetensors file (one tensor)."""
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"up_blocks.0.weight": np.zeros(4, dtype=np.float32)}, str(path))


def _age(path: Path, seconds: float = 3600.0) -> None:
    old = path.stat().st_mtime - seconds
    os.utime(path, (old, old))


# -- the plan ---------------------------------------------------------------------------------------------


def test_parse_taus_names_the_tau_field() -> None:
    assert generation_plan.parse_taus("60") == [60.0]
    with pytest.raises(FieldError) as caught:
        generation_plan.parse_taus("2000")
    assert caught.value.fields == ("tau",)
    assert str(caught.value) == "tau 2000 is outside [0, 1000] (the default is 60)"


def test_load_draft_refuses_a_folder_or_an_empty_path(tmp_path: Path) -> None:
    for bad in (tmp_path, Path("")):
        with pytest.raises(FieldError, match="folder|empty") as caught:
            generation_plan.load_draft(bad)
        assert caught.value.fields == ("draft",)


def test_a_plan_warns_for_another_model_but_not_for_a_relative_path_to_the_trained_one(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = add_subject(cli, tmp_path)
    model = tmp_path / "my-model"
    model.mkdir()
    run = _done_run(store, str(model.resolve()))
    monkeypatch.chdir(tmp_path)
    for given, warned in (("my-model", False), ("tiny", True)):
        request = GenerateRequest("robot", ["on the moon"], seed=1, no_context=True, subject_model=given)
        plan = plan_generation(store, request)
        assert plan.subject_model == given and plan.run.id == run.id
        assert bool(plan.warnings) is warned, plan.warnings


def test_a_plan_settles_items_seeds_and_stage_totals_before_any_model_loads(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stencil_cli import models

    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded while planning")

    monkeypatch.setattr(models, "load_subject_pipeline", no_model)
    monkeypatch.setattr(models, "load_context_pipeline", no_model)
    store = add_subject(cli, tmp_path)
    _done_run(store)
    request = GenerateRequest("robot", ["on the moon"], count=2, seed=5, taus=[20.0, 60.0], steps=4)
    plan = plan_generation(store, request)
    assert [(item.seed, item.stem) for item in plan.items] == [(5, "s5"), (6, "s6")]
    assert plan.items[0].prompt == "a toy robot on the moon" and plan.mode == "context"
    assert plan.expected == 4
    assert plan.stage_totals()["denoise"] == 2 * 2 * 4 and plan.stage_totals()["draft"] == 2 * 50
    with pytest.raises(FieldError) as caught:
        plan_generation(store, GenerateRequest("robot", ["x"], seed=generation_plan.MAX_SEED, count=2))
    assert caught.value.fields == ("seed",)


# -- writing as it goes -------------------------------------------------------------------------------------


def test_a_failing_row_insert_leaves_no_copy_and_clean_removes_the_store_file(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = add_subject(cli, tmp_path)
    _done_run(store)
    out = tmp_path / "out"
    request = GenerateRequest("robot", ["a toy robot"], count=2, seed=0, output=out)
    plan = plan_generation(store, request)
    writer = generate_verb._Writer(store, plan)
    first, second = plan.items
    saved = writer.save_image(first, 60.0, Image.new("RGB", (8, 8)), {}, {})
    kept = plan.folder / "s0-tau60.png"
    assert saved.generation.image_file == kept and saved.output_file is not None

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    monkeypatch.setattr(store, "add_generation", refuse)
    with pytest.raises(OverflowError):
        writer.save_image(second, 60.0, Image.new("RGB", (8, 8)), {}, {})
    path = plan.folder / "s1-tau60.png"
    assert path.is_file() and not writer.copy_path(path).exists()
    monkeypatch.undo()
    grid, draft = plan.folder / "grid.png", plan.folder / "draft-s1.png"
    Image.new("RGB", (8, 8)).save(grid)
    Image.new("RGB", (8, 8)).save(draft)
    for file in (kept, path, grid, draft):
        _age(file)
    recent = plan.folder / "s2-tau60.png"
    Image.new("RGB", (8, 8)).save(recent)
    removed = store.clean()
    assert sorted(p.name for p in removed) == ["draft-s1.png", "s1-tau60.png"]
    assert kept.is_file() and grid.is_file() and recent.is_file()
