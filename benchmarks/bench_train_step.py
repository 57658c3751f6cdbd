"""Where a full-size training step's CPU time goes: page faults per step for each optimiser/allocator choice.

    flock /work/tools/fullsize.lock python benchmarks/bench_train_step.py --unet /work/fullsize/sd15/unet
    python benchmarks/bench_train_step.py --unet DIR --variants loop-none,loop-none-kept --px 256 --steps 4

Each variant runs in its own process (the allocator setting is process-wide): the SD1.5 UNet from `--unet`
(a diffusers `unet/` folder), decoder-only, batch 1 at `--px`, `--steps` steps; steps after the first are
averaged (the first creates Adam's state). Variants are `OPT-GRADS[-kept]`: OPT `foreach` or `loop` (Adam's
per-parameter loop), GRADS `none` (`zero_grad(set_to_none=True)`) or `keep`, `-kept` runs the steps inside
`stencil_cli.base.memory.keep_freed_memory`. Prints one line per process: minor page faults, CPU (user +
system) and wall seconds per step, peak RSS. `--rounds N` repeats the list, alternating.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = "foreach-none,loop-none,loop-keep,loop-keep-kept,loop-none-kept"


def one(variant: str, unet_dir: str, px: int, steps: int) -> str:
    """Run `variant` in this process; the result line."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    sys.path.insert(0, str(HERE.parent))
    from stencil_cli.base.memory import keep_freed_memory

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    scheduler = DDIMScheduler.from_pretrained(str(Path(unet_dir).parent / "scheduler"))
    n, h = 4, px // 8
    latents, embeds = torch.randn(n, 4, h, h), torch.randn(n, 77, unet.config.cross_attention_dim)
    masks = (torch.rand(n, 1, h, h) > 0.5).float()
    params = []
    for name, param in unet.named_parameters():
        param.requires_grad_(name.startswith("up_blocks."))
        if param.requires_grad:
            params.append(param)
    optimizer = torch.optim.Adam(params, lr=2e-5, foreach=variant.startswith("foreach"))
    keep_grads = "-keep" in variant
    generator = torch.Generator().manual_seed(0)
    unet.train()
    rows = []
    memory = keep_freed_memory() if variant.endswith("-kept") else contextlib.nullcontext()
    with memory:
        for _ in range(steps):
            before = resource.getrusage(resource.RUSAGE_SELF)
            wall = time.perf_counter()
            index = torch.randint(0, n, (1,), generator=generator)
            noise = torch.randn((1, 4, h, h), generator=generator)
            t = torch.randint(0, 1000, (1,), generator=generator)
            noisy = scheduler.add_noise(latents[index], noise, t)
            prediction = unet(noisy, t, encoder_hidden_states=embeds[index]).sample
            loss = ((masks[index] * (noise - prediction)) ** 2).mean()
            optimizer.zero_grad(set_to_none=not keep_grads)
            loss.backward()
            optimizer.step()
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            rows.append((after.ru_minflt - before.ru_minflt, cpu, time.perf_counter() - wall))
    later = rows[1:] or rows
    faults, cpu, wall = (sum(r[k] for r in later) / len(later) for k in range(3))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return (
        f"{variant:16s} {px} px: {faults / 1e6:.2f} M faults/step, CPU {cpu:.2f} s/step, "
        f"wall {wall:.2f} s/step, peak RSS {peak:.2f} GiB"
    )


def main() -> None:
    """Run every variant in its own process, `--rounds` times, alternating the order."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--unet", required=True, help="a diffusers unet/ folder (e.g. /work/fullsize/sd15/unet)"
    )
    parser.add_argument("--variants", default=VARIANTS)
    parser.add_argument("--px", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process's variant
    args = parser.parse_args()
    if args.one:
        print(one(args.one, args.unet, args.px, args.steps), flush=True)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for r in range(args.rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            command = [sys.executable, __file__, "--unet", args.unet, "--one", variant]
            command += ["--px", str(args.px), "--steps", str(args.steps)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            print(done.stdout.strip() or f"{variant}: failed\n{done.stderr[-500:]}", flush=True)


if __name__ == "__main__":
    main()
