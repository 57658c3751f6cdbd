"""SDXL as the subject model through the CLI (tiny-sdxl), and which text the subject model encodes.

The chain: add -> caption --captioner template -> train --subject-model tiny-sdxl -> gen -> export --format
kohya -> eval; the DreamBench runner with an SDXL subject model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from stencil_cli.core.families import SD15Family, SDXLFamily
from tests.photos import make_photo

PROMPT = "on the moon"
SUBJECT_PROMPT = "a toy robot on the moon"
DRAFT_PROMPT = "a shiny chrome robot figure with red eyes standing on the moon"
FAST_GEN = ("--steps", "3", "--inner-steps", "2", "--draft-steps", "2", "--seed", "7")


def _added_and_captioned(cli: Any, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    for i in range(2):
        make_photo(photos / f"{i}.png", (320, 288), seed=i)
    assert cli("add", "robot", photos, "--phrase", "toy robot").exit_code == 0
    captioned = cli("caption", "robot", "--captioner", "template")
    assert captioned.exit_code == 0, captioned.output


def _trained(cli: Any, model: str, *extra: str) -> dict[str, Any]:
    args = ("train", "robot", "--subject-model", model, "--steps", "2", "--batch-size", "2", *extra)
    trained = cli(*args, "--json")
    assert trained.exit_code == 0, trained.output
    return json.loads(trained.stdout)


@pytest.fixture(scope="module")
def tiny_eval_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny eval models, built once for this module."""
    from stencil_cli.models import ensure_tiny_eval

    return ensure_tiny_eval(tmp_path_factory.mktemp("tiny-eval") / "tiny-eval")


@pytest.fixture
def tiny_eval(tiny_eval_build: Path, stencil_home: Path) -> Path:
    """Make `--eval-models tiny` available in this test's store."""
    target = stencil_home / "models" / "tiny-eval"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(tiny_eval_build, target_is_directory=True)
    return target


@pytest.fixture
def spied_text(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every prompt a subject model of either family encodes (for the denoise and the inversion)."""
    seen: list[str] = []
    for family in (SD15Family, SDXLFamily):
        real = family.encode_prompt

        def spy(self: Any, pipe: Any, prompt: str, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            seen.append(prompt)
            return _real(self, pipe, prompt, *args, **kwargs)

        monkeypatch.setattr(family, "encode_prompt", spy)
    return seen


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_the_subject_model_inverts_and_denoises_the_subject_prompt_never_the_draft_prompt(
    cli: Any, tiny_preset: Path, tiny_sdxl_preset: Path, tmp_path: Path, spied_text: list[str], model: str
) -> None:
    _added_and_captioned(cli, tmp_path)
    _trained(cli, model)
    spied_text.clear()
    generated = cli(
        "gen", "robot", PROMPT, "--subject-model", model, "--context-model", "tiny",
        "--draft-prompt", DRAFT_PROMPT, *FAST_GEN, "--json",
    )  # fmt: skip
    assert generated.exit_code == 0, generated.output
    record = json.loads(generated.stdout.splitlines()[0])
    assert record["prompt"] == SUBJECT_PROMPT
    assert SUBJECT_PROMPT in spied_text  # inverted and denoised under the subject prompt
    assert set(spied_text) <= {SUBJECT_PROMPT, ""}  # and the empty null text; never the draft's words
    assert DRAFT_PROMPT not in spied_text


def test_sdxl_subject_through_every_command(
    cli: Any,
    tiny_preset: Path,
    tiny_sdxl_preset: Path,
    tiny_draft_presets: Path,
    tiny_eval: Path,
    tmp_path: Path,
) -> None:
    _added_and_captioned(cli, tmp_path)
    run = _trained(cli, "tiny-sdxl", "--lora", "4")
    assert run["status"] == "done" and Path(run["weights_file"]).is_file()
    generated = cli(
        "gen", "robot", PROMPT, "--subject-model", "tiny-sdxl", "--context-model", "tiny", *FAST_GEN, "--json"
    )
    assert generated.exit_code == 0, generated.output
    record = json.loads(generated.stdout.splitlines()[0])
    assert Path(record["image_file"]).is_file()
    for draft in ("tiny-flux", "tiny-sd35"):  # today's draft models, as their tiny presets
        drafted = cli("gen", "robot", PROMPT, "--subject-model", "tiny-sdxl", "--context-model", draft,
                      *FAST_GEN, "--json")  # fmt: skip
        assert drafted.exit_code == 0, drafted.output
        assert Path(json.loads(drafted.stdout.splitlines()[0])["image_file"]).is_file()
    for extra in (("--no-context",), ("--inversion", "npi")):
        again = cli("gen", "robot", PROMPT, "--subject-model", "tiny-sdxl", "--context-model", "tiny",
                    *FAST_GEN, *extra)  # fmt: skip
        assert again.exit_code == 0, again.output
    out = tmp_path / "robot-kohya.safetensors"
    exported = cli("export", "robot", "--format", "kohya", "-o", out)
    assert exported.exit_code == 0, exported.output
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    assert keys and all(key.startswith("lora_unet_") for key in keys)
    assert any("transformer_blocks_1" in key for key in keys)  # SDXL's many-layer blocks are in the file
    scored = cli("eval", "robot", "--eval-models", "tiny", "--json")
    assert scored.exit_code == 0, scored.output
    scores = json.loads(scored.stdout)["generations"][0]["scores"]
    assert all(-1.0 <= scores[key] <= 1.0 for key in ("dino", "clip_i", "clip_t"))


def test_the_dreambench_runner_runs_with_an_sdxl_subject_model(
    cli: Any, tiny_preset: Path, tiny_sdxl_preset: Path, tiny_eval: Path, tmp_path: Path
) -> None:
    from test_evaluation import TINY_RUN, make_fake_dreambench

    dataset = make_fake_dreambench(tmp_path / "dreambench")
    args = list(TINY_RUN)
    args[args.index("--subject-model") + 1] = "tiny-sdxl"
    out = tmp_path / "bench"
    result = cli("bench", "dreambench", dataset, "--out", out, "--subjects", "dog", *args, "--json")
    assert result.exit_code == 0, result.output
    images = list(out.rglob("*.png"))
    assert images, "the runner wrote no images"


# the SDXL base repo's extras `models pull` must leave: single-file checkpoints, fp16 variants, other formats
SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_EXTRAS = [
    "sd_xl_base_1.0.safetensors",
    "sd_xl_offset_example-lora_1.0.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/openvino_model.bin",
    "text_encoder/model.fp16.safetensors",
]


def test_models_pull_sdxl_fetches_its_diffusers_files_and_it_trains_offline(
    cli: Any, tiny_sdxl_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests import fakehub

    source = tiny_sdxl_models_dir / "subject"
    files = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
    hub = fakehub.install(
        monkeypatch,
        tmp_path / "hf-cache",
        {
            "stabilityai/stable-diffusion-xl-base-1.0": fakehub.FakeRepo(
                {"main": files + SDXL_EXTRAS}, source=source
            )
        },
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    pulled = cli("models", "pull", "sdxl", "--json")
    assert pulled.exit_code == 0, pulled.output
    kept = {d["repo_id"]: d["files"] for d in hub.downloads}
    assert kept[SDXL_REPO] == [f for f in files if f != "VERSION"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = {row["name"]: row for row in json.loads(cli("models", "ls", "--json").stdout)}
    assert rows["sdxl"]["present"] and rows["sdxl"]["role"] == "subject"
    _added_and_captioned(cli, tmp_path)
    run = _trained(cli, "sdxl")
    assert run["status"] == "done" and run["base_model"] == "sdxl"
