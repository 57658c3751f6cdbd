"""Draft (context) model presets: SD3.5 Medium / Large Turbo and FLUX.1-schnell, their tiny stand-ins, the
draft settings they bring, `--no-t5` where it applies, pulling them, and the draft prompt window."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from stencil_cli import models
from stencil_cli.core import generation
from stencil_cli.core.prompt_window import draft_prompt_window
from stencil_cli.core.prompts import build_prompts
from stencil_cli.store.db import open_store
from stencil_cli.verbs.generation_plan import GenerateRequest, plan_generation

DRAFT_PRESETS = ("sd35-medium", "sd35-large-turbo", "flux-schnell")
FAST = ("--steps", "2", "--inner-steps", "1", "--device", "cpu", "--precision", "fp32")


def _photos(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, colour in enumerate(((30, 60, 200), (30, 160, 90))):
        image = Image.new("RGB", (256, 256), colour)
        for x in range(80, 176):
            for y in range(60, 200, 3):
                image.putpixel((x, y), (255 - colour[0], 200, 40))
        image.save(folder / f"{i}.png")
    return folder


@pytest.fixture
def trained(cli: Any, tiny_preset: Path, tiny_draft_presets: Path, tmp_path: Path) -> str:
    """`robot`: added, captioned with the template captioner and trained (2 steps) on tiny, via the CLI."""
    assert cli("add", "robot", _photos(tmp_path / "photos"), "--phrase", "toy robot").exit_code == 0
    assert cli("caption", "robot", "--captioner", "template").exit_code == 0
    result = cli("train", "robot", "--subject-model", "tiny", "--steps", "2", "--batch-size", "2", "--json")
    assert result.exit_code == 0, result.output
    return "robot"


def _records(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


# -- the presets ------------------------------------------------------------------------------------------


def test_models_ls_shows_the_draft_presets_with_licence_gating_steps_guidance_and_t5(cli: Any) -> None:
    result = cli("models", "ls", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    expected = {  # model cards (docs/models.md)
        "sd3-medium": ("stabilityai/stable-diffusion-3-medium-diffusers", True, 50, 7.5, "optional"),
        "sd35-medium": ("stabilityai/stable-diffusion-3.5-medium", True, 40, 4.5, "optional"),
        "sd35-large-turbo": ("stabilityai/stable-diffusion-3.5-large-turbo", True, 4, 0.0, "optional"),
        "flux-schnell": ("black-forest-labs/FLUX.1-schnell", False, 4, 0.0, "required"),
        "tiny-sd35": ("built locally", False, 40, 4.5, "optional"),
        "tiny-flux": ("built locally", False, 4, 0.0, "required"),
    }
    for name, (source, gated, steps, guidance, t5) in expected.items():
        row = rows[name]
        assert (row["role"], row["source"], row["gated"]) == ("context", source, gated), name
        assert (row["draft_steps"], row["draft_guidance"], row["t5"]) == (steps, guidance, t5), name
    assert rows["flux-schnell"]["licence"] == "Apache-2.0"
    assert rows["sd35-large-turbo"]["licence"] == "Stability AI Community License"
    assert rows["sd15"]["draft_steps"] is None  # a subject model draws no drafts
    text = cli("models", "ls")
    assert text.exit_code == 0
    for name in (*DRAFT_PRESETS, "tiny-flux", "tiny-sd35"):
        assert name in text.stdout


def test_a_draft_preset_brings_its_steps_and_guidance_and_flags_win(
    cli: Any, tiny_preset: Path, tiny_draft_presets: Path, tmp_path: Path
) -> None:
    assert cli("add", "robot", _photos(tmp_path / "photos"), "--phrase", "toy robot").exit_code == 0
    store = open_store()
    run = store.create_run("robot", {"subject_model": "tiny", "resolution": 64}, base_model="tiny")
    weights = store.run_dir("robot", run.id) / "weights.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    from stencil_cli.core.weights import save_trained_weights

    save_trained_weights(weights, {"x": torch.zeros(1)}, {"base_model": "tiny"})
    store.finish_run(run.id, "done", weights_file=weights, duration_s=0.1)

    def settled(**request: Any) -> tuple[int, float, int | None]:
        request = GenerateRequest(name="robot", prompts=["on the moon"], seed=1, **request)
        s = plan_generation(store, request).settings
        return s.draft_steps, s.draft_guidance, s.draft_max_sequence_length

    assert settled() == (50, 7.5, None)  # the default draft model, sd3-medium: the paper's settings
    assert settled(context_model="sd3-medium") == (50, 7.5, None)
    assert settled(context_model="tiny") == (50, 7.5, None)
    assert settled(context_model="sd35-medium") == (40, 4.5, None)
    assert settled(context_model="sd35-large-turbo") == (4, 0.0, None)
    assert settled(context_model="flux-schnell") == (4, 0.0, 256)
    assert settled(context_model="black-forest-labs/FLUX.1-schnell") == (4, 0.0, 256)  # its Hub id too
    assert settled(context_model="acme/some-draft-model") == (50, 7.5, None)
    assert settled(context_model="flux-schnell", draft_steps=8, draft_guidance=1.5) == (8, 1.5, 256)
    assert settled(context_model="flux-schnell", draft_guidance=0.0) == (4, 0.0, 256)


def test_bad_draft_guidance_is_one_line_naming_the_flag(cli: Any, trained: str) -> None:
    for value in ("-1", "nan", "inf"):
        result = cli("gen", trained, "on the moon", "--context-model", "tiny-flux", "--draft-guidance", value)
        assert result.exit_code == 2, result.output
        assert "--draft-guidance must be 0 or more" in result.output
        assert "Traceback" not in result.output
    assert not list(open_store().generation_dir(trained).glob("*/*.png"))  # nothing half-written


def test_no_t5_is_refused_for_flux_presets_and_flux_folders(
    cli: Any, trained: str, tmp_path: Path, tiny_drafts_dir: Path
) -> None:
    for ref in ("flux-schnell", "tiny-flux"):
        result = cli("gen", trained, "on the moon", "--context-model", ref, "--no-t5", *FAST)
        assert result.exit_code == 2, result.output
        assert "--no-t5 does not apply to" in result.output and "T5" in result.output
        assert len(result.output.strip().splitlines()) <= 2  # one line (and its hint, if any)
    # a FLUX pipeline folder that no preset names: refused when its index is read, before any draft
    folder = tmp_path / "my-flux"
    shutil.copytree(tiny_drafts_dir / "tiny-flux" / "context", folder)
    result = cli("gen", trained, "on the moon", "--context-model", folder, "--no-t5", *FAST)
    assert result.exit_code == 2, result.output
    assert "--no-t5 does not apply to" in result.output
    assert not list(open_store().generation_dir(trained).glob("*/*.png"))
    result = cli("models", "check", "tiny-flux", "--no-t5")
    assert result.exit_code == 2 and "--no-t5 does not apply" in result.output


def test_no_t5_still_drops_t5_of_an_sd35_draft(tiny_draft_presets: Path) -> None:
    with_t5 = models.load_context_pipeline("tiny-sd35", device="cpu", precision="fp32")
    without = models.load_context_pipeline("tiny-sd35", device="cpu", precision="fp32", no_t5=True)
    assert with_t5.text_encoder_3 is not None and without.text_encoder_3 is None


# -- the tiny draft presets -------------------------------------------------------------------------------


def test_tiny_draft_presets_have_the_shapes_of_the_models_they_stand_for(tiny_draft_presets: Path) -> None:
    flux = models.load_context_pipeline("tiny-flux", device="cpu", precision="fp32")
    assert type(flux).__name__ == "FluxPipeline"
    assert type(flux.transformer).__name__ == "FluxTransformer2DModel"
    assert flux.transformer.config.guidance_embeds is False  # schnell: no guidance input
    assert flux.vae.config.latent_channels == 16
    assert type(flux.text_encoder).__name__ == "CLIPTextModel"
    assert type(flux.text_encoder_2).__name__ == "T5EncoderModel"
    sd35 = models.load_context_pipeline("tiny-sd35", device="cpu", precision="fp32")
    assert type(sd35).__name__ == "StableDiffusion3Pipeline"
    assert sd35.transformer.config.qk_norm == "rms_norm"
    assert list(sd35.transformer.config.dual_attention_layers) == [0]
    assert type(sd35.text_encoder_3).__name__ == "T5EncoderModel"


def test_tiny_draft_presets_are_deterministic(tmp_path: Path) -> None:
    first = models.build_tiny_flux_pipeline().transformer.state_dict()
    again = models.build_tiny_flux_pipeline().transformer.state_dict()
    assert all(torch.equal(first[key], again[key]) for key in first)


def test_render_drafts_passes_the_presets_t5_window_to_pipelines_that_take_it(
    tiny_draft_presets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = models.load_context_pipeline("tiny-flux", device="cpu", precision="fp32")
    seen: list[dict[str, Any]] = []
    call = type(pipe).__call__

    @functools.wraps(call)  # keeps the pipeline's signature: render_drafts reads it
    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    generation.render_drafts(pipe, "a red robot", resolution=64, seeds=[0], steps=1, max_sequence_length=256)
    generation.render_drafts(pipe, "a red robot", resolution=64, seeds=[0], steps=1)
    assert seen[0]["max_sequence_length"] == 256
    assert "max_sequence_length" not in seen[1]


# -- the draft prompt window ------------------------------------------------------------------------------


def test_the_prompt_window_follows_the_draft_pipelines_tokenizers(
    tiny_context_pipe: Any, tiny_draft_presets: Path
) -> None:
    sd3 = draft_prompt_window(tiny_context_pipe)  # SD3 without T5: the CLIP window, as before
    assert sd3 is not None and (sd3.limit, sd3.tokenizer) == (77, "tokenizer")
    sd35 = models.load_context_pipeline("tiny-sd35", device="cpu", precision="fp32")
    window = draft_prompt_window(sd35)  # CLIP's sequences sit beside T5's: still 77
    assert window is not None and (window.limit, window.tokenizer) == (77, "tokenizer")
    flux = models.load_context_pipeline("tiny-flux", device="cpu", precision="fp32")
    assert flux.tokenizer.model_max_length == 77 and flux.tokenizer_2.model_max_length == 512
    window = draft_prompt_window(flux)  # T5 alone gives the sequence: FluxPipeline's default 512
    assert window is not None and (window.limit, window.tokenizer) == (512, "tokenizer_2")
    window = draft_prompt_window(flux, max_sequence_length=256)  # flux-schnell's card
    assert window is not None and window.limit == 256
    assert window.count_tokens("abc") == len(flux.tokenizer_2("abc")["input_ids"])


LONG_DESCRIPTION = (
    "a small shiny red tin toy robot with round glass eyes, silver riveted arms, a striped blue chest "
    "panel, yellow rubber feet and a tiny antenna"
)


@pytest.mark.parametrize(("draft_model", "kept"), [("tiny", False), ("tiny-flux", True)])
def test_a_long_description_is_shortened_for_clip_drafts_and_kept_for_flux(
    cli: Any, trained: str, draft_model: str, kept: bool
) -> None:
    store = open_store()
    store.update_subject(trained, description=LONG_DESCRIPTION)
    store.close()
    result = cli(
        "gen", trained, "on the moon", "--context-model", draft_model, "--draft-steps", "1", "--seed", "3",
        "--subject-model", "tiny", *FAST, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (record,) = _records(result.stdout)
    draft_prompt = record["draft_prompt"]
    unlimited = build_prompts("on the moon", "toy robot", LONG_DESCRIPTION).draft_prompt  # no token limit
    assert len(unlimited) > 77 and draft_prompt.endswith("on the moon")
    assert (draft_prompt == unlimited) is kept
    assert ("shortened to the draft model's 77 tokens" in result.output) is not kept


# -- through the CLI --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("draft_model", "draft_steps", "guidance", "pipeline"),
    [("tiny-flux", 4, 0.0, "FluxPipeline"), ("tiny-sd35", 2, 4.5, "StableDiffusion3Pipeline")],
)
def test_add_caption_train_gen_export_eval_with_a_tiny_draft_preset(
    cli: Any, trained: str, tmp_path: Path, draft_model: str, draft_steps: int, guidance: float, pipeline: str
) -> None:
    steps = () if draft_model == "tiny-flux" else ("--draft-steps", str(draft_steps))  # flux: its preset's 4
    result = cli(
        "gen", trained, "on the moon", "--context-model", draft_model, *steps, "--seed", "5",
        "--subject-model", "tiny", *FAST, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (record,) = _records(result.stdout)
    params = record["params"]
    assert (params["context_model"], params["draft_steps"], params["draft_guidance"]) == (
        draft_model,
        draft_steps,
        guidance,
    )
    image = Image.open(record["image_file"])
    assert image.size == (64, 64)
    assert image.text["context_model"] == draft_model and image.text["draft_steps"] == str(draft_steps)
    draft = Image.open(record["draft_file"])
    assert draft.size == (64, 64)
    assert draft.text["draft_guidance"] == str(guidance)
    loaded = cli("models", "check", draft_model, "--json")
    assert json.loads(loaded.stdout)["pipeline"] == pipeline

    exported = cli("export", trained, "--format", "kohya", "-o", tmp_path / "robot.safetensors")
    assert exported.exit_code == 0, exported.output
    scored = cli("eval", trained, "--eval-models", "tiny", "--json")
    assert scored.exit_code == 0, scored.output
    scores = json.loads(scored.stdout)["generations"][0]["scores"]
    assert all(-1.0 <= scores[key] <= 1.0 for key in ("dino", "clip_i", "clip_t"))


# -- pulling ----------------------------------------------------------------------------------------------

FLUX_EXTRAS = ["README.md", "LICENSE.md", "ae.safetensors", "flux1-schnell.safetensors", "schnell_grid.jpeg"]
SD35_EXTRAS = [
    "README.md",
    "LICENSE.md",
    "sd3.5_medium.safetensors",
    "text_encoders/README.md",
    "text_encoders/clip_g.safetensors",
    "text_encoders/clip_l.safetensors",
    "text_encoders/t5xxl_fp16.safetensors",
    "text_encoders/t5xxl_fp8_e4m3fn.safetensors",
]


def _listing(folder: Path) -> list[str]:
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != "VERSION"]
    return sorted(str(p.relative_to(folder)) for p in files)


def test_models_pull_fetches_the_draft_presets_diffusers_files_only_and_they_load_offline(
    cli: Any, tiny_drafts_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests import fakehub

    flux, sd35 = tiny_drafts_dir / "tiny-flux" / "context", tiny_drafts_dir / "tiny-sd35" / "context"
    hub = fakehub.install(
        monkeypatch,
        tmp_path / "hf-cache",
        {
            "black-forest-labs/FLUX.1-schnell": fakehub.FakeRepo(
                {"main": _listing(flux) + FLUX_EXTRAS}, source=flux
            ),
            "stabilityai/stable-diffusion-3.5-medium": fakehub.FakeRepo(
                {"main": _listing(sd35) + SD35_EXTRAS}, source=sd35
            ),
        },
    )
    result = cli("models", "pull", "sd35-medium")  # gated, no token: refused before any download
    assert result.exit_code == 1 and "gated" in result.output and not hub.downloads
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    result = cli("models", "pull", "flux-schnell", "sd35-medium", "--json")
    assert result.exit_code == 0, result.output
    kept = {d["repo_id"]: d["files"] for d in hub.downloads}
    assert kept["black-forest-labs/FLUX.1-schnell"] == _listing(flux)
    assert kept["stabilityai/stable-diffusion-3.5-medium"] == _listing(sd35)  # no text_encoders/ copies

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = {row["name"]: row for row in json.loads(cli("models", "ls", "--json").stdout)}
    assert rows["flux-schnell"]["present"] and rows["sd35-medium"]["present"]
    checked = cli("models", "check", "flux-schnell", "--json")
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.stdout)["pipeline"] == "FluxPipeline"
    checked = cli("models", "check", "sd35-medium", "--no-t5", "--json")
    assert checked.exit_code == 0, checked.output
    assert "text_encoder_3" not in json.loads(checked.stdout)["components"]


def test_models_pull_builds_the_tiny_draft_presets(cli: Any, stencil_home: Path) -> None:
    result = cli("models", "pull", "tiny-flux", "tiny-sd35", "--json")
    assert result.exit_code == 0, result.output
    for row in json.loads(result.stdout):
        assert row["layout"] == "tiny"
        assert Path(row["path"]) == stencil_home / "models" / row["ref"]
        assert (Path(row["path"]) / "context" / "model_index.json").is_file()


def test_the_draft_presets_full_size_configs_have_their_published_sizes(monkeypatch: Any) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import draft_memory
    import fullsize

    sizes = {preset: draft_memory.component_sizes(preset) for preset in draft_memory.DRAFT_PRESETS}
    published = {"sd35-medium": 2.5e9, "sd35-large-turbo": 8.1e9, "flux-schnell": 11.9e9}  # model cards
    for preset, count in published.items():
        assert abs(sizes[preset]["transformer"] - count) / count < 0.015, preset
    assert sizes["flux-schnell"]["text_encoder_2"] == sizes["sd3-medium"]["text_encoder_3"]  # T5-XXL
    medium = fullsize.build_full_size_component("sd35-medium", "transformer", device="meta")
    assert medium.config.qk_norm == "rms_norm"
    assert list(medium.config.dual_attention_layers) == list(range(13))  # MMDiT-X
    assert draft_memory.t5_component("flux-schnell") == "text_encoder_2"
    assert "needs T5" in draft_memory.table()


def test_bench_takes_the_draft_presets_steps_and_refuses_no_t5_for_flux_up_front(tmp_path: Path) -> None:
    from stencil_cli.base.errors import BadInputError
    from stencil_cli.verbs.bench import BenchConfig

    def config(**settings: Any) -> BenchConfig:
        return BenchConfig(dataset=tmp_path, out=tmp_path / "out", subjects=["dog"], **settings)

    assert config().draft_steps == 50  # sd3-medium: the paper's, and the fingerprint of earlier runs
    assert config(context_model="flux-schnell").draft_steps == 4
    assert config(context_model="flux-schnell", draft_steps=9).draft_steps == 9
    with pytest.raises(BadInputError, match="no_t5 does not apply to flux-schnell"):
        config(context_model="flux-schnell", no_t5=True, captioner="template").validate()


def test_models_pull_no_t5_leaves_out_sd35s_t5_and_is_refused_for_flux(
    cli: Any, tiny_drafts_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests import fakehub

    sd35 = tiny_drafts_dir / "tiny-sd35" / "context"
    repo = fakehub.FakeRepo({"main": _listing(sd35) + SD35_EXTRAS}, source=sd35)
    repos = {"stabilityai/stable-diffusion-3.5-medium": repo}
    hub = fakehub.install(monkeypatch, tmp_path / "hf-cache", repos)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    refused = cli("models", "pull", "flux-schnell", "--no-t5")
    assert refused.exit_code == 2 and "--no-t5 does not apply to flux-schnell" in refused.output
    result = cli("models", "pull", "sd35-medium", "--no-t5", "--json")
    assert result.exit_code == 0, result.output
    (download,) = hub.downloads
    t5_files = [name for name in download["files"] if name.startswith(("text_encoder_3/", "tokenizer_3/"))]
    assert download["files"] and not t5_files
    assert "text_encoder_2/config.json" in download["files"]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checked = cli("models", "check", "sd35-medium", "--no-t5", "--json")
    assert checked.exit_code == 0, checked.output
    assert "text_encoder_3" not in json.loads(checked.stdout)["components"]
    with_t5 = cli("models", "check", "sd35-medium")  # T5 was never downloaded: one clear line
    assert with_t5.exit_code == 1, with_t5.output
    assert "downloaded without its T5 encoder" in with_t5.output and "--no-t5" in with_t5.output
    assert "stencil models pull sd35-medium" in with_t5.output and "Traceback" not in with_t5.output
