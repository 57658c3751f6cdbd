"""The store (stencil_cli.store): migrations that keep the data, typed records, generation rows that
belong to the subject they were made for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils
from photos import add_subject

from stencil_cli.base.errors import NotFoundError, StencilError
from stencil_cli.store import migrations
from stencil_cli.store.db import Store, open_store
from stencil_cli.store.layout import DB_NAME
from stencil_cli.store.records import Generation, Run


def _columns(db: sqlite_utils.Database, table: str) -> set[str]:
    return {column.name for column in db[table].columns}


# -- migrations -------------------------------------------------------------------------------------------


def test_a_database_at_the_first_schema_is_migrated_and_keeps_its_data(tmp_path: Path) -> None:
    root = tmp_path / "old-store"
    root.mkdir()
    db = sqlite_utils.Database(root / DB_NAME)
    migrations.apply(db, stop_before="m003_one_name_per_file_column")
    assert "path" in _columns(db, "images") and "weights_path" in _columns(db, "runs")
    db["subjects"].insert({"id": 1, "name": "cat", "phrase": "cat", "created": "2025-01-01T00:00:00+00:00"})
    db["images"].insert(
        {
            "id": 1, "subject_id": 1, "sha256": "ab" * 32, "path": "subjects/cat/images/abab.jpg",
            "width": 512, "height": 512, "caption": "a cat", "added": "2025-01-01T00:00:00+00:00",
        }
    )  # fmt: skip
    db["runs"].insert(
        {
            "id": 1, "subject_id": 1, "status": "done", "params": '{"steps": 5}', "losses": "[0.5, 0.25]",
            "step": 5, "started": "2025-01-01T00:00:00+00:00",
            "weights_path": "subjects/cat/runs/1/weights.safetensors",
        }
    )  # fmt: skip
    db["generations"].insert(
        {
            "id": 1, "subject_id": 1, "run_id": 1, "prompt": "a cat on the moon", "seed": 7, "tau": 60.0,
            "params": '{"mode": "context"}', "image_path": "subjects/cat/generations/b/s7-tau60.png",
            "draft_path": "subjects/cat/generations/b/draft-s7.png", "created": "2025-01-01T00:00:00+00:00",
        }
    )  # fmt: skip
    db.close()

    store = open_store(root)
    assert {"file"} <= _columns(store.db, "images") and "path" not in _columns(store.db, "images")
    assert "weights_file" in _columns(store.db, "runs") and "weights_path" not in _columns(store.db, "runs")
    assert {"image_file", "draft_file"} <= _columns(store.db, "generations")
    subject = store.get_subject("cat")
    assert subject.images[0]["file"] == str(root / "subjects/cat/images/abab.jpg")
    assert subject.images[0]["caption"] == "a cat"
    run = store.get_run("cat", 1)
    assert run.weights_file == root / "subjects/cat/runs/1/weights.safetensors"
    assert run.params == {"steps": 5} and run.losses == [0.5, 0.25] and run.status == "done"
    (generation,) = store.list_generations("cat")
    assert generation.image_file == root / "subjects/cat/generations/b/s7-tau60.png"
    assert generation.draft_file == root / "subjects/cat/generations/b/draft-s7.png"
    assert generation.seed == 7 and generation.params == {"mode": "context"}
    store.close()
    again = open_store(root)  # every migration ran once: opening again changes nothing
    assert again.get_run("cat", 1).weights_file == run.weights_file
    names = [m.name for m in migrations.applied(again.db)]
    assert names == [
        "m001_initial",
        "m002_subject_id_counter",
        "m003_one_name_per_file_column",
        "m004_draft_prompt_cache",
        "m005_run_id_counter",
        "m006_run_error_fields",
    ]
    assert "draft_prompts" in again.db.table_names()


def test_a_new_store_is_at_the_latest_schema(stencil_home: Path) -> None:
    store = open_store()
    assert migrations.pending(store.db) == []
    assert "file" in _columns(store.db, "images") and "weights_file" in _columns(store.db, "runs")


# -- typed records ----------------------------------------------------------------------------------------


def test_runs_are_typed_records_with_absolute_weights_files(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path, name="cat", phrase="cat")
    run = store.create_run("cat", {"steps": 3, "subject_model": "tiny"}, base_model="tiny")
    assert isinstance(run, Run) and run.status == "running" and run.step == 0 and run.losses == []
    assert run.weights_file is None and store.latest_done_run("cat") is None
    weights = store.run_dir("cat", run.id) / "weights.safetensors"
    store.finish_run(run.id, "done", weights_file=weights, losses=[0.3, 0.2, 0.1], step=3, duration_s=1.5)
    done = store.get_run("cat", run.id)
    assert done.status == "done" and done.step == 3 and done.final_loss == pytest.approx(0.1)
    assert done.weights_file == weights and done.duration_s == 1.5 and done.params["steps"] == 3
    stored = store.db.execute("select weights_file from runs where id = ?", [run.id]).fetchone()[0]
    assert stored == f"subjects/cat/runs/{run.id}/weights.safetensors"  # relative in the database
    assert store.latest_done_run("cat") == done and store.list_runs("cat") == [done]
    data = json.loads(json.dumps(done.to_dict()))
    assert data["weights_file"] == str(weights) and data["id"] == run.id
    with pytest.raises(NotFoundError, match="has no run 999"):
        store.get_run("cat", 999)
    with pytest.raises(ValueError, match="bad run status"):
        store.finish_run(run.id, "running")


def test_generations_are_typed_records_with_absolute_files(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path, name="cat", phrase="cat")
    subject = store.get_subject("cat")
    image = store.generation_dir("cat") / "batch" / "s1.png"
    draft = store.generation_dir("cat") / "batch" / "draft-s1.png"
    generation = store.add_generation(
        subject,
        {"prompt": "a cat", "seed": 1, "tau": 60.0, "params": {"mode": "context"}, "image_file": image,
         "draft_file": draft},
    )  # fmt: skip
    assert isinstance(generation, Generation)
    assert generation.image_file == image and generation.draft_file == draft
    assert generation.params == {"mode": "context"} and generation.scores is None
    assert generation.subject_id == subject.id
    stored = store.db.execute("select image_file from generations where id = ?", [generation.id]).fetchone()
    assert stored[0] == "subjects/cat/generations/batch/s1.png"
    store.set_generation_scores(generation.id, {"dino": 0.5})
    assert store.get_generation(generation.id).scores == {"dino": 0.5}
    assert [g.id for g in store.list_generations("cat")] == [generation.id]
    data = json.loads(json.dumps(store.get_generation(generation.id).to_dict()))
    assert data["image_file"] == str(image) and data["draft_file"] == str(draft)
    with pytest.raises(NotFoundError):
        store.get_generation(generation.id + 100)


def test_add_generation_refuses_a_subject_removed_meanwhile(cli: Any, tmp_path: Path) -> None:
    store: Store = add_subject(cli, tmp_path, name="cat", phrase="cat")
    subject = store.get_subject("cat")
    store.remove_subject("cat")
    record = {"prompt": "a cat", "seed": 1, "image_file": store.generation_dir("cat") / "s1.png"}
    with pytest.raises(StencilError, match="subject 'cat' was removed while this command ran"):
        store.add_generation(subject, record)


def test_add_generation_refuses_a_subject_removed_and_made_again_under_its_name(
    cli: Any, tmp_path: Path
) -> None:
    store: Store = add_subject(cli, tmp_path, name="cat", phrase="cat")
    subject = store.get_subject("cat")
    store.remove_subject("cat")
    record = {"prompt": "a cat", "seed": 1, "image_file": store.generation_dir("cat") / "s1.png"}
    again = add_subject(cli, tmp_path / "again", name="cat", phrase="cat")  # the same name, another subject
    assert again.get_subject("cat").id != subject.id
    with pytest.raises(StencilError, match="was removed"):
        again.add_generation(subject, record)
    assert again.list_generations("cat") == []


def test_a_removed_runs_id_is_never_given_again(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path, name="cat", phrase="cat")
    first = store.create_run("cat", {"steps": 3}, base_model="tiny")
    newest = store.create_run("cat", {"steps": 3}, base_model="tiny")
    store.finish_run(newest.id, "failed", error="boom")
    assert cli("rm", "cat", "--run", str(newest.id), "--yes").exit_code == 0
    again = store.create_run("cat", {"steps": 3}, base_model="tiny")
    assert again.id == newest.id + 1 and first.id < newest.id
    assert cli("rm", "cat", "--yes").exit_code == 0  # the whole subject, its runs with it
    add_subject(cli, tmp_path / "again", name="cat", phrase="cat")
    assert store.create_run("cat", {"steps": 3}, base_model="tiny").id == again.id + 1
