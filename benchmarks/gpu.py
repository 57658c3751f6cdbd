"""Every GPU row of docs/performance.md in one run: one JSON object and one Markdown table (gpu.sh).

    python benchmarks/gpu.py --out DIR                 # one H100/H200, about 5-8 minutes, no network
    python benchmarks/gpu.py --out DIR --dry-run       # the same rows on the tiny preset, CPU, tiny sizes

Rows: 100 training steps of SD1.5 at 512 px, batch 6 (bf16 autocast) and the same with LoRA rank 16
(seconds, peak GPU memory); one context-guided image at the paper's settings (50 draft steps, 50 DDIM steps,
10 inner iterations, tau 60; SD3 Medium without T5); `-n 4` batched against one by one; and
benchmarks/run.py's stages, stencil against the authors' pipeline (benchmarks/reference.py), with both
sides' seconds, peak GPU memory and model passes. Each row is one benchmark script run as its own process
with its own time limit; a row that fails or runs out of time is recorded as such and the rest still run.
Nothing is downloaded: the full-size models are built with random weights.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Row:
    """One benchmark process: its name, the script and arguments (GPU and dry run), its time limit."""

    name: str
    what: str
    script: str
    gpu_args: tuple[str, ...]
    dry_args: tuple[str, ...]
    limit_s: int


ROWS = (
    Row(
        "train",
        "100 training steps, SD1.5 decoder, batch 6, 512 px, bf16 autocast (target <= 10 s, < 16 GB)",
        "bench_train.py",
        ("--preset", "full", "--device", "cuda", "--header"),
        ("--preset", "tiny", "--steps", "2", "--warmup", "1", "--header"),
        120,
    ),
    Row(
        "train_lora",
        "the same with LoRA rank 16 on the decoder",
        "bench_train.py",
        ("--preset", "full", "--device", "cuda", "--lora", "16", "--header"),
        ("--preset", "tiny", "--steps", "2", "--warmup", "1", "--lora", "4", "--header"),
        120,
    ),
    Row(
        "image",
        "one context-guided image at the paper's settings, SD3 Medium without T5 (target <= 8 s)",
        "bench_generate.py",
        ("--preset", "full", "--device", "cuda", "--warmup", "--no-t5", "--header"),
        ("--preset", "tiny", "--steps", "2", "--draft-steps", "2", "--inner-steps", "1", "--header"),
        120,
    ),
    Row(
        "batch_n4",
        "-n 4: one by one against batched (batch size 4), images/minute, peak GPU memory (target <= 20 s)",
        "bench_batch.py",
        (
            "--preset",
            "full",
            "--device",
            "cuda",
            "-n",
            "4",
            "--batch-sizes",
            "4",
            "--repeat",
            "1",
            "--no-t5",
            "--json",
        ),
        (
            "--preset",
            "tiny",
            "-n",
            "2",
            "--batch-sizes",
            "2",
            "--repeat",
            "1",
            "--steps",
            "2",
            "--draft-steps",
            "2",
            "--inner-steps",
            "1",
            "--json",
        ),
        150,
    ),
    Row(
        "stages",
        "benchmarks/run.py: every stage, stencil against the authors' pipeline (seconds, memory, passes)",
        "run.py",
        ("--preset", "full", "--device", "cuda", "--no-t5", "--repeat", "1", "--json"),
        (
            "--preset",
            "tiny",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--photos",
            "2",
            "--ddim-steps",
            "2",
            "--inner-steps",
            "1",
            "--draft-steps",
            "2",
            "--no-warmup",
            "--json",
        ),
        240,
    ),
)


def run_row(row: Row, dry_run: bool, budget_s: float) -> dict[str, Any]:
    """Run one row's script; its output (parsed when JSON), seconds and status."""
    args = row.dry_args if dry_run else row.gpu_args
    limit = max(1.0, min(row.limit_s, budget_s))
    command = [sys.executable, str(HERE / row.script), *args]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        return {"status": f"timed out after {limit:.0f} s", "seconds": round(limit, 1), "output": out}
    seconds = round(time.perf_counter() - started, 1)
    result: dict[str, Any] = {"status": "ok" if done.returncode == 0 else f"failed ({done.returncode})"}
    result["seconds"] = seconds
    text = done.stdout.strip()
    try:
        result["result"] = json.loads(text)
    except ValueError:
        result["output"] = text
    if done.returncode != 0:
        result["error"] = done.stderr.strip().splitlines()[-5:]
    return result


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one section per row (its table as the script printed it)."""
    lines = [
        f"# GPU rows ({report['device']}, {report['date']}, torch {report['torch']})",
        "",
        f"Total {report['seconds']} s{' (dry run: tiny preset, CPU)' if report['dry_run'] else ''}.",
    ]
    for name, row in report["rows"].items():
        lines += ["", f"## {name}: {row['what']}", "", f"{row['status']}, {row['seconds']} s", ""]
        if "output" in row and row["output"]:
            lines.append(row["output"])
        elif "result" in row:
            result = row["result"]
            if name == "stages":
                sys.path.insert(0, str(HERE))
                import run as stages_bench

                lines.append(stages_bench.table(result))
            else:
                lines += ["```json", json.dumps(result, indent=1), "```"]
        for line in row.get("error", []):
            lines.append(f"    {line}")
    return "\n".join(lines) + "\n"


def device_name(dry_run: bool) -> tuple[str, str]:
    """The GPU's name (or the CPU's, for a dry run) and torch's version."""
    import torch

    if not dry_run and torch.cuda.is_available():
        return torch.cuda.get_device_name(0), torch.__version__
    return "cpu (dry run)" if dry_run else "no CUDA device", torch.__version__


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every row within the budget, write gpu.json and gpu.md into --out; return the report."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md")
    parser.add_argument("--dry-run", action="store_true", help="tiny preset on the CPU, tiny sizes")
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for all rows (default 470)")
    parser.add_argument("--rows", default=",".join(r.name for r in ROWS), help="comma list of rows to run")
    args = parser.parse_args(argv)
    wanted = [name.strip() for name in args.rows.split(",") if name.strip()]
    unknown = sorted(set(wanted) - {r.name for r in ROWS})
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}: use {', '.join(r.name for r in ROWS)}")
    device, torch_version = device_name(args.dry_run)
    if not args.dry_run and device == "no CUDA device":
        parser.error("no CUDA device: run on a GPU machine, or pass --dry-run")
    started = time.perf_counter()
    rows: dict[str, Any] = {}
    for row in ROWS:
        if row.name not in wanted:
            continue
        left = args.budget - (time.perf_counter() - started)
        if left < 10:
            rows[row.name] = {"what": row.what, "status": "skipped (budget spent)", "seconds": 0}
            continue
        rows[row.name] = {"what": row.what, **run_row(row, args.dry_run, left)}
    report = {
        "device": device,
        "torch": torch_version,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "dry_run": args.dry_run,
        "seconds": round(time.perf_counter() - started, 1),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (args.out / "gpu.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
