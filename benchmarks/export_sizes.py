"""File sizes of runs and exports for the full-size SD1.5 architecture, computed on the meta device.

    python benchmarks/export_sizes.py            # Markdown table (fp16 tensors, as stencil saves them)

Nothing is materialised or downloaded: the shipped config (``stencil_cli/models/configs/sd15.json``) is built
on the meta device and sizes are parameter counts times 2 bytes (fp16), plus nothing for headers (a few kB).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fullsize  # noqa: E402 - benchmarks/fullsize.py, beside this script

from stencil_cli.core.weights import LORA_TARGET_MODULES  # noqa: E402

BYTES = 2  # fp16


def lora_params(unet: torch.nn.Module, rank: int, *, attention_only: bool) -> int:
    """Parameters of rank-`rank` LoRA layers on the decoder: attention projections, or every Linear/Conv2d."""
    total = 0
    for name, module in unet.named_modules():
        if not name.startswith("up_blocks."):
            continue
        if attention_only and not name.endswith(tuple(f".{t}" for t in LORA_TARGET_MODULES)):
            continue
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            out, fan_in = module.weight.shape[0], math.prod(module.weight.shape[1:])
            r = min(rank, out, fan_in)
            total += r * (out + fan_in)
    return total


def mib(count: int) -> str:
    size = count * BYTES / 2**20
    return f"{size:,.1f} MiB" if size < 1024 else f"{size / 1024:,.2f} GiB"


def main() -> None:
    """Print the size table."""
    unet = fullsize.build_full_size_component("sd15", "unet", device="meta")
    counts = fullsize.full_size_parameter_counts("sd15")
    decoder = sum(p.numel() for n, p in unet.named_parameters() if n.startswith("up_blocks."))
    pipeline = counts["unet"] + counts["vae"] + counts["text_encoder"]
    print("| file | parameters | size (fp16) |\n|---|---|---|")
    print(f"| full-decoder run (`up_blocks`) | {decoder:,} | {mib(decoder)} |")
    for rank in (4, 16, 64):
        count = lora_params(unet, rank, attention_only=True)
        print(f"| LoRA run, rank {rank} (= its `lora`/`kohya` export) | {count:,} | {mib(count)} |")
    for rank in (4, 16, 32, 64):
        count = lora_params(unet, rank, attention_only=False)
        print(f"| `lora`/`kohya` export of a full run, SVD rank {rank} | {count:,} | {mib(count)} |")
    print(f"| `diffusers` folder (UNet + VAE + text encoder) | {pipeline:,} | {mib(pipeline)} |")
    print(f"| `single-file` checkpoint | {pipeline:,} | {mib(pipeline)} |")


if __name__ == "__main__":
    main()
