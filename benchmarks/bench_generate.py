"""Time one context-guided image (draft -> null-text inversion -> guided denoise) and print a Markdown row.

    python benchmarks/bench_generate.py --header                           # tiny preset, CPU
    python benchmarks/bench_generate.py --preset full --device cuda --header
                                      # SD3 Medium draft + SD1.5 subject model, random weights, 512 px

Nothing is downloaded: `tiny` builds the tiny SD3-shaped and SD1.5-shaped pipelines in memory; `full` builds
the full-size SD3 Medium and SD1.5 architectures from the shipped configs with random weights (speed and
memory do not depend on the weights). The stages run as in `stencil gen`: the context pipeline renders the
draft, is freed, then the subject pipeline inverts the draft (float32) and denoises it once.

Null-text optimisation runs only for the steps tau injects (3 of 50 at tau 60), as `stencil gen` does. On
random weights its loss never falls below the early-stop threshold, so every optimised step runs all of its
inner iterations: the inversion figure is the worst case. Real fine-tuned weights stop early on many steps.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fullsize  # noqa: E402

from stencil_cli import models  # noqa: E402
from stencil_cli.core import generation  # noqa: E402
from stencil_cli.core.inversion import NullTextSettings  # noqa: E402

HEADER = (
    "| preset | device | px | precision | draft steps | DDIM steps | inversion | inner its | draft s | "
    "inversion s | denoise s | total s | peak memory (draft / inversion / denoise) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT = "a toy robot on a beach at sunset"
DRAFT_PROMPT = "a small red toy robot with a blue chest panel on a beach at sunset"


def device_name(device: torch.device) -> str:
    """A short human name for the device."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def build_context(preset: str, device: torch.device, dtype: torch.dtype, no_t5: bool) -> Any:
    """The context (draft) pipeline: tiny SD3-shaped, or full-size SD3 Medium with random weights."""
    if preset == "tiny":
        pipe = models.build_tiny_context_pipeline()
    else:
        pipe = fullsize.build_full_size_pipeline("sd3-medium", device=device, dtype=dtype, no_t5=no_t5)
    with models.quiet_libraries():
        pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_subject(preset: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The subject pipeline: tiny SD1.5-shaped, or full-size SD1.5 with random weights."""
    if preset == "tiny":
        pipe = models.build_tiny_subject_pipeline()
    else:
        pipe = fullsize.build_full_size_pipeline("sd15", device=device, dtype=dtype)
    with models.quiet_libraries():
        pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed(device: torch.device, work: Callable[[], Any]) -> tuple[Any, float, float]:
    """Run `work`; return its result, seconds and peak memory in GiB (CUDA: allocated; CPU: process RSS)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result, seconds, peak


def main() -> None:
    """Parse options, run the stages, print the Markdown row."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default=None, help="fp32|fp16|bf16 (default: bf16 on CUDA, else fp32)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (inversion and denoise)")
    parser.add_argument("--draft-steps", type=int, default=50)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--inversion", choices=("nti", "npi"), default="nti")
    parser.add_argument("--tau", type=float, default=60.0)
    parser.add_argument("--no-t5", action="store_true", help="SD3 without its T5 encoder")
    parser.add_argument("--warmup", action="store_true", help="run every stage once untimed first (2 steps)")
    parser.add_argument("--header", action="store_true", help="print the table header too")
    args = parser.parse_args()

    device = models.resolve_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[precision]
    settings = generation.GenerationSettings(
        steps=args.steps,
        inversion=args.inversion,
        null_text=NullTextSettings(inner_steps=args.inner_steps),
        draft_steps=args.draft_steps,
    )

    context = build_context(args.preset, device, dtype, args.no_t5)
    resolution = 64 if args.preset == "tiny" else 512

    def draft_stage(pipe: Any, steps: int) -> Any:
        return generation.render_drafts(
            pipe,
            DRAFT_PROMPT,
            resolution=resolution,
            seeds=[0],
            steps=steps,
            guidance=settings.draft_guidance,
        )[0]

    if args.warmup:
        draft_stage(context, 2)
    draft, draft_s, draft_peak = timed(device, lambda: draft_stage(context, args.draft_steps))
    models.free_pipeline(context)
    context = None

    subject = build_subject(args.preset, device, dtype)
    if args.warmup:
        quick = generation.GenerationSettings(
            steps=2, inversion=args.inversion, null_text=NullTextSettings(inner_steps=2)
        )
        warm = generation.invert_images(
            subject, [draft], PROMPT, quick, resolution=resolution, taus=[args.tau]
        )
        generation.guided_images(subject, warm, PROMPT, [args.tau], quick)
    inverted, inversion_s, inversion_peak = timed(
        device,
        lambda: generation.invert_images(
            subject, [draft], PROMPT, settings, resolution=resolution, taus=[args.tau]
        )[0],
    )
    _, denoise_s, denoise_peak = timed(
        device, lambda: generation.guided_images(subject, [inverted], PROMPT, [args.tau], settings)
    )
    inner = sum(inverted.inner_iterations)
    unit = "GiB" if device.type == "cuda" else "GiB RSS"
    if args.header:
        print(HEADER)
    label = "full (SD3 Medium + SD1.5)" if args.preset == "full" else "tiny"
    if args.preset == "full" and args.no_t5:
        label += ", no T5"
    print(
        f"| {label} | {device_name(device)} | {resolution} | {precision} | {args.draft_steps} | "
        f"{args.steps} | "
        f"{args.inversion} | {inner} | {draft_s:.2f} | {inversion_s:.2f} | {denoise_s:.2f} | "
        f"{draft_s + inversion_s + denoise_s:.2f} | "
        f"{draft_peak:.2f} / {inversion_peak:.2f} / {denoise_peak:.2f} {unit} |"
    )


if __name__ == "__main__":
    main()
