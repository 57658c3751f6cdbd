"""Exports of SDXL runs in their SDXL layouts: kohya LoRA with sd-scripts' SDXL (SGM) names, the
original single-file checkpoint and the diffusers folder, each loaded back by diffusers itself."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from stencil_cli.core import export as ex
from stencil_cli.core.families import family_of, unet_inputs
from stencil_cli.core.training import TrainConfig, TrainingData, train_unet
from stencil_cli.core.weights import (
    load_trained_weights,
    save_trained_weights,
    trained_state,
    weights_metadata,
)
from stencil_cli.models import load_subject_pipeline

CAPTIONS = ["a toy robot on a table", "the toy robot in grass", "a red toy robot"]


def _config(**overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {"steps": 3, "batch_size": 2, "lr": 1e-2, "resolution": 64, "save_dtype": "fp32"}
    return TrainConfig(**{**values, **overrides})


def _fresh(folder: Path) -> Any:
    return load_subject_pipeline(str(folder / "subject"), device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def sdxl_runs(tiny_sdxl_pipe: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A full-decoder and a rank-4 LoRA run of the tiny SDXL UNet, as weights files and trained UNets."""
    pipe = tiny_sdxl_pipe
    generator = torch.Generator().manual_seed(0)
    data = TrainingData(
        torch.randn(3, 4, 8, 8, generator=generator),
        family_of(pipe).encode(pipe, CAPTIONS, 64),
        (torch.rand(3, 1, 8, 8, generator=generator) > 0.3).float(),
        None,
    )
    folder = tmp_path_factory.mktemp("sdxl-runs")
    out: dict[str, Any] = {"data": data}
    for name, config in (("full", _config()), ("lora", _config(lora_rank=4, lora_alpha=8.0))):
        unet = copy.deepcopy(pipe.unet)
        result = train_unet(unet, pipe.scheduler, data, config)
        path = folder / f"{name}.safetensors"
        meta = weights_metadata(
            config, "tiny-sdxl", result.names, subject="robot", phrase="toy robot", run_id="1"
        )
        save_trained_weights(path, trained_state(unet, result.names, torch.float32), meta)
        out[name], out[f"{name}_unet"] = path, unet
    return out


def _call(unet: Any, data: TrainingData) -> torch.Tensor:
    sample = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return unet(sample, 300, **unet_inputs(data.embeddings)).sample


def test_an_sdxl_lora_exports_to_kohya_with_sd_scripts_sdxl_names_and_loads_in_diffusers(
    tiny_sdxl_pipe: Any, tiny_sdxl_models_dir: Path, sdxl_runs: dict[str, Any], tmp_path: Path
) -> None:
    target = tmp_path / "robot-kohya.safetensors"
    ex.export_run(tiny_sdxl_pipe, sdxl_runs["lora"], "kohya", target, save_dtype="fp32")
    keys = list(load_file(str(target)))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.startswith("lora_unet_output_blocks_") for k in keys)  # SGM names, not up_blocks
    assert not any("up_blocks" in k for k in keys)
    assert any("transformer_blocks_1" in k for k in keys)  # the many-layer blocks are there
    pipe = _fresh(tiny_sdxl_models_dir)
    pipe.load_lora_weights(str(target))  # diffusers maps sd-scripts' SDXL names back itself
    stencil = copy.deepcopy(tiny_sdxl_pipe.unet)
    load_trained_weights(stencil, sdxl_runs["lora"])
    data = sdxl_runs["data"]
    torch.testing.assert_close(_call(pipe.unet, data), _call(stencil, data), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_call(pipe.unet, data), _call(tiny_sdxl_pipe.unet, data), atol=1e-5)


def test_an_sdxl_single_file_export_loads_back_with_from_single_file(
    tiny_sdxl_models_dir: Path, sdxl_runs: dict[str, Any], tmp_path: Path
) -> None:
    from diffusers import StableDiffusionXLPipeline

    target = tmp_path / "robot.safetensors"
    source = _fresh(tiny_sdxl_models_dir)
    ex.export_run(source, sdxl_runs["full"], "single-file", target, save_dtype="fp32")
    keys = list(load_file(str(target)))
    assert any(k.startswith("model.diffusion_model.output_blocks.") for k in keys)
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys)
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in keys)
    assert any(k.startswith("model.diffusion_model.label_emb.0.0.") for k in keys)
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(target), config=str(tiny_sdxl_models_dir / "subject"), local_files_only=True
    )
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine = getattr(source, component).state_dict()
        theirs = getattr(loaded, component).state_dict()
        assert all(torch.equal(theirs[k], mine[k]) for k in mine if not k.endswith("position_ids")), component
    trained = sdxl_runs["full_unet"].state_dict()
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in trained.items())


def test_an_sdxl_diffusers_export_loads_back_with_from_pretrained(
    tiny_sdxl_models_dir: Path, sdxl_runs: dict[str, Any], tmp_path: Path
) -> None:
    from diffusers import StableDiffusionXLPipeline

    target = tmp_path / "robot-diffusers"
    ex.export_run(_fresh(tiny_sdxl_models_dir), sdxl_runs["full"], "diffusers", target, save_dtype="fp32")
    loaded = StableDiffusionXLPipeline.from_pretrained(str(target), use_safetensors=True)
    trained = sdxl_runs["full_unet"].state_dict()
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in trained.items())
