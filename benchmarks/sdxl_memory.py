"""Memory of the full-decoder SDXL fine-tune, computed on the meta device (no weights, no memory used).

Counts, for the real SDXL base 1.0 architecture (``models/configs/sdxl.json``): the weights stencil's
training keeps on the device (the whole pipeline in fp32, as `verbs.train.load_training_pipeline` loads it),
the trained decoder's gradients (fp32) and Adam's two states (fp32), and the activations one training step
keeps for the backward pass: every tensor autograd saves during one forward of the UNet, summed through
``torch.autograd.graph.saved_tensors_hooks`` on meta tensors. ``--lora 8`` trains only adapters, so its
gradients and Adam states are tiny, and activations shrink to what the adapted layers need.

Run: ``python benchmarks/sdxl_memory.py [--batch 1 6] [--resolution 512 1024]``. Results: docs/models.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fullsize  # noqa: E402

from stencil_cli.models import quiet_libraries  # noqa: E402

GIB = 1024**3


def saved_activation_bytes(
    unet: torch.nn.Module, batch: int, resolution: int, dtype: torch.dtype
) -> tuple[int, int]:
    """Bytes autograd saves for backward in one UNet forward at `batch` x `resolution` px (meta device):
    (everything, of which self-attention probability maps). On the meta device attention takes the math
    path, which saves the pixels x pixels maps; a GPU's flash / memory-efficient kernels do not."""
    total = maps = 0
    weights = {id(p) for p in unet.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total, maps
        if id(tensor) in weights or id(tensor._base) in weights:  # a weight, not an activation
            return tensor
        size = tensor.numel() * tensor.element_size()
        total += size
        if tensor.dim() >= 3 and tensor.shape[-1] == tensor.shape[-2] and tensor.shape[-1] >= 256:
            maps += size
        return tensor

    side = resolution // 8
    latent = torch.zeros(batch, 4, side, side, device="meta", dtype=dtype)
    text = torch.zeros(batch, 77, 2048, device="meta", dtype=dtype)
    added = {
        "text_embeds": torch.zeros(batch, 1280, device="meta", dtype=dtype),
        "time_ids": torch.zeros(batch, 6, device="meta", dtype=dtype),
    }
    t = torch.zeros(batch, device="meta", dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        unet(latent, t, encoder_hidden_states=text, added_cond_kwargs=added)
    return total, maps


def main() -> None:
    """Print the memory table (GiB) for the decoder fine-tune of SDXL at the given batches and sizes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 6])
    parser.add_argument("--resolution", type=int, nargs="+", default=[512, 1024])
    args = parser.parse_args()
    counts = fullsize.full_size_parameter_counts("sdxl")
    weights = sum(counts.values()) * 4  # the whole pipeline in fp32
    unet = fullsize.build_full_size_component("sdxl", "unet", device="meta")
    decoder = sum(p.numel() for n, p in unet.named_parameters() if n.startswith("up_blocks."))
    for name, param in unet.named_parameters():
        param.requires_grad_(name.startswith("up_blocks."))
    states = decoder * (4 + 8)  # fp32 gradients + Adam's two fp32 moments
    print(f"parameters: {counts}; decoder (up_blocks): {decoder:,} of {counts['unet']:,}")
    print(f"weights fp32 {weights / GIB:.1f} GiB; decoder grads + Adam {states / GIB:.1f} GiB")
    print("| activations | px | batch | saved (math attention) | of which attn maps | total, fused attn |")
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16 autocast (approx.)")):
        with quiet_libraries():
            unet.to(dtype)
        for resolution in args.resolution:
            for batch in args.batch:
                acts, maps = saved_activation_bytes(unet, batch, resolution, dtype)
                total = weights + states + acts - maps
                print(
                    f"| {label} | {resolution} | {batch} | {acts / GIB:.1f} GiB | {maps / GIB:.1f} GiB | "
                    f"{total / GIB:.1f} GiB |"
                )


if __name__ == "__main__":
    main()
