"""Full-size SD1.5, SDXL base and SD3 Medium architectures with random weights: real shapes, no download.

For the benchmarks (time and memory at the real sizes) and the tests that check the shipped configs. The
architectures come from ``stencil_cli/models/configs/<preset>.json`` (the diffusers / transformers configs of
the real models). Import it as ``import fullsize`` with ``benchmarks/`` on ``sys.path``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from stencil_cli.base.errors import BadInputError
from stencil_cli.models import (
    byte_level_clip_tokenizer,
    byte_level_t5_tokenizer,
    quiet_libraries,
    sd15_ddim_scheduler,
)

FULL_SIZE_PRESETS = ("sd15", "sdxl", "sd3-medium", "sd35-medium", "sd35-large-turbo", "flux-schnell")


def full_size_config(preset: str) -> dict[str, Any]:
    """The shipped architecture configs of a full-size preset (``models/configs/<preset>.json``)."""
    from importlib import resources

    if preset not in FULL_SIZE_PRESETS:
        raise BadInputError(f"no full-size config for {preset!r}: use one of {', '.join(FULL_SIZE_PRESETS)}")
    configs = resources.files("stencil_cli").joinpath("models", "configs")
    text = configs.joinpath(f"{preset}.json").read_text(encoding="utf-8")
    return json.loads(text)


def _instantiate(config: dict[str, Any]) -> torch.nn.Module:
    """Build one component with random weights from its config (diffusers or transformers class)."""
    import diffusers
    import transformers

    config = dict(config)
    class_name = config.pop("_class_name")
    if hasattr(diffusers, class_name) and not class_name.startswith(("CLIP", "T5")):
        return getattr(diffusers, class_name).from_config(config)
    model_cls = getattr(transformers, class_name)
    config_cls = model_cls.config_class
    if class_name.startswith("CLIP"):
        config_cls = transformers.CLIPTextConfig
    return model_cls(config_cls(**config))


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_full_size_component(
    preset: str, component: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """One real-sized network (e.g. sd15 unet, sd3-medium transformer) with random weights, built on device.

    ``device="meta"`` builds it without memory (shapes and parameter counts only).
    """
    components = full_size_config(preset)["components"]
    if component not in components:
        raise BadInputError(f"{preset} has no component {component!r}: use one of {', '.join(components)}")
    with quiet_libraries(), torch.device(device), _default_dtype(dtype):
        module = _instantiate(components[component])
    return module.eval()


def full_size_parameter_counts(preset: str) -> dict[str, int]:
    """Parameter count of every component of a full-size preset (built on the meta device, no memory)."""
    return {
        name: sum(p.numel() for p in build_full_size_component(preset, name, device="meta").parameters())
        for name in full_size_config(preset)["components"]
    }


def build_full_size_pipeline(
    preset: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    no_t5: bool = False,
) -> Any:
    """A full-size SD1.5, SDXL, SD3 / SD3.5 or FLUX.1-schnell pipeline, random weights (benchmarks)."""
    with quiet_libraries():
        from diffusers import (
            FlowMatchEulerDiscreteScheduler,
            StableDiffusion3Pipeline,
            StableDiffusionPipeline,
            StableDiffusionXLPipeline,
        )

    def part(name: str) -> torch.nn.Module:
        return build_full_size_component(preset, name, device=device, dtype=dtype)

    if preset == "sd15":
        with quiet_libraries():
            return StableDiffusionPipeline(
                vae=part("vae"),
                text_encoder=part("text_encoder"),
                tokenizer=byte_level_clip_tokenizer(),
                unet=part("unet"),
                scheduler=sd15_ddim_scheduler(),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
    if preset == "sdxl":  # the method's DDIM (its betas are SDXL's published ones), as loading sets it
        with quiet_libraries():
            return StableDiffusionXLPipeline(
                vae=part("vae"),
                text_encoder=part("text_encoder"),
                text_encoder_2=part("text_encoder_2"),
                tokenizer=byte_level_clip_tokenizer(),
                tokenizer_2=byte_level_clip_tokenizer(pad_token="!"),
                unet=part("unet"),
                scheduler=sd15_ddim_scheduler(),
                force_zeros_for_empty_prompt=True,
            )
    config = full_size_config(preset)
    scheduler_config = {k: v for k, v in config["scheduler"].items() if not k.startswith("_")}
    if config["pipeline"] == "FluxPipeline":
        if no_t5:
            raise BadInputError(f"{preset} reads the prompt through T5 only: it cannot run without T5")
        from diffusers import FluxPipeline

        with quiet_libraries():
            return FluxPipeline(
                scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config),
                vae=part("vae"),
                text_encoder=part("text_encoder"),
                tokenizer=byte_level_clip_tokenizer(),
                text_encoder_2=part("text_encoder_2"),
                tokenizer_2=byte_level_t5_tokenizer(),
                transformer=part("transformer"),
            )
    with quiet_libraries():
        return StableDiffusion3Pipeline(
            transformer=part("transformer"),
            scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config),
            vae=part("vae"),
            text_encoder=part("text_encoder"),
            tokenizer=byte_level_clip_tokenizer(),
            text_encoder_2=part("text_encoder_2"),
            tokenizer_2=byte_level_clip_tokenizer(pad_token="!"),
            text_encoder_3=None if no_t5 else part("text_encoder_3"),
            tokenizer_3=None if no_t5 else byte_level_t5_tokenizer(),
        )
