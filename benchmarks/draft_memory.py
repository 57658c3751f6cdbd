"""Weights memory of the draft (context) presets at fp16 / bf16, with and without T5, from their real configs.

Every component is built from ``stencil_cli/models/configs/<preset>.json`` on the meta device (no memory,
no download) and its parameters and persistent buffers (SD3's positional embedding table) are counted; two
bytes each at fp16 or bf16. This is the memory of the weights alone: the activations of a 512x512 draft
come on top (small next to the weights at batch 1; see docs/models.md).

    python benchmarks/draft_memory.py            # the markdown table of docs/models.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fullsize  # noqa: E402 - benchmarks/ on the path first

DRAFT_PRESETS = ("sd3-medium", "sd35-medium", "sd35-large-turbo", "flux-schnell")
T5_COMPONENT = {"FluxPipeline": "text_encoder_2"}  # the T5 encoder's name, where it is not text_encoder_3
HALF_BYTES = 2  # fp16 and bf16


def component_sizes(preset: str) -> dict[str, int]:
    """Parameters plus persistent buffers of every component of `preset` (built on the meta device)."""
    sizes = {}
    for name in fullsize.full_size_config(preset)["components"]:
        module = fullsize.build_full_size_component(preset, name, device="meta")
        persistent = {key for key, _ in module.named_buffers() if key in module.state_dict()}
        buffers = sum(b.numel() for key, b in module.named_buffers() if key in persistent)
        sizes[name] = sum(p.numel() for p in module.parameters()) + buffers
    return sizes


def t5_component(preset: str) -> str:
    """The name of `preset`'s T5 encoder component."""
    return T5_COMPONENT.get(fullsize.full_size_config(preset)["pipeline"], "text_encoder_3")


def gib(count: int) -> str:
    """A parameter count as GiB of half-precision weights."""
    return f"{count * HALF_BYTES / 2**30:.1f}"


def table() -> str:
    """The markdown table: denoiser, text encoders, T5, and the totals with and without T5."""
    lines = [
        "| preset | denoiser | CLIP encoders | T5-XXL | VAE | fp16/bf16 weights | without T5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset in DRAFT_PRESETS:
        sizes = component_sizes(preset)
        t5 = t5_component(preset)
        denoiser = sizes["transformer"]
        clips = sum(v for k, v in sizes.items() if k.startswith("text_encoder") and k != t5)
        total = sum(sizes.values())
        without = "needs T5" if preset == "flux-schnell" else f"{gib(total - sizes[t5])} GiB"
        lines.append(
            f"| {preset} | {denoiser / 1e9:.2f} B | {clips / 1e6:.0f} M | {sizes[t5] / 1e9:.2f} B | "
            f"{sizes['vae'] / 1e6:.0f} M | {gib(total)} GiB | {without} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    print(table())
