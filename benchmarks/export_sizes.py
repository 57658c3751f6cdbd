"""File sizes of runs and exports for the full-size SD1.5 architecture, computed on the meta device.

    python benchmarks/export_sizes.py            # docs/training.md's table (a test compares them)

Nothing is materialised or downloaded: the shipped config (``stencil_cli/models/configs/sd15.json``) is built
on the meta device and sizes are parameter counts times the bytes of the dtype each file is written in: a run
as `stencil train` saves it (fp32, its default `--save-dtype`), an export as `stencil export` writes it (fp16,
its default), headers aside (a few kB). Sizes print with the CLI's own formatter (decimal units).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fullsize  # noqa: E402 - benchmarks/fullsize.py, beside this script

from stencil_cli.core.weights import LORA_TARGET_MODULES  # noqa: E402

RUN_BYTES = 4  # fp32: `stencil train`'s default save dtype
EXPORT_BYTES = 2  # fp16: `stencil export`'s default


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


def size_table() -> str:
    """The Markdown size table of runs and exports."""
    from stencil_cli.cli.output import human_bytes

    unet = fullsize.build_full_size_component("sd15", "unet", device="meta")
    counts = fullsize.full_size_parameter_counts("sd15")
    decoder = sum(p.numel() for n, p in unet.named_parameters() if n.startswith("up_blocks."))
    pipeline = counts["unet"] + counts["vae"] + counts["text_encoder"]
    rows = ["| file | parameters | run file (fp32) | export (fp16) |", "|---|---|---|---|"]

    def row(what: str, count: int, run: bool = True) -> None:
        run_size = human_bytes(count * RUN_BYTES) if run else "-"
        rows.append(f"| {what} | {count:,} | {run_size} | {human_bytes(count * EXPORT_BYTES)} |")

    row("full-decoder run (`up_blocks`)", decoder)
    for rank in (4, 16, 64):
        count = lora_params(unet, rank, attention_only=True)
        row(f"LoRA run, rank {rank} (and its `lora`/`kohya` export)", count)
    for rank in (4, 16, 32, 64):
        count = lora_params(unet, rank, attention_only=False)
        row(f"`lora`/`kohya` export of a full run, SVD rank {rank}", count, run=False)
    row("`diffusers` folder (UNet + VAE + text encoder)", pipeline, run=False)
    row("`single-file` checkpoint", pipeline, run=False)
    return "\n".join(rows)


def main() -> None:
    """Print the size table."""
    print(size_table())


if __name__ == "__main__":
    main()
