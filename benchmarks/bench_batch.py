"""Images per minute for `-n N` context-guided images: one seed at a time vs the seeds batched.

    python benchmarks/bench_batch.py                                   # tiny preset, CPU, n=4, median of 3
    python benchmarks/bench_batch.py --preset full --device cuda --json     # SD3 Medium + SD1.5, 512 px

Each variant makes the same N images (draft with the context model, DDIM + null-text inversion, denoise at tau
60, so K = 3 null-text steps at 50 DDIM steps): `one_by_one` calls `render_drafts`, `invert_images` and
`guided_images` with a batch of one per seed; `batched_B` renders the drafts with `render_drafts` and inverts
+ denoises them with `iter_context_guidance`, B seeds per batch. Both pipelines stay resident (on a GPU
`stencil gen` frees the context model before loading the subject model: that load is the same for both
variants and not timed). One untimed warm-up of each variant, then `--repeat` rounds alternating the order;
medians reported. Nothing is downloaded: `full` builds the architectures with random weights
(bench_generate's builders).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_generate  # noqa: E402

from stencil_cli import models  # noqa: E402
from stencil_cli.core import generation  # noqa: E402
from stencil_cli.core.inversion import NullTextSettings  # noqa: E402


def variants(
    context: Any, subject: Any, n: int, sizes: list[int], settings: generation.GenerationSettings, tau: float
) -> dict[str, Callable[[], Any]]:
    """The timed calls: one seed at a time, and batched with each size in `sizes`."""
    seeds, taus = list(range(n)), [tau]
    resolution = models.native_resolution(subject)
    draft_args = {
        "resolution": resolution,
        "steps": settings.draft_steps,
        "guidance": settings.draft_guidance,
    }
    prompt, draft_prompt = bench_generate.PROMPT, bench_generate.DRAFT_PROMPT

    def one_by_one() -> Any:
        images = []
        for seed in seeds:
            drafts = generation.render_drafts(context, draft_prompt, seeds=[seed], **draft_args)
            inverted = generation.invert_images(subject, drafts, prompt, settings, taus=taus)
            images.append(generation.guided_images(subject, inverted, prompt, taus, settings)[0])
        return images

    def batched(size: int) -> Callable[[], Any]:
        def call() -> Any:
            drafts = generation.render_drafts(
                context, draft_prompt, seeds=seeds, batch_size=size, **draft_args
            )
            samples = generation.iter_context_guidance(
                subject, drafts, prompt, taus, settings, batch_size=size
            )
            return [sample for _, sample in samples]

        return call

    return {"one_by_one": one_by_one, **{f"batched_{size}": batched(size) for size in sizes}}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse options, time the variants, print the report."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-n", type=int, default=4, help="images (seeds) per variant (default 4)")
    parser.add_argument("--batch-sizes", default="4,2", help="comma list of batch sizes to time")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--draft-steps", type=int, default=50)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--tau", type=float, default=60.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-t5", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = models.resolve_device(args.device)
    dtype = models.resolve_dtype("auto", device)
    with models.quiet_libraries():
        context = bench_generate.build_context(args.preset, device, dtype, args.no_t5)
        subject = bench_generate.build_subject(args.preset, device, dtype)
    settings = generation.GenerationSettings(
        steps=args.steps,
        draft_steps=args.draft_steps,
        null_text=NullTextSettings(inner_steps=args.inner_steps),
    )
    sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    calls = variants(context, subject, args.n, sizes, settings, args.tau)
    for call in calls.values():  # warm-up
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(max(1, args.repeat)):
        order = list(calls.items()) if r % 2 == 0 else list(calls.items())[::-1]
        for name, call in order:
            sync(device)
            start = time.perf_counter()
            call()
            sync(device)
            times[name].append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    report = {
        "preset": args.preset,
        "device": bench_generate.device_name(device),
        "n": args.n,
        "settings": {
            "steps": args.steps,
            "draft_steps": args.draft_steps,
            "inner_steps": args.inner_steps,
            "tau": args.tau,
            "dtype": str(dtype),
            "threads": torch.get_num_threads(),
        },
        "peak_gpu_gib": round(peak, 2) if peak is not None else None,
        "variants": {
            name: {
                "median_s": round(statistics.median(runs), 3),
                "images_per_minute": round(args.n * 60 / statistics.median(runs), 2),
                "runs_s": [round(x, 3) for x in runs],
            }
            for name, runs in times.items()
        },
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"# n={args.n}, {args.preset} preset on {report['device']}, median of {args.repeat}")
        print("| variant | median s | images/minute |\n|---|---:|---:|")
        for name, row in report["variants"].items():
            print(f"| {name} | {row['median_s']} | {row['images_per_minute']} |")
    return report


if __name__ == "__main__":
    main()
