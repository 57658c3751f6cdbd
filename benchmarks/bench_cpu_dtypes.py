"""How fast this CPU multiplies in fp32, bf16 and fp16: the reason the draft runs in bf16 on some CPUs.

    OMP_NUM_THREADS=1 python benchmarks/bench_cpu_dtypes.py [--repeat 5]

One linear layer at an SD3 Medium shape (a batch of 2 x 410 tokens, 1536 -> 6144, the joint transformer's
MLP), timed per dtype on the CPU (median of `--repeat` calls after one warm-up); prints JSON with seconds,
GFLOP/s and whether torch sees native bf16 (AVX512-BF16 or AMX: `models.cpu_computes_bf16`).
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


def main() -> None:
    """Time each dtype and print the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
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
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
