"""How fast this CPU multiplies in fp32, bf16 and fp16: the reason the draft runs in bf16 on some CPUs.

    OMP_NUM_THREADS=1 python benchmarks/bench_cpu_dtypes.py [--repeat 5] [--widths 32 128 256 512 1536]

One linear layer at an SD3 Medium shape (a batch of 2 x 410 tokens, 1536 -> 6144, the joint transformer's
MLP), timed per dtype on the CPU (median of `--repeat` calls after one warm-up); then a 2-layer SD3-shaped
transformer (random weights, a 32 x 32 latent, 154 text tokens, batch 2) at each of `--widths` (heads of 64,
or 4 heads below 256), fp32 against bf16: where bf16 starts to pay (`models.devices.BF16_MIN_WIDTH`). Prints
JSON with seconds, GFLOP/s and whether torch sees native bf16 (AVX512-BF16 or AMX).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from stencil_cli import models

TOKENS, WIDTH, HIDDEN = 2 * 410, 1536, 6144


def seconds_per_call(dtype: torch.dtype, repeat: int) -> float:
    """Median seconds of one (TOKENS x WIDTH) @ (WIDTH x HIDDEN) linear in `dtype`."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, WIDTH, generator=generator).to(dtype)
    w = torch.randn(HIDDEN, WIDTH, generator=generator).to(dtype)
    torch.nn.functional.linear(x, w)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        torch.nn.functional.linear(x, w)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def transformer_seconds(width: int, dtype: torch.dtype, repeat: int) -> float:
    """Median seconds of one forward of a 2-layer SD3-shaped transformer `width` wide, in `dtype`."""
    from diffusers import SD3Transformer2DModel

    heads = width // 64 if width >= 256 else 4
    torch.manual_seed(0)
    with models.quiet_libraries():
        model = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=width // heads,
            num_attention_heads=heads,
            joint_attention_dim=width,
            caption_projection_dim=width,
            pooled_projection_dim=width,
            pos_embed_max_size=32,
        ).eval()
        model.to(dtype)
    inputs = {
        "hidden_states": torch.randn(2, 16, 32, 32, dtype=dtype),
        "encoder_hidden_states": torch.randn(2, 154, width, dtype=dtype),
        "pooled_projections": torch.randn(2, width, dtype=dtype),
        "timestep": torch.tensor([500.0, 500.0]),
    }
    times = []
    with torch.no_grad():
        model(**inputs)
        for _ in range(repeat):
            started = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    """Time each dtype and print the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--widths", type=int, nargs="*", default=[32, 128, 256, 512, 1536])
    args = parser.parse_args()
    flops = 2 * TOKENS * WIDTH * HIDDEN
    rows = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        s = seconds_per_call(dtype, args.repeat)
        rows[name] = {"seconds": round(s, 4), "gflops": round(flops / s / 1e9, 1)}
    report = {
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "native_bf16": models.cpu_computes_bf16(),
        "auto_context_dtype": str(models.context_dtype("auto", torch.device("cpu"))),
        "linear": rows,
        "bf16_speedup": round(rows["fp32"]["seconds"] / rows["bf16"]["seconds"], 2),
        "fp16_speedup": round(rows["fp32"]["seconds"] / rows["fp16"]["seconds"], 2),
        "transformer": {},
    }
    for width in args.widths:
        fp32 = transformer_seconds(width, torch.float32, args.repeat)
        bf16 = transformer_seconds(width, torch.bfloat16, args.repeat)
        report["transformer"][str(width)] = {
            "fp32_s": round(fp32, 4),
            "bf16_s": round(bf16, 4),
            "bf16_speedup": round(fp32 / bf16, 2),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
