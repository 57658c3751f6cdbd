"""Time and peak memory of one draft per draft model: the presets' own steps and guidance, 512 x 512.

    python benchmarks/bench_drafts.py --random sd3-medium sd35-medium sd35-large-turbo flux-schnell \\
        --device cuda --dtype bf16                      # full-size architectures, random weights (a GPU job)
    python benchmarks/bench_drafts.py --model tiny tiny-sd35 tiny-flux --resolution 64   # smoke test, CPU
    python benchmarks/bench_drafts.py --model flux-schnell --device cuda    # the real weights, when cached

Each model draws `--repeat` drafts through stencil's own `render_drafts` after one warm-up draft; the table
gives seconds per draft and peak memory: CUDA's max allocated memory on a GPU, the process's peak RSS on the
CPU. `--no-t5` drops T5 where the model allows it (not FLUX).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fullsize  # noqa: E402

from stencil_cli import models  # noqa: E402
from stencil_cli.core.generation import render_drafts  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load(name: str, *, random: bool, device: str, dtype: str, no_t5: bool) -> Any:
    """A draft pipeline: the full-size architecture with random weights, or stencil's loader (presets)."""
    if random:
        t5 = no_t5 and models.draft_defaults(name).t5 != "required"
        return fullsize.build_full_size_pipeline(name, device=device, dtype=DTYPES[dtype], no_t5=t5)
    return models.load_context_pipeline(name, device=device, precision=dtype, no_t5=no_t5)


def peak_memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated (GPU) or the process's peak RSS (CPU), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One model's row: steps, guidance, seconds per draft, peak memory."""
    device = models.resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pipe = load(name, random=args.random, device=str(device), dtype=args.dtype, no_t5=args.no_t5)
    draft = models.draft_defaults(name)
    settings = {
        "steps": draft.steps,
        "guidance": draft.guidance,
        "max_sequence_length": draft.max_sequence_length,
        "resolution": args.resolution,
    }
    render_drafts(pipe, "a red toy robot on the moon", seeds=[0], **settings)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    seeds = list(range(1, args.repeat + 1))
    render_drafts(pipe, "a red toy robot on the moon", seeds=seeds, batch_size=1, **settings)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - started) / args.repeat
    row = {"model": name, "steps": draft.steps, "guidance": draft.guidance, "s_per_draft": seconds,
           "peak_gib": peak_memory_gib(device)}  # fmt: skip
    models.free_pipeline(pipe)
    return row


def main() -> None:
    """Parse the arguments, bench each model, print the markdown table."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--random", nargs="+", metavar="PRESET", help="full-size architectures, random")
    group.add_argument("--model", nargs="+", metavar="REF", help="draft models loaded as stencil loads them")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-t5", action="store_true")
    args = parser.parse_args()
    names, args.random = (args.random, True) if args.random else (args.model, False)
    print("| draft model | steps | guidance | s / draft | peak memory (GiB) |")
    print("|---|---|---|---|---|")
    for name in names:
        row = bench(name, args)
        print(f"| {row['model']} | {row['steps']} | {row['guidance']:g} | {row['s_per_draft']:.2f} | "
              f"{row['peak_gib']:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
