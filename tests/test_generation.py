"""Context Guidance (stencil_cli.core.generation) and `stencil gen` on the tiny preset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from stencil_cli.base import locks
from stencil_cli.base.errors import BadInputError
from stencil_cli.base.images import center_crop_resize
from stencil_cli.base.pngmeta import read_png_parameters
from stencil_cli.core import generation
from stencil_cli.core.generation import GenerationSettings, injected_steps
from stencil_cli.core.inversion import NullTextSettings, encode_prompt
from stencil_cli.core.prompts import build_prompts
from stencil_cli.store.db import open_store
from stencil_cli.verbs.generate import SavedDraft, SavedImage, collect, generate
from stencil_cli.verbs.generation_plan import GenerateRequest, parse_taus, plan_generation
from stencil_cli.verbs.sheets import Layout

DESCRIPTION = "a shiny red toy robot with round eyes"
FAST = ["--steps", "4", "--inner-steps", "2", "--draft-steps", "2", "--subject-model", "tiny"]
FAST += ["--context-model", "tiny", "--device", "cpu", "--precision", "fp32"]


# -- prompt rules -------------------------------------------------------------------------------------------


def test_a_prompt_without_the_phrase_gets_a_phrase_prefix() -> None:
    prompts = build_prompts("in a Superman outfit", "cat", "a grey tabby cat with white paws")
    assert prompts.prompt == "a cat in a Superman outfit"
    assert prompts.draft_prompt == "a grey tabby cat with white paws in a Superman outfit"
    assert build_prompts("on a shelf", "orange cat").prompt == "an orange cat on a shelf"
    assert (
        build_prompts("on a shelf", "toy robot", "small tin robot").draft_prompt
        == "a small tin robot on a shelf"
    )


def test_a_prompt_naming_the_phrase_is_kept_and_the_draft_swaps_in_the_description() -> None:
    prompts = build_prompts("a photo of a toy robot on the moon", "toy robot", DESCRIPTION)
    assert prompts.prompt == "a photo of a toy robot on the moon"
    assert prompts.draft_prompt == f"a photo of {DESCRIPTION} on the moon"
    # case-insensitive, word-bounded: "cats" and "scatter" are not the phrase "cat"
    assert build_prompts("A Cat sleeping", "cat", "a tabby").draft_prompt == "a tabby sleeping"
    assert build_prompts("scatter cats", "cat").prompt == "a cat scatter cats"


@pytest.mark.parametrize("placeholder", ["{}", "{subject}"])
def test_placeholders_become_the_phrase_and_the_description(placeholder: str) -> None:
    prompts = build_prompts(f"a {placeholder} in the jungle, next to another {placeholder}", "dog", "a corgi")
    assert prompts.prompt == "a dog in the jungle, next to another dog"
    assert prompts.draft_prompt == "a corgi in the jungle, next to another corgi"
    bare = build_prompts(f"{placeholder} wearing a hat", "dog", "fluffy white dog")
    assert bare.prompt == "dog wearing a hat"
    assert bare.draft_prompt == "fluffy white dog wearing a hat"


def test_without_a_description_the_draft_prompt_uses_the_phrase_and_empty_prompts_are_refused() -> None:
    assert build_prompts("on a beach", "cat").draft_prompt == "a cat on a beach"
    with pytest.raises(ValueError, match="empty"):
        build_prompts("   ", "cat")


# -- tau ----------------------------------------------------------------------------------------------------


def test_tau_60_injects_the_first_three_of_fifty_steps() -> None:
    assert injected_steps(60, 50) == 3
    assert injected_steps(0, 50) == 0
    assert injected_steps(20, 50) == 1
    assert injected_steps(21, 50) == 2
    assert injected_steps(1000, 50) == 50
    assert injected_steps(1000, 10) == 10
    # steps that do not divide 1000: DDIM's integer stride (1000 // 7 = 142), as the scheduler steps
    assert injected_steps(142, 7) == 1
    assert injected_steps(142.5, 7) == 2
    with pytest.raises(ValueError):
        injected_steps(1001, 50)


def test_parse_taus_accepts_lists_and_refuses_out_of_range() -> None:
    assert parse_taus("20, 60,200,60") == [20.0, 60.0, 200.0]
    for bad in ("-1", "1000.5", "abc", ",", "nan"):
        with pytest.raises(BadInputError):
            parse_taus(bad)


# -- the library on the tiny preset --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guided(tiny_subject_pipe: Any, tiny_context_pipe: Any) -> dict[str, Any]:
    """A draft, its inversion with settings that make NTI visible on random weights (computed once)."""
    pipe = tiny_subject_pipe
    (draft,) = generation.render_drafts(
        tiny_context_pipe, "a red toy robot", resolution=64, seeds=[0], steps=2
    )
    settings = GenerationSettings(steps=6, null_text=NullTextSettings(lr=2e-1, inner_steps=10))
    return {
        "draft": draft,
        "settings": settings,
        "result": generation.invert_images(pipe, [draft], "a toy", settings)[0],
    }


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def _denoised_latent(pipe: Any, guided: dict[str, Any], inject: int) -> torch.Tensor:
    settings = guided["settings"]
    result = guided["result"]
    return generation.denoise(
        pipe.unet,
        generation.ddim_scheduler(pipe, settings.steps),
        result.latent,
        encode_prompt(pipe, "a toy"),
        encode_prompt(pipe, ""),
        guidance=settings.guidance,
        null_embeddings=result.null_embeddings,
        inject=inject,
    )


def _denoised_image(pipe: Any, guided: dict[str, Any], inject: int) -> Image.Image:
    return generation.decode_latent(pipe, _denoised_latent(pipe, guided, inject))


def test_tau_covering_every_step_reproduces_the_reconstruction(
    tiny_subject_pipe: Any, guided: dict[str, Any]
) -> None:
    pipe = tiny_subject_pipe
    steps = guided["settings"].steps
    ((image,),) = generation.guided_images(pipe, [guided["result"]], "a toy", [1000], guided["settings"])
    assert np.array_equal(_pixels(image), _pixels(_denoised_image(pipe, guided, inject=steps)))
    # ... and that reconstruction lands near the draft's latent, much nearer than plain CFG does
    clean = guided["result"].trajectory[0]
    nti_error = (_denoised_latent(pipe, guided, steps) - clean).pow(2).mean()
    cfg_error = (_denoised_latent(pipe, guided, 0) - clean).pow(2).mean()
    assert cfg_error > 3 * nti_error


def test_tau_zero_is_plain_cfg_from_the_inverted_latent(
    tiny_subject_pipe: Any, guided: dict[str, Any]
) -> None:
    pipe = tiny_subject_pipe
    ((zero, sixty),) = generation.guided_images(
        pipe, [guided["result"]], "a toy", [0, 60], guided["settings"]
    )
    assert np.array_equal(_pixels(zero), _pixels(_denoised_image(pipe, guided, inject=0)))
    # tau 60 with 6 steps (stride 166.7) injects only the first step
    assert np.array_equal(_pixels(sixty), _pixels(_denoised_image(pipe, guided, inject=1)))
    assert not np.array_equal(_pixels(zero), _pixels(sixty))


def test_plain_generation_is_deterministic_per_seed(tiny_subject_pipe: Any) -> None:
    settings = GenerationSettings(steps=3)
    first = generation.plain_generate(tiny_subject_pipe, "a toy", 5, settings)
    again = generation.plain_generate(tiny_subject_pipe, "a toy", 5, settings)
    other = generation.plain_generate(tiny_subject_pipe, "a toy", 6, settings)
    assert np.array_equal(_pixels(first), _pixels(again))
    assert not np.array_equal(_pixels(first), _pixels(other))
    assert first.size == (64, 64)


def test_encode_image_centre_crops_to_the_subject_resolution(tiny_subject_pipe: Any) -> None:
    wide = Image.new("RGB", (300, 200), (200, 30, 30))
    latent = generation.encode_image(tiny_subject_pipe, wide, 64)
    assert latent.shape == (1, 4, 8, 8) and latent.dtype == torch.float32


# -- the command -------------------------------------------------------------------------------------------


def _photo(path: Path, colour: tuple[int, int, int]) -> Path:
    image = Image.new("RGB", (256, 256), colour)
    for x in range(80, 176):
        for y in range(60, 200, 3):
            image.putpixel((x, y), (255 - colour[0], 200, 40))
    image.save(path)
    return path


@pytest.fixture
def trained(cli: Any, tiny_preset: Path, tmp_path: Path, tiny_subject_pipe: Any) -> str:
    """A subject `robot` with two photos, a description and a done run whose weights are the tiny decoder."""
    from stencil_cli.core.training import trainable_names
    from stencil_cli.core.weights import save_trained_weights, trained_state

    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(photos / "one.png", (30, 60, 200))
    _photo(photos / "two.png", (30, 160, 90))
    result = cli("add", "robot", str(photos), "--phrase", "toy robot")
    assert result.exit_code == 0, result.output
    store = open_store()
    store.update_subject("robot", description=DESCRIPTION)
    run = store.create_run("robot", {"subject_model": "tiny", "resolution": 64}, base_model="tiny")
    unet = tiny_subject_pipe.unet
    names = trainable_names(unet, "decoder")
    weights = store.run_dir("robot", run.id) / "weights.safetensors"
    save_trained_weights(weights, trained_state(unet, names, torch.float32), {"base_model": "tiny"})
    store.finish_run(run.id, "done", weights_file=weights, duration_s=0.1)
    store.close()
    return "robot"


def _lines(stdout: str) -> list[dict[str, Any]]:
    """The records `gen --json` prints: one JSON object per line (JSON Lines)."""
    return [json.loads(line) for line in stdout.splitlines()]


def _gen(cli: Any, *args: str) -> Any:
    return cli("gen", *args, *FAST)


def test_gen_writes_images_drafts_rows_and_png_parameters(cli: Any, trained: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _gen(cli, trained, "on the moon", "--seed", "7", "--tau", "20,60", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    records = _lines(result.stdout)
    assert [(r["seed"], r["tau"]) for r in records] == [(7, 20.0), (7, 60.0)]
    for record in records:
        image_file = Path(record["image_file"])
        assert image_file.is_file() and Path(record["output_file"]).is_file()
        assert Path(record["draft_file"]).is_file() and Path(record["draft_file"]).parent == image_file.parent
        params = read_png_parameters(image_file)
        assert params["prompt"] == "a toy robot on the moon"
        assert params["draft_prompt"] == f"{DESCRIPTION} on the moon"
        assert params["seed"] == 7 and params["tau"] == record["tau"]
        assert params["steps"] == 4 and params["guidance"] == 7.5 and params["inner_steps"] == 2
        assert params["subject_model"] == "tiny" and params["context_model"] == "tiny"
        assert params["run_id"] == record["run_id"] and params["mode"] == "context"
        assert read_png_parameters(Path(record["output_file"])) == params
        with Image.open(image_file) as image:
            assert image.size == (64, 64)
            assert image.text["stencil:prompt"] == "a toy robot on the moon"  # one chunk per key as well
            assert "prompt" not in image.text and "workflow" not in image.text  # ComfyUI's JSON chunks
    # one draft shared by both taus
    assert records[0]["draft_file"] == records[1]["draft_file"]
    rows = open_store().list_generations(trained)
    assert [row.id for row in rows] == [r["id"] for r in records]
    # tau 20 and 60 at 4 steps (stride 250) both inject the first step: null-text optimises only that one
    assert rows[0].params["inner_iterations"] == [2] and rows[0].params["null_text_steps"] == 1
    assert all(read_png_parameters(Path(r["image_file"]))["injected_steps"] == 1 for r in records)
    assert "tau 20 and 60 inject the same 1 step at 4 steps" in " ".join(result.stderr.split())
    prefix = f"robot-{records[0]['params']['batch']}-"
    copied = sorted(p.name.removeprefix(prefix) for p in out.iterdir())
    assert copied == ["draft-s7.png", "s7-tau20.png", "s7-tau60.png"]


def test_an_interruption_keeps_the_finished_images_drafts_and_rows(
    cli: Any, trained: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C at the third seed of three: seeds 1-2 have their PNGs, rows and copies; nothing half-written."""
    real_guided = generation.guided_images
    calls: list[int] = []

    def interrupt_at_third_seed(*args: Any, **kwargs: Any) -> list[list[Image.Image]]:
        calls.append(1)
        if len(calls) == 3:  # one denoise call per batch of one seed (both taus): the third seed's
            raise KeyboardInterrupt
        return real_guided(*args, **kwargs)

    monkeypatch.setattr(generation, "guided_images", interrupt_at_third_seed)
    out = tmp_path / "out"
    args = ["-n", "3", "--seed", "5", "--tau", "20,60", "--batch-size", "1", "-o", str(out)]
    result = _gen(cli, trained, "on the moon", *args)
    assert result.exit_code == 130, result.output
    assert "stopped after 4 of 6 image(s)" in " ".join(result.stderr.split())
    rows = open_store().list_generations(trained)
    assert [(row.seed, row.tau) for row in rows] == [(5, 20.0), (5, 60.0), (6, 20.0), (6, 60.0)]
    folder = rows[0].image_file.parent
    for row in rows:
        params = read_png_parameters(row.image_file)  # whole PNGs carrying their parameters
        assert params["seed"] == row.seed and params["tau"] == row.tau
        assert row.draft_file.is_file() and Path(row.params["output_file"]).is_file()
    made = sorted(path.name for path in folder.iterdir())
    assert made == [
        "draft-s5.png",
        "draft-s6.png",
        "draft-s7.png",
        "s5-tau20.png",
        "s5-tau60.png",
        "s6-tau20.png",
        "s6-tau60.png",
    ]  # every draft was rendered before the subject model loaded; no temp files, no image of seed 7
    assert len(list(out.iterdir())) == 7 and not list(out.glob(".*"))


def test_same_seed_same_images_and_seeds_count_up(cli: Any, trained: str) -> None:
    first = _lines(_gen(cli, trained, "in a garden", "--seed", "3", "-n", "2", "--json").stdout)
    again = _lines(_gen(cli, trained, "in a garden", "--seed", "3", "-n", "2", "--json").stdout)
    alone = _lines(_gen(cli, trained, "in a garden", "--seed", "3", "--batch-size", "1", "--json").stdout)
    assert [r["seed"] for r in first] == [3, 4] and alone[0]["seed"] == 3
    pixels = [_pixels(Image.open(r["image_file"])) for r in (*first, *again, *alone)]
    assert np.array_equal(pixels[0], pixels[2]) and np.array_equal(pixels[1], pixels[3])  # the same command
    assert not np.array_equal(pixels[0], pixels[1])
    # seed 3 made in a batch of two and on its own: the same image up to float rounding in the batched calls
    assert np.abs(pixels[0] - pixels[4]).max() <= 8 and np.abs(pixels[0] - pixels[4]).mean() <= 1.5


def test_draft_option_uses_the_given_image_and_no_context_model(
    cli: Any, trained: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stencil_cli import models

    def no_context(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the context model must not load with --draft")

    monkeypatch.setattr(models, "load_context_pipeline", no_context)
    photo = _photo(tmp_path / "me.png", (220, 220, 20))
    result = _gen(cli, trained, "older, with grey hair", "--draft", str(photo), "--tau", "1000", "--json")
    assert result.exit_code == 0, result.output
    (record,) = _lines(result.stdout)
    kept = Image.open(record["draft_file"]).convert("RGB")
    expected = center_crop_resize(Image.open(photo).convert("RGB"), 64)
    assert np.array_equal(_pixels(kept), _pixels(expected))  # the draft beside is the given photo
    params = read_png_parameters(Path(record["image_file"]))
    assert params["mode"] == "edit" and params["draft_source"] == str(photo.resolve())
    # the result follows the draft: another photo, another image (nothing else changed)
    other = _photo(tmp_path / "other.png", (20, 90, 240))
    second = _lines(
        _gen(cli, trained, "older, with grey hair", "--draft", str(other), "--tau", "1000", "--json").stdout
    )
    first_pixels = _pixels(Image.open(record["image_file"]).convert("RGB"))
    assert not np.array_equal(first_pixels, _pixels(Image.open(second[0]["image_file"]).convert("RGB")))


def test_no_context_and_npi_and_grid_and_show_prompts(cli: Any, trained: str, tmp_path: Path) -> None:
    plain = _gen(cli, trained, "{} on a boat", "--no-context", "--seed", "1", "--json")
    assert plain.exit_code == 0, plain.output
    (record,) = _lines(plain.stdout)
    assert record["tau"] is None and record["draft_file"] is None and record["params"]["mode"] == "plain"
    assert record["prompt"] == "toy robot on a boat"
    npi = _gen(cli, trained, "on a boat", "--inversion", "npi", "--grid", "--show-prompts", "--tau", "0,60")
    assert npi.exit_code == 0, npi.output
    assert "draft prompt: " + DESCRIPTION + " on a boat" in npi.stderr
    paths = npi.stdout.split()
    assert len(paths) == 2 and all(Path(p).is_file() for p in paths)
    grid = Path(paths[0]).parent / "grid.png"
    with Image.open(grid) as sheet:
        layout = Layout(128)  # small images are shown at 128 px
        assert sheet.width == 3 * 128 + 2 * layout.font_px + 2 * layout.pad  # draft, tau 0, tau 60
    assert read_png_parameters(Path(paths[0]))["inversion"] == "npi"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["ghost", "on a beach"], 1, "no subject called 'ghost'"),
        (["robot", "   "], 2, "the prompt is empty"),
        (["robot", "x", "--tau", "1001"], 2, "outside [0, 1000]"),
        (["robot", "x", "--tau", "-5"], 2, "outside [0, 1000]"),
        (["robot", "x", "--inversion", "magic"], 2, "nti or npi"),
        (["robot", "x", "--draft", "missing.png"], 2, "no such file"),
    ],
)
def test_refusals(cli: Any, trained: str, args: list[str], code: int, message: str) -> None:
    result = cli("gen", *args)
    assert result.exit_code == code, result.output
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.output


def test_a_draft_that_is_not_an_image_is_refused(cli: Any, trained: str, tmp_path: Path) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    result = cli("gen", "robot", "x", "--draft", str(fake))
    assert result.exit_code == 2
    assert "is not an image" in result.stderr


def test_an_untrained_subject_is_refused_with_the_train_command(cli: Any, tmp_path: Path) -> None:
    _photo(tmp_path / "a.png", (10, 10, 10))
    assert cli("add", "plant", str(tmp_path / "a.png"), "--phrase", "plant").exit_code == 0
    result = cli("gen", "plant", "on a table")
    assert result.exit_code == 1
    assert "not trained yet" in result.stderr and "stencil train plant" in result.stderr


def test_a_run_that_is_not_done_and_draft_with_no_context_are_refused(
    cli: Any, trained: str, tmp_path: Path
) -> None:
    store = open_store()
    failed = store.create_run(trained, {"subject_model": "tiny", "resolution": 64}, base_model="tiny")
    store.finish_run(failed.id, "failed", error="boom")
    result = cli("gen", trained, "x", "--run", str(failed.id))
    assert result.exit_code == 1 and "is failed, not done" in result.stderr
    photo = _photo(tmp_path / "p.png", (1, 2, 3))
    result = cli("gen", trained, "x", "--draft", str(photo), "--no-context")
    assert result.exit_code == 2 and "do not go together" in result.stderr


def test_gen_refuses_seeds_that_do_not_fit_a_stored_row(cli: Any) -> None:
    too_big = cli("gen", "robot", "on the moon", "--seed", str(2**63))
    assert too_big.exit_code == 2 and "Traceback" not in too_big.output
    last_two = cli("gen", "robot", "on the moon", "--seed", str(2**63 - 1), "-n", "2")
    assert last_two.exit_code == 2, last_two.output
    assert "--seed must be in [0, 9223372036854775806] for 2 image(s)" in " ".join(last_two.output.split())


def test_a_draft_prompt_given_by_hand_is_what_the_context_model_draws(cli: Any, trained: str) -> None:
    result = _gen(
        cli, trained, "on the moon", "--seed", "3", "--draft-prompt", "a red robot on the moon", "--json"
    )
    assert result.exit_code == 0, result.output
    (record,) = _lines(result.stdout)
    assert read_png_parameters(Path(record["draft_file"]))["draft_prompt"] == "a red robot on the moon"
    assert read_png_parameters(Path(record["image_file"]))["prompt"] == "a toy robot on the moon"
    refused = _gen(cli, trained, "on the moon", "--draft-prompt", "x", "--no-context")
    assert refused.exit_code == 2 and "--draft-prompt is only used" in refused.stderr


def test_batched_seeds_make_the_images_one_at_a_time_makes(cli: Any, trained: str) -> None:
    batched = _gen(cli, trained, "on the moon", "--seed", "5", "-n", "2", "--batch-size", "2", "--json")
    single = _gen(cli, trained, "on the moon", "--seed", "5", "-n", "2", "--batch-size", "1", "--json")
    assert batched.exit_code == 0 and single.exit_code == 0, batched.output + single.output
    pairs = zip(_lines(batched.stdout), _lines(single.stdout), strict=True)
    for together, alone in pairs:
        assert together["params"]["batch_size"] == 2 and alone["params"]["batch_size"] == 1
        difference = np.abs(
            _pixels(Image.open(together["image_file"])) - _pixels(Image.open(alone["image_file"]))
        )
        assert difference.max() <= 8 and difference.mean() <= 1.5  # 0-255 levels: float rounding only
    refused = _gen(cli, trained, "on the moon", "--batch-size", "0")
    assert refused.exit_code == 2 and "--batch-size must be in [1, 256]" in refused.stderr


def _fast_request(name: str, **fields: Any) -> GenerateRequest:
    tiny = {"subject_model": "tiny", "context_model": "tiny", "device": "cpu", "precision": "fp32"}
    return GenerateRequest(name, ["on the moon"], steps=4, inner_steps=2, draft_steps=2, **tiny, **fields)


def test_generate_yields_each_draft_image_and_the_grid_once_it_is_written(
    trained: str, tmp_path: Path
) -> None:
    store = open_store()
    out = tmp_path / "out"
    request = _fast_request(trained, count=2, seed=3, taus=[20.0, 60.0], grid=True, output=out)
    plan = plan_generation(store, request)
    seen: list[tuple[str, str]] = []
    yielded = []
    for saved in generate(store, plan):
        if isinstance(saved, SavedImage):
            assert saved.generation.image_file is not None and saved.generation.image_file.is_file()
            assert saved.output_file is not None and saved.output_file.is_file()  # and its copy
            rows = {row.id for row in open_store().list_generations(trained)}
            assert saved.generation.id in rows  # its row is stored before the caller sees it
            seen.append(("image", saved.generation.image_file.name))
        else:
            assert saved.path.is_file()
            seen.append(("draft" if isinstance(saved, SavedDraft) else "grid", saved.path.name))
        yielded.append(saved)
    grid = f"{trained}-{plan.folder.name}-grid.png"  # the copy under -o
    assert seen == [
        ("draft", "draft-s3.png"),
        ("draft", "draft-s4.png"),
        *[("image", f"s{seed}-tau{tau}.png") for seed in (3, 4) for tau in (20, 60)],
        ("grid", grid),
    ]
    result = collect(plan, yielded)
    assert len(result.images) == 4 and set(result.drafts) == {"s3", "s4"}
    assert result.grid_file == out / grid


def test_a_closed_generation_stops_and_lets_go_of_the_subject(trained: str) -> None:
    store = open_store()
    plan = plan_generation(store, _fast_request(trained, count=2, seed=0))
    saving = generate(store, plan)
    first = next(saving)
    assert isinstance(first, SavedDraft) and locks.is_in_use(store.root, trained)
    saving.close()  # as `stencil gen` does when the caller stops (Ctrl-C between two images)
    assert not locks.is_in_use(store.root, trained)
    assert open_store().list_generations(trained) == []


def test_each_image_records_the_dtypes_its_models_ran_in(
    cli: Any, trained: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stencil_cli.models import devices

    result = cli("gen", trained, "on the moon", "--seed", "1", "--json", *FAST)  # FAST pins fp32
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[0])["params"]["dtypes"] == {
        "draft": "float32",
        "subject": "float32",
    }
    monkeypatch.setattr(devices, "cpu_computes_bf16", lambda: True)
    monkeypatch.setattr(devices, "BF16_MIN_WIDTH", 32)  # the tiny context model counts as wide enough
    auto = [arg for arg in FAST if arg not in ("--precision", "fp32")]
    result = cli("gen", trained, "on the moon", "--seed", "1", "--json", "--precision", "auto", *auto)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.splitlines()[0])
    assert record["params"]["dtypes"] == {"draft": "bfloat16", "subject": "float32"}
