"""Trained-weights kinds: the full decoder fine-tune and LoRA adapters (through peft), and how each loads.

A run's weights file is one safetensors file whose metadata names its ``kind``:

- ``full``: the trained parameters themselves (the decoder, ``up_blocks.*``), loaded by copying them in;
- ``lora``: LoRA adapters (peft) on the attention projections ``to_q``, ``to_k``, ``to_v`` and ``to_out.0``
  of the decoder (the layers diffusers' DreamBooth-LoRA script adapts), stored under the UNet's own
  parameter names (``...attn1.to_q.lora_A.default.weight``) with ``lora_rank`` and ``lora_alpha`` in the
  metadata. Loading merges ``W += (alpha / rank) * B @ A`` into the base weights, so the UNet stays a plain
  diffusers UNet and every stage of generation (attention recording, inversion, denoising) works on it
  unchanged.

This module takes models and tensors; it never touches the store and never prints."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from stencil_cli.base.errors import BadInputError, StencilError

KIND_FULL = "full"
KIND_LORA = "lora"
KINDS = (KIND_FULL, KIND_LORA)
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
LORA_DEFAULT_LR = 1e-4  # diffusers' DreamBooth-LoRA examples; the paper's 2e-5 is for full fine-tuning
ADAPTER_NAME = "default"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")


def lora_target_pattern(which: str = "decoder") -> str:
    """The peft ``target_modules`` regex: the attention projections of the decoder (or of the whole UNet)."""
    targets = "|".join(re.escape(name) for name in LORA_TARGET_MODULES)
    scope = r"up_blocks\..*" if which == "decoder" else r".*"
    return rf"{scope}\.(?:{targets})"


def has_lora(unet: Any) -> bool:
    """Whether peft adapters are injected into `unet`."""
    return any("lora_A" in name for name, _ in unet.named_parameters())


def lora_parameter_names(unet: Any) -> list[str]:
    """The adapter parameters' names (``...lora_A.default.weight``, ``...lora_B.default.weight``)."""
    return [name for name, _ in unet.named_parameters() if ".lora_A." in name or ".lora_B." in name]


def add_lora(unet: Any, rank: int, alpha: float, which: str = "decoder") -> list[str]:
    """Inject LoRA adapters (peft, Gaussian A, zero B) into `unet`; return the adapter parameter names.

    A UNet that already carries stencil's adapter keeps it (a resumed run); the base weights are untouched.
    """
    from peft import LoraConfig

    if rank < 1:
        raise BadInputError(f"the LoRA rank must be at least 1 (got {rank})")
    if not has_lora(unet):
        config = LoraConfig(
            r=int(rank),
            lora_alpha=float(alpha),
            init_lora_weights="gaussian",
            target_modules=lora_target_pattern(which),
            lora_dropout=0.0,
        )
        unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    names = lora_parameter_names(unet)
    if not names:
        raise StencilError("this UNet has no attention projections to put LoRA adapters on")
    return names


def lora_pairs(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group LoRA tensors by the module they adapt: ``{module: (A, B)}`` (A: r x in..., B: out x r...)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise StencilError(f"{key!r} is not a LoRA tensor name (expected ...lora_A/lora_B...weight)")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    missing = [module for module, pair in parts.items() if set(pair) != {"A", "B"}]
    if missing:
        raise StencilError(f"LoRA weights for {missing[0]!r} lack their A or B half")
    return {module: (pair["A"], pair["B"]) for module, pair in parts.items()}


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The weight update ``scale * B @ A`` of one adapted layer, shaped like the layer's weight (fp32)."""
    a = down.float().flatten(1)  # (r, in * kh * kw)
    b = up.float().flatten(1)  # (out, r)
    delta = (b @ a) * scale
    return delta.reshape(up.shape[0], *down.shape[1:]) if down.dim() == 4 else delta


def merge_lora(unet: Any, tensors: Mapping[str, torch.Tensor], scale: float) -> int:
    """Add each adapter's ``scale * B @ A`` into the base weight it adapts (in place); return the count."""
    pairs = lora_pairs(tensors)
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for module_name, (down, up) in pairs.items():
            module = modules.get(module_name)
            weight = getattr(module, "weight", None)
            if weight is None:
                raise StencilError(f"the LoRA weights adapt {module_name!r}, which this UNet does not have")
            delta = lora_delta(down, up, scale)
            if tuple(delta.shape) != tuple(weight.shape):
                raise StencilError(
                    f"the LoRA weights for {module_name!r} give {tuple(delta.shape)}, "
                    f"the model's layer is {tuple(weight.shape)}"
                )
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    return len(pairs)


def lora_scale(metadata: Mapping[str, str]) -> float:
    """``alpha / rank`` from a LoRA weights file's metadata."""
    try:
        rank = float(metadata["lora_rank"])
        alpha = float(metadata.get("lora_alpha") or rank)
    except (KeyError, ValueError) as error:
        raise StencilError("the LoRA weights file does not record its rank (lora_rank metadata)") from error
    return alpha / rank


def weights_kind(metadata: Mapping[str, str]) -> str:
    """``lora`` or ``full`` (files written before LoRA existed are full)."""
    kind = metadata.get("kind", KIND_FULL)
    if kind not in KINDS:
        raise StencilError(f"unknown trained-weights kind {kind!r}: this stencil reads {', '.join(KINDS)}")
    return kind


def read_tensors(path: Any) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (CPU)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise StencilError(f"cannot read trained weights {path}: {error}") from error
