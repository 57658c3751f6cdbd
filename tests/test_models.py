"""Models: the tiny preset, loading from presets / folders / the HF cache, clear errors, devices, commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stencil_cli import models
from stencil_cli.base.errors import BadInputError, StencilError


def _generate(pipe, seed: int, steps: int = 3) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe("a photo of a cat", num_inference_steps=steps, generator=generator, output_type="np")
    return out.images[0]


def _fake_hub_cache(tmp_path: Path, source: Path, repo_id: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Lay out `source` as a cached snapshot of `repo_id` in a fresh HF cache (HF_HUB_CACHE)."""
    cache = tmp_path / "hf-cache"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return repo / "snapshots" / commit


# -- the tiny preset ------------------------------------------------------------------------------------


def test_tiny_subject_is_sd15_shaped(tiny_subject_pipe) -> None:
    unet = tiny_subject_pipe.unet
    assert type(tiny_subject_pipe).__name__ == "StableDiffusionPipeline"
    assert "CrossAttnDownBlock2D" in unet.config.down_block_types
    assert "CrossAttnUpBlock2D" in unet.config.up_block_types
    assert any(name.endswith("attn2.processor") and "up_blocks" in name for name in unet.attn_processors)
    assert unet.config.sample_size == 8
    assert tiny_subject_pipe.vae_scale_factor == 8
    assert tiny_subject_pipe.safety_checker is None
    scheduler = tiny_subject_pipe.scheduler
    assert type(scheduler).__name__ == "DDIMScheduler"
    for key, value in models.SD15_DDIM_SETTINGS.items():
        assert scheduler.config[key] == value
    scheduler.set_timesteps(50)
    assert scheduler.timesteps[:3].tolist() == [980, 960, 940]
    assert tiny_subject_pipe.tokenizer.model_max_length == 77
    assert tiny_subject_pipe.device.type == "cpu" and tiny_subject_pipe.dtype == torch.float32


def test_tiny_round_trips_through_save_pretrained(tiny_models_dir: Path) -> None:
    subject = tiny_models_dir / "subject"
    assert (subject / "model_index.json").is_file()
    assert list(subject.glob("unet/*.safetensors")) and not list(subject.rglob("*.bin"))
    loaded = models.load_subject_pipeline(str(subject), device="cpu", precision="fp32")  # fresh, not shared
    rebuilt = models.build_tiny_subject_pipeline()  # same fixed seed -> same weights as the saved ones
    for part in ("unet", "vae", "text_encoder"):
        saved = getattr(loaded, part).state_dict()
        for name, tensor in getattr(rebuilt, part).state_dict().items():
            assert torch.equal(tensor, saved[name]), f"{part}.{name}"
    assert rebuilt.tokenizer("a cat").input_ids == loaded.tokenizer("a cat").input_ids


def test_tiny_generation_is_deterministic(tiny_subject_pipe) -> None:
    first = _generate(tiny_subject_pipe, seed=1)
    again = _generate(tiny_subject_pipe, seed=1)
    other = _generate(tiny_subject_pipe, seed=2)
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_tiny_context_is_sd3_shaped_and_drafts(tiny_context_pipe) -> None:
    assert type(tiny_context_pipe).__name__ == "StableDiffusion3Pipeline"
    assert type(tiny_context_pipe.transformer).__name__ == "SD3Transformer2DModel"
    assert type(tiny_context_pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert tiny_context_pipe.text_encoder_3 is None
    assert type(tiny_context_pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    first = _generate(tiny_context_pipe, seed=3, steps=2)
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, _generate(tiny_context_pipe, seed=3, steps=2))
    assert not np.array_equal(first, _generate(tiny_context_pipe, seed=4, steps=2))


def test_tiny_preset_and_local_folder_load_through_the_same_function(
    tiny_preset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import StableDiffusionPipeline

    calls: list[tuple[str, dict]] = []
    original = StableDiffusionPipeline.from_pretrained.__func__

    def spy(cls, location, **kwargs):
        calls.append((str(location), kwargs))
        return original(cls, location, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(spy))
    by_preset = models.load_subject_pipeline("tiny", device="cpu")
    by_folder = models.load_subject_pipeline(str(tiny_preset / "subject"), device="cpu")
    assert len(calls) == 2
    assert all(kwargs["use_safetensors"] is True for _, kwargs in calls)
    assert Path(calls[0][0]).resolve() == Path(calls[1][0]).resolve()
    a, b = by_preset.unet.state_dict(), by_folder.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_is_built_on_first_use(stencil_home: Path) -> None:
    folder = models.ensure_tiny()
    assert folder == stencil_home / "models" / "tiny"
    assert models.tiny_ready(folder)
    assert (folder / "context" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    mtime = (folder / "VERSION").stat().st_mtime_ns
    assert models.ensure_tiny() == folder and (folder / "VERSION").stat().st_mtime_ns == mtime  # not rebuilt


# -- sources and clear errors ---------------------------------------------------------------------------


def test_cached_hub_model_loads_offline(tiny_models_dir: Path, tmp_path: Path, monkeypatch) -> None:
    _fake_hub_cache(tmp_path, tiny_models_dir / "subject", "acme/tiny-sd", monkeypatch)
    pipe = models.load_subject_pipeline("acme/tiny-sd", device="cpu")
    assert pipe.unet.config.sample_size == 8
    assert models.model_status("acme/tiny-sd")["present"] is True


def test_uncached_hub_id_offline_names_models_pull(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = cli("models", "check", "acme/not-downloaded")
    assert result.exit_code == 1
    assert "stencil models pull acme/not-downloaded" in result.output
    assert "Traceback" not in result.output
    with pytest.raises(StencilError, match="stencil models pull sd15"):
        models.load_subject_pipeline("sd15", device="cpu")


def test_folder_that_is_not_a_model_is_a_clear_error(cli, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"not really")
    result = cli("models", "check", str(folder))
    assert result.exit_code == 1
    assert "not a diffusers model folder" in result.output and "Traceback" not in result.output
    assert cli("models", "check", str(tmp_path / "missing")).exit_code == 2


def test_typo_and_bad_refs(cli) -> None:
    result = cli("models", "check", "sd1.5")
    assert result.exit_code == 2 and "did you mean 'sd15'" in result.output
    with pytest.raises(BadInputError):
        models.resolve_ref("")
    assert models.resolve_ref("sd3-medium").repo_id == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert models.resolve_ref("owner/name").kind == "hub"


def test_gated_model_without_token_says_how_to_log_in(cli, monkeypatch) -> None:
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    result = cli("models", "pull", "sd3-medium")
    assert result.exit_code == 1
    assert "gated" in result.output and "hf auth login" in result.output and "HF_TOKEN" in result.output


def test_hub_errors_are_translated(monkeypatch, cli) -> None:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    def make(cls):
        error = cls.__new__(cls)
        Exception.__init__(error, "401 Client Error")
        return error

    gated = models.hub_error(make(GatedRepoError), models.resolve_ref("sd3-medium"))
    assert gated is not None and "hf auth login" in str(gated)
    missing = models.hub_error(make(RepositoryNotFoundError), models.resolve_ref("acme/typo"))
    assert missing is not None and "no model acme/typo on the Hugging Face Hub" in str(missing)

    def not_found(*args, **kwargs):
        raise make(RepositoryNotFoundError)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.snapshot_download", not_found)
    monkeypatch.setattr("huggingface_hub.HfApi.list_repo_files", not_found)  # pull lists the repo first
    result = cli("models", "pull", "acme/typo")
    assert result.exit_code == 1 and "check the spelling" in result.output


def test_pull_offline_is_refused_and_tiny_is_built(cli, stencil_home: Path) -> None:
    result = cli("models", "pull", "sd15")
    assert result.exit_code == 1 and "HF_HUB_OFFLINE" in result.output
    result = cli("models", "pull", "tiny")
    assert result.exit_code == 0
    assert models.tiny_ready(stencil_home / "models" / "tiny")


# -- pulling eval (transformers) models -----------------------------------------------------------------


def test_pull_dino_clip_take_safetensors_from_the_conversion_pr(cli, tmp_path: Path, monkeypatch) -> None:
    from tests import fakehub

    hub = fakehub.install(monkeypatch, tmp_path / "hf-cache", fakehub.eval_repos())
    rows = {row["name"]: row for row in json.loads(cli("models", "ls", "--json").stdout)}
    assert rows["dino"]["role"] == "eval" and rows["dino"]["source"] == "facebook/dino-vits16"
    assert rows["clip"]["source"] == "openai/clip-vit-base-patch32"
    assert rows["dino"]["present"] is False and rows["clip"]["present"] is False

    result = cli("models", "pull", "dino", "clip", "--json")
    assert result.exit_code == 0, result.output
    pulled = {row["ref"]: row for row in json.loads(result.stdout)}
    # DINO: PR 1 (community) and PR 2 (the conversion bot's) both have safetensors: the bot's wins.
    assert pulled["dino"]["revision"] == "refs/pr/2" and pulled["dino"]["layout"] == "transformers"
    # CLIP: PR 3 has no safetensors, PR 5 does (no bot PR listed).
    assert pulled["clip"]["revision"] == "refs/pr/5"
    assert [(d["repo_id"], d["revision"]) for d in hub.downloads] == [
        ("facebook/dino-vits16", "refs/pr/2"),
        ("openai/clip-vit-base-patch32", "refs/pr/5"),
    ]
    # configs, processor/tokenizer files and safetensors only: no pickles, no subfolders, no fp16 variant
    assert hub.downloads[0]["files"] == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert hub.downloads[1]["files"] == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert all(d["allow"] == models.TRANSFORMERS_ALLOW_PATTERNS for d in hub.downloads)
    cache = tmp_path / "hf-cache"
    assert (cache / "models--facebook--dino-vits16" / "refs" / "refs" / "pr" / "2").is_file()
    assert Path(pulled["dino"]["path"], "model.safetensors").is_file()
    rows = {row["name"]: row for row in json.loads(cli("models", "ls", "--json").stdout)}
    assert rows["dino"]["present"] is True and rows["clip"]["present"] is True
    assert rows["dino"]["path"] == pulled["dino"]["path"]
    text = cli("models", "pull", "dino")
    assert text.exit_code == 0 and "safetensors from revision refs/pr/2" in text.output

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = cli("models", "pull", "clip")
    assert offline.exit_code == 1 and "HF_HUB_OFFLINE" in offline.output


def test_pull_transformers_ids_revisions_and_refusals(cli, tmp_path: Path, monkeypatch) -> None:
    from tests import fakehub

    pickles = ["config.json", "pytorch_model.bin"]
    hub = fakehub.install(
        monkeypatch,
        tmp_path / "hf-cache",
        {
            "acme/vit": fakehub.FakeRepo({"main": ["config.json", "model.safetensors", "pytorch_model.bin"]}),
            "acme/pickles": fakehub.FakeRepo({"main": pickles, "refs/pr/1": pickles + ["README.md"]}),
            "acme/pinned": fakehub.FakeRepo({"main": pickles, "refs/pr/4": pickles + ["model.safetensors"]}),
            "acme/tiny-sd": fakehub.FakeRepo(
                {
                    "main": [
                        "model_index.json",
                        "unet/config.json",
                        "unet/diffusion_pytorch_model.safetensors",
                        "unet/diffusion_pytorch_model.bin",
                    ]
                }
            ),
        },
    )
    # main has safetensors: no PR lookup, main is downloaded
    result = cli("models", "pull", "acme/vit", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["revision"] is None
    assert hub.downloads[-1]["files"] == ["config.json", "model.safetensors"]
    # an explicit revision is used as given
    result = cli("models", "pull", "acme/pinned@refs/pr/4", "--json")
    assert result.exit_code == 0, result.output
    assert (hub.downloads[-1]["repo_id"], hub.downloads[-1]["revision"]) == ("acme/pinned", "refs/pr/4")
    # ... and refused when it has no safetensors
    result = cli("models", "pull", "acme/pickles@refs/pr/1")
    assert result.exit_code == 1
    assert "no safetensors weights" in result.output and "refs/pr/1" in result.output
    # no revision has safetensors: one clear line, nothing downloaded
    before = len(hub.downloads)
    result = cli("models", "pull", "acme/pickles")
    assert result.exit_code == 1
    assert "no safetensors weights on main or on any pull request" in result.output
    assert "Traceback" not in result.output and len(hub.downloads) == before
    # a diffusers repo still gets the diffusers patterns
    result = cli("models", "pull", "acme/tiny-sd", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["layout"] == "diffusers"
    assert hub.downloads[-1]["files"] == ["model_index.json", "unet/config.json",
                                          "unet/diffusion_pytorch_model.safetensors"]  # fmt: skip
    assert cli("models", "pull", "acme/@x").exit_code == 2


def test_eval_presets_are_not_diffusion_models(cli) -> None:
    with pytest.raises(BadInputError, match="evaluation model"):
        models.resolve_ref("dino")
    assert models.resolve_ref("clip", models.EVAL).repo_id == "openai/clip-vit-base-patch32"
    assert models.PRESETS["dino"].repo_id == models.DEFAULT_DINO
    assert models.PRESETS["clip"].repo_id == models.DEFAULT_CLIP
    result = cli("config", "set", "subject_model", "dino")
    assert result.exit_code == 2 and "evaluation model" in result.output


# -- devices and precision ------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(cli, tiny_preset: Path) -> None:
    result = cli("models", "check", "tiny", "--device", "cuda")
    assert result.exit_code == 1
    assert "CUDA is not available" in result.output and "Traceback" not in result.output
    with pytest.raises(StencilError, match="CUDA is not available"):
        models.resolve_device("cuda:0")


def test_resolve_device_and_dtype() -> None:
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(BadInputError):
        models.resolve_device("gpu")
    cpu = torch.device("cpu")
    assert models.resolve_dtype("auto", cpu) == torch.float32
    assert models.resolve_dtype("fp32", cpu) == torch.float32
    assert models.resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(BadInputError):
        models.resolve_dtype("fp16", cpu)
    with pytest.raises(BadInputError):
        models.resolve_dtype("fp8", cpu)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_runs_the_context_model_in_bf16_only_on_a_cpu_with_native_bf16(
    monkeypatch: pytest.MonkeyPatch, tiny_preset: Path, native_bf16: bool
) -> None:
    from stencil_cli.models import devices

    monkeypatch.setattr(devices, "cpu_computes_bf16", lambda: native_bf16)
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if native_bf16 else torch.float32
    assert models.context_dtype("auto", cpu) == expected  # width unknown: a real-size model
    assert models.context_dtype("auto", cpu, width=1536) == expected  # SD3 Medium
    assert models.context_dtype("auto", cpu, width=32) == torch.float32  # too narrow to gain from bf16
    assert models.context_dtype("fp32", cpu, width=1536) == torch.float32  # an explicit choice is honoured
    assert models.context_dtype("bf16", cpu, width=32) == torch.bfloat16
    assert models.subject_dtype("auto", cpu) == torch.float32  # the trained model never goes bf16 by itself
    assert models.resolve_dtype("auto", cpu) == torch.float32  # training's autocast: unchanged
    subject = models.load_subject_pipeline("tiny", device="cpu", precision="auto")
    assert {p.dtype for p in subject.unet.parameters()} == {torch.float32}


def test_the_context_models_width_is_read_from_its_config_before_loading(
    monkeypatch: pytest.MonkeyPatch, tiny_preset: Path
) -> None:
    from stencil_cli.models import devices

    monkeypatch.setattr(devices, "cpu_computes_bf16", lambda: True)
    tiny = models.load_context_pipeline("tiny", device="cpu", precision="auto")  # 4 heads x 8 = 32 wide
    assert {p.dtype for p in tiny.transformer.parameters()} == {torch.float32}
    assert models.transformer_width(tiny.transformer.config) == 32
    assert models.transformer_width({"block_out_channels": [32, 64]}) is None  # a UNet has no such width
    monkeypatch.setattr(devices, "BF16_MIN_WIDTH", 32)  # were 32 wide enough, tiny would load in bf16
    tiny = models.load_context_pipeline("tiny", device="cpu", precision="auto")
    assert {p.dtype for p in tiny.transformer.parameters()} == {torch.bfloat16}


def test_free_pipeline_drops_components(tiny_models_dir: Path) -> None:
    pipe = models.load_subject_pipeline(str(tiny_models_dir / "subject"), device="cpu")
    models.free_pipeline(pipe)
    assert pipe.unet is None and pipe.vae is None


# -- full-size architectures ----------------------------------------------------------------------------


def test_full_size_configs_have_the_real_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fullsize

    sd15 = fullsize.full_size_parameter_counts("sd15")
    assert sd15["unet"] == 859_520_964
    assert sd15["text_encoder"] == 123_060_480
    sd3 = fullsize.full_size_parameter_counts("sd3-medium")
    assert sd3["transformer"] == 2_028_328_000
    assert sd3["text_encoder_3"] == 4_762_310_656
    unet = fullsize.build_full_size_component("sd15", "unet", device="meta")
    assert unet.config.cross_attention_dim == 768
    assert list(unet.config.block_out_channels) == [320, 640, 1280, 1280]
    sdxl = fullsize.full_size_parameter_counts("sdxl")  # SDXL base 1.0's published sizes
    assert sdxl["unet"] == 2_567_463_684
    assert sdxl["text_encoder"] == 123_060_480 and sdxl["text_encoder_2"] == 694_659_840
    xl_unet = fullsize.build_full_size_component("sdxl", "unet", device="meta")
    assert xl_unet.config.cross_attention_dim == 2048 and xl_unet.config.addition_embed_type == "text_time"
    assert list(xl_unet.config.transformer_layers_per_block) == [1, 2, 10]
    with pytest.raises(BadInputError):
        fullsize.full_size_config("sd2")


def test_configs_ship_as_package_data() -> None:
    import tomllib

    import stencil_cli

    package = Path(stencil_cli.__file__).parent
    shipped = {p.name for p in (package / "models" / "configs").glob("*.json")}
    assert shipped >= {"sd15.json", "sd3-medium.json", "sdxl.json"}
    project = tomllib.loads((package.parent / "pyproject.toml").read_text())
    assert "stencil_cli" in project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]


# -- commands -------------------------------------------------------------------------------------------


def test_models_ls_offline_and_json(cli, tiny_preset: Path, tmp_path: Path, monkeypatch) -> None:
    _fake_hub_cache(tmp_path, tiny_preset / "subject", "acme/tiny-sd", monkeypatch)
    result = cli("models", "ls", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["sd15"]["present"] is False and rows["sd15"]["source"].startswith("stable-diffusion-v1-5/")
    assert rows["sd3-medium"]["gated"] is True
    assert rows["tiny"]["present"] is True and rows["tiny"]["size_bytes"] > 0
    assert rows["acme/tiny-sd"]["present"] is True and rows["acme/tiny-sd"]["preset"] is False
    text = cli("models", "ls")
    assert text.exit_code == 0 and "sd3-medium" in text.stdout and "acme/tiny-sd" in text.stdout


def test_doctor_offline_and_json(cli, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value-123")
    result = cli("doctor", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["openai_api_key_set"] is True
    assert "sk-secret-value-123" not in result.output
    assert report["hf_offline"] is True
    assert report["versions"]["torch"] and report["versions"]["diffusers"]
    assert report["device"]["auto"] in {"cpu", "cuda", "mps"}
    assert {m["ref"] for m in report["models"]} == {"sd15", "sd3-medium"}
    assert all(m["present"] is False for m in report["models"])
    text = cli("doctor")
    assert text.exit_code == 0 and "stencil models pull sd15" in text.stdout
    assert "sk-secret-value-123" not in text.output


def test_config_set_get_ls_and_unknown_keys(cli, monkeypatch) -> None:
    assert cli("config", "get", "subject_model").stdout.strip() == "sd15"
    assert cli("config", "set", "subject_model", "tiny").exit_code == 0
    assert cli("config", "get", "subject_model").stdout.strip() == "tiny"
    assert cli("config", "set", "device", "CPU").exit_code == 0
    rows = {row["key"]: row for row in json.loads(cli("config", "ls", "--json").stdout)}
    assert rows["device"] == {"key": "device", "value": "cpu", "source": "config"}
    assert rows["precision"]["source"] == "default"
    monkeypatch.setenv("STENCIL_SUBJECT_MODEL", "sd15")
    assert cli("config", "get", "subject_model").stdout.strip() == "sd15"  # env beats config
    bad = cli("config", "set", "colour", "blue")
    assert bad.exit_code == 2 and "unknown config key" in bad.output
    assert cli("config", "set", "precision", "fp8").exit_code == 2
    assert cli("config", "set", "device", "gpu").exit_code == 2
    assert cli("config", "unset", "device").exit_code == 0
    assert cli("config", "get", "device").stdout.strip() == "auto"


def test_models_check_loads_tiny_as_both_roles(cli, tiny_preset: Path) -> None:
    result = cli("models", "check", "tiny", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["pipeline"] == "StableDiffusionPipeline" and "unet" in data["components"]
    result = cli("models", "check", "tiny", "--role", "context", "--json")
    assert json.loads(result.stdout)["pipeline"] == "StableDiffusion3Pipeline"


def test_doctor_says_the_openai_key_is_needed_for_the_openai_captioner(
    cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    result = cli("doctor")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "needed for --captioner openai; use --captioner template offline" in text
    assert "fall back to templates" not in text


def test_models_ls_through_a_pipe_keeps_whole_hub_ids(cli, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "60")  # a narrow terminal's setting must not cut a piped table
    text = cli("models", "ls").stdout
    assert "stabilityai/stable-diffusion-3-medium-diffusers" in text and "…" not in text
