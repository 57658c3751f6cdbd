"""`stencil demo` (stencil_cli.verbs.demo): add, caption, train and gen through the verbs (tiny preset)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stencil_cli.base.errors import StencilError
from stencil_cli.base.events import Event, Heading
from stencil_cli.base.pngmeta import read_png_parameters
from stencil_cli.store.db import open_store
from stencil_cli.verbs import demo as demo_verb
from stencil_cli.verbs.demo import DemoRequest, run_demo

# -- the command on the tiny preset ----------------------------------------------------------------------


def test_demo_runs_the_whole_flow_offline_and_prints_where_the_images_and_the_page_are(
    cli: Any, tiny_preset: Path
) -> None:
    result = cli("demo", "--train-steps", "2", "--steps", "4")
    assert result.exit_code == 0, result.output
    paths = [Path(line) for line in result.stdout.split()]
    assert len(paths) == 2 and all(path.is_file() for path in paths)  # tau 60 and tau 1000
    assert (paths[0].parent / "grid.png").is_file()
    assert "images in" in " ".join(result.stderr.split())
    store = open_store()
    subject = store.get_subject("demo")
    assert len(subject.images) == 4 and all("toy robot" in image["caption"] for image in subject.images)
    run = store.latest_done_run("demo")
    assert run is not None and run.step == 2 and run.weights_file is not None and run.weights_file.is_file()
    rows = store.list_generations("demo")
    assert {row.tau for row in rows} == {60.0, 1000.0}
    assert all(row.run_id == run.id and row.draft_prompt for row in rows)
    assert read_png_parameters(paths[0])["subject"] == "demo"
    page = store.subject_dir("demo") / "view.html"  # it ends with the page, and says where it is
    assert page.is_file() and str(page) in "".join(result.stderr.split())
    assert all(path.name in page.read_text() for path in paths)


def test_demo_never_overwrites_a_subject_and_refuses_a_missing_folder(cli: Any, tmp_path: Path) -> None:
    from stencil_cli.verbs.demo import free_name, robot_photo

    assert free_name("demo", ["demo", "demo-2", "other"]) == "demo-3"
    assert free_name("demo", []) == "demo"
    assert robot_photo(0).size == (512, 512)
    assert robot_photo(0).tobytes() != robot_photo(1).tobytes()
    result = cli("demo", str(tmp_path / "nope"))
    assert result.exit_code == 2 and "not a folder" in result.stderr
    assert cli("demo", "--steps", "2000").exit_code == 2  # refused before it trains, not after


def test_a_failed_demo_step_removes_the_half_made_subject(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise StencilError("training broke")

    monkeypatch.setattr(demo_verb, "train", fail)
    result = cli("demo", "--name", "robo")
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "training broke" in text and "removed the half-made demo subject robo" in text
    store = open_store()
    assert store.subject_names() == [] and not store.subject_dir("robo").exists()


# -- the verb calls the verbs ---------------------------------------------------------------------------


def test_the_demo_adds_captions_trains_and_generates_through_the_verbs(
    stencil_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Photo intake and captioning run for real (template, offline); training and generation are recorded."""
    from stencil_cli.verbs.train import TrainResult

    calls: list[tuple[str, Any]] = []
    real_add, real_caption = demo_verb.add_photos, demo_verb.caption

    def add(store: Any, request: Any) -> Any:
        calls.append(("add", request))
        return real_add(store, request)

    def caption(store: Any, request: Any, **kwargs: Any) -> Any:
        calls.append(("caption", request))
        return real_caption(store, request, **kwargs)

    def train(store: Any, request: Any, **kwargs: Any) -> TrainResult:
        calls.append(("train", request))
        return TrainResult(request.name, None, [])

    def plan(store: Any, request: Any) -> Any:
        calls.append(("plan", request))
        return "the plan"

    def generate(store: Any, plan: Any, **kwargs: Any) -> Any:
        calls.append(("generate", plan))
        return iter(())  # saves nothing

    for name, fake in (("add_photos", add), ("caption", caption), ("train", train)):
        monkeypatch.setattr(demo_verb, name, fake)
    monkeypatch.setattr(demo_verb, "plan_generation", plan)
    monkeypatch.setattr(demo_verb, "generate", generate)
    store = open_store()
    steps: list[str] = []

    def progress(event: Event) -> None:
        if isinstance(event, Heading):
            steps.append(event.title.split(":")[0].split(" ")[0])

    result = run_demo(store, DemoRequest(train_steps=3, steps=4), progress=progress)
    assert [name for name, _ in calls] == ["add", "caption", "train", "plan", "generate"]
    assert steps == ["add", "caption", "train", "gen"]
    requests = dict(calls)
    assert requests["add"].name == "demo" and requests["add"].phrase == "toy robot"
    assert requests["caption"].captioner == "template"
    assert requests["train"].steps == 3 and requests["train"].subject_model == "tiny"
    assert requests["plan"].prompts == ["on a beach at sunset"] and requests["plan"].taus == [60.0, 1000.0]
    assert requests["plan"].steps == 4 and requests["plan"].context_model == "tiny"
    assert requests["generate"] == "the plan" and result.subject == "demo"
    assert result.generated.plan == "the plan" and result.generated.images == []
    subject = store.get_subject("demo")
    assert len(subject.images) == 4 and all("toy robot" in image["caption"] for image in subject.images)
    assert subject.description == demo_verb.DEMO_DESCRIPTION
    again = run_demo(store, DemoRequest(train_steps=1, steps=1))
    assert again.subject == "demo-2"  # never overwrites a subject
