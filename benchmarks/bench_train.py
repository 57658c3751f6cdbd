"""Time training steps of the Stencil loop (masked loss, decoder only) and report a Markdown table row.

    python benchmarks/bench_train.py                                  # tiny preset, CPU, 100 steps
    python benchmarks/bench_train.py --preset full --device cuda      # SD1.5 architecture, random weights,
                                                                      # batch 6, 512 px, bf16 autocast

Nothing is downloaded: `tiny` is built in memory, `full` instantiates the shipped SD1.5 UNet config with
random weights (speed and memory do not depend on the weights). The data (latents, caption embeddings,
masks) is synthetic and already on the device, as in `stencil train` after its precompute pass; the mask
pass (one frozen UNet forward per photo with attn2 recording) is timed separately.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fullsize  # noqa: E402

from stencil_cli import models  # noqa: E402
from stencil_cli.core.attention import compute_masks  # noqa: E402
from stencil_cli.core.training import TrainConfig, TrainingData, train_unet  # noqa: E402

HEADER = (
    "| preset | device | train | batch | px | steps | precision | grad ckpt | mask pass s | train s | s/step "
    "| peak memory |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def build(preset: str, device: torch.device) -> tuple[torch.nn.Module, object, int, int]:
    """The UNet (fp32 master weights) on `device`, a scheduler, the latent size and text width."""
    if preset == "tiny":
        pipe = models.build_tiny_subject_pipeline()
        unet = pipe.unet
    else:
        unet = fullsize.build_full_size_component("sd15", "unet", device=device, dtype=torch.float32)
    unet.to(device)
    size, width = int(unet.config.sample_size), int(unet.config.cross_attention_dim)
    return unet, models.sd15_ddim_scheduler(), size, width


def device_name(device: torch.device) -> str:
    """A short human name for the device."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main() -> None:
    """Parse options, run the benchmark, print the Markdown row."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 6 (the paper's)")
    parser.add_argument("--resolution", type=int, default=None, help="image px (default: the model's)")
    parser.add_argument("--photos", type=int, default=4, help="reference photos (sampled with replacement)")
    parser.add_argument("--precision", default=None, help="fp32|fp16|bf16 (default: bf16 on CUDA)")
    parser.add_argument("--train", default="decoder", choices=("decoder", "all"))
    parser.add_argument(
        "--lora",
        type=int,
        default=None,
        metavar="RANK",
        help="train LoRA adapters of this rank instead of the decoder itself",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernels, caches)")
    parser.add_argument("--header", action="store_true", help="print the table header too")
    args = parser.parse_args()

    device = models.resolve_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    batch = args.batch_size or 6
    unet, scheduler, latent, text_dim = build(args.preset, device)
    if args.resolution:
        latent = args.resolution // 8
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(args.photos, 4, latent, latent, generator=generator).to(device)
    embeddings = torch.randn(args.photos, 77, text_dim, generator=generator).to(device)
    weights = torch.zeros(args.photos, 77)
    weights[:, 2:4] = 0.5

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    masks = compute_masks(unet, scheduler, latents, embeddings, weights).masks
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    mask_seconds = time.perf_counter() - start

    data = TrainingData(latents=latents, embeddings=embeddings, masks=masks, maps=None)
    config = TrainConfig(
        steps=args.warmup,
        batch_size=batch,
        resolution=latent * 8,
        train=args.train,
        precision=precision,
        gradient_checkpointing=args.gradient_checkpointing,
        lora_rank=args.lora,
    )
    if args.warmup:
        train_unet(unet, scheduler, data, config)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    config.steps = args.steps
    start = time.perf_counter()
    result = train_unet(unet, scheduler, data, config)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    else:
        import resource

        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"
    trained = f"{args.train}, LoRA r{args.lora}" if args.lora else args.train
    if args.header:
        print(HEADER)
    print(
        f"| {args.preset} | {device_name(device)} | {trained} | {batch} | {latent * 8} | {args.steps} | "
        f"{precision} | {'yes' if args.gradient_checkpointing else 'no'} | {mask_seconds:.2f} | "
        f"{seconds:.2f} | {seconds / args.steps:.3f} | {peak} |"
    )
    print(f"final loss {result.losses[-1]:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
