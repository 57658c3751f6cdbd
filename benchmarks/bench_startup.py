"""Fixed cost per process: whole `stencil ls --json` processes, or whole `stencil gen` processes.

    python benchmarks/bench_startup.py [--runs 7] [--photos 10] [--repo PATH]
    python benchmarks/bench_startup.py --gen [--runs 5] [--repo BEFORE --repo .]
    python benchmarks/bench_startup.py --gen --models /work/fullsize/sd15 /work/fullsize/sd3-medium-no-t5

Store commands: builds a throwaway store with one subject of `--photos` photos, then runs `python -m
stencil_cli ls --json` `--runs` times as separate processes (the way a shell loop pays for it) and prints the
median wall time and the median peak resident memory (from the child's rusage).

`--gen`: builds a throwaway store with a trained subject (`stencil demo` on the tiny preset, or with `--models
SUBJECT CONTEXT` a full-size subject trained for one step at `--resolution`), then runs `python -m stencil_cli
gen SUBJECT "on a beach" --steps 10 --seed 0 --json` (`--steps`, and `--draft-steps` at full size, change the
sizes: the start and the end of a process do not depend on them) `--runs` times, each a whole process, with
stdout and stderr read line by line as they come. Per process: the seconds from the start to the first model
step (the first stage's first progress line, printed when its model is loaded and its loop starts), from the
last image (its JSON line) to the process's exit, the model seconds the image reports (draft + inversion +
denoise), and the rest (wall - model): the non-model part. Medians are printed.

`--repo` measures another checkout (e.g. main in a worktree: `git worktree add /tmp/perf-before main`) with
the same Python, for a before/after in one run; the checkouts alternate run by run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]


def make_store(home: Path, photos: int, repo: Path) -> None:
    """A store with one subject of `photos` synthetic photos (added through the CLI of `repo`)."""
    from PIL import Image

    folder = home / "photos"
    folder.mkdir(parents=True)
    for i in range(photos):
        Image.new("RGB", (256, 256), (i * 20 % 255, 100, 150)).save(folder / f"p{i}.png")
    env = {**os.environ, "STENCIL_HOME": str(home / "store"), "PYTHONPATH": str(repo)}
    subprocess.run(
        [sys.executable, "-m", "stencil_cli", "add", "cat", str(folder), "--phrase", "cat"],
        env=env,
        check=True,
        capture_output=True,
        cwd=repo,
    )


def one_run(home: Path, repo: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one `ls --json` process."""
    env = {**os.environ, "STENCIL_HOME": str(home / "store"), "PYTHONPATH": str(repo)}
    started = time.perf_counter()
    # run from the store's parent, as a user would (not from the checkout: a source tree as the working
    # directory changes what the interpreter scans at start-up)
    process = subprocess.Popen(
        [sys.executable, "-m", "stencil_cli", "ls", "--json"], env=env, cwd=home, stdout=subprocess.PIPE
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    output = process.stdout.read() if process.stdout else b""
    if status != 0 or not json.loads(output):
        raise SystemExit(f"ls failed in {repo}: status {status}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def measure(repo: Path, runs: int, photos: int) -> dict[str, float]:
    """Median wall seconds and peak MiB over `runs` processes."""
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch)
        make_store(home, photos, repo)
        samples = [one_run(home, repo) for _ in range(runs)]
    return {
        "wall_s": round(statistics.median(s[0] for s in samples), 3),
        "peak_mib": round(statistics.median(s[1] for s in samples), 1),
        "runs": runs,
    }


GEN_PROMPT = "on a beach"
STAGE_START = re.compile(r": 0/\d+ \(0%\)")  # a plain progress line that starts a stage


def _env(home: Path, repo: Path) -> dict[str, str]:
    return {
        **os.environ,
        "STENCIL_HOME": str(home / "store"),
        "PYTHONPATH": str(repo),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


def make_gen_store(
    home: Path, repo: Path, models: list[str] | None, resolution: int, steps: int = 10, draft_steps: int = 4
) -> list[str]:
    """A store with a trained subject; returns the `gen` arguments that render it (`steps` DDIM steps;
    `draft_steps` for the full-size context model)."""
    env = _env(home, repo)
    cli = [sys.executable, "-m", "stencil_cli", "-q"]
    if models is None:
        subprocess.run(
            [*cli, "demo", "--train-steps", "2", "--steps", "2"],
            env=env,
            check=True,
            cwd=home,
            capture_output=True,
        )
        return ["gen", "demo", GEN_PROMPT, "--steps", str(steps), "--seed", "0", "--context-model", "tiny"]
    from PIL import Image

    folder = home / "photos"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (resolution, resolution), (40 * i, 100, 150)).save(folder / f"p{i}.png")
    setup = [
        ["add", "robot", str(folder), "--phrase", "toy robot"],
        ["caption", "robot", "--captioner", "template"],
        [
            "train",
            "robot",
            "--steps",
            "1",
            "--batch-size",
            "1",
            "--resolution",
            str(resolution),
            "--subject-model",
            models[0],
        ],
    ]
    for args in setup:
        subprocess.run([*cli, *args], env=env, check=True, cwd=home, capture_output=True)
    return [
        "gen",
        "robot",
        GEN_PROMPT,
        "--steps",
        str(steps),
        "--seed",
        "0",
        "--context-model",
        models[1],
        "--no-t5",
        "--draft-steps",
        str(draft_steps),
        "--inner-steps",
        "2",
    ]


def _read_lines(stream: Any, sink: list[tuple[float, str]]) -> None:
    for line in iter(stream.readline, ""):
        sink.append((time.perf_counter(), line))


def one_gen(home: Path, repo: Path, args: list[str]) -> dict[str, float]:
    """One whole `gen` process: start -> first model step, last image -> exit, model seconds, wall."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "stencil_cli", *args, "--json"],
        env=_env(home, repo),
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out: list[tuple[float, str]] = []
    err: list[tuple[float, str]] = []
    readers = [
        threading.Thread(target=_read_lines, args=pair)
        for pair in ((process.stdout, out), (process.stderr, err))
    ]
    for reader in readers:
        reader.start()
    _, status, usage = os.wait4(process.pid, 0)
    ended = time.perf_counter()
    for reader in readers:
        reader.join()
    images = [(t, json.loads(line)) for t, line in out if line.startswith("{")]
    first = next((t for t, line in err if STAGE_START.search(line)), None)
    if status != 0 or not images or first is None:
        tail = "".join(line for _, line in err[-5:])
        raise SystemExit(f"gen failed in {repo}: status {status}\n{tail}")
    last_time, last = images[-1]
    model = sum(float(v) for v in last["params"]["timings_s"].values())
    wall = ended - started
    return {
        "start_to_first_step_s": first - started,
        "last_image_to_exit_s": ended - last_time,
        "model_s": model,
        "non_model_s": wall - model,
        "wall_s": wall,
        "peak_mib": usage.ru_maxrss / 1024,
    }


def measure_gen(
    repos: list[Path],
    runs: int,
    models: list[str] | None,
    resolution: int,
    steps: int = 10,
    draft_steps: int = 4,
) -> dict[str, Any]:
    """Medians of `runs` whole gen processes per checkout, the checkouts alternating run by run."""
    with tempfile.TemporaryDirectory() as scratch:
        homes, args = {}, {}
        for k, repo in enumerate(repos):
            homes[repo] = Path(scratch) / f"repo{k}"
            homes[repo].mkdir()
            args[repo] = make_gen_store(homes[repo], repo, models, resolution, steps, draft_steps)
        samples: dict[Path, list[dict[str, float]]] = {repo: [] for repo in repos}
        for r in range(runs):
            for repo in repos if r % 2 == 0 else repos[::-1]:
                samples[repo].append(one_gen(homes[repo], repo, args[repo]))
    return {
        str(repo): {
            **{key: round(statistics.median(s[key] for s in rows), 3) for key in rows[0]},
            "runs": runs,
            "wall_runs_s": [round(s["wall_s"], 2) for s in rows],
        }
        for repo, rows in samples.items()
    }


def main() -> None:
    """Parse the arguments, measure, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--photos", type=int, default=10)
    parser.add_argument(
        "--repo", type=Path, action="append", help="checkout(s) to measure (default: this one)"
    )
    parser.add_argument("--gen", action="store_true", help="whole `stencil gen` processes instead of `ls`")
    parser.add_argument("--models", nargs=2, metavar=("SUBJECT", "CONTEXT"), help="--gen: full-size folders")
    parser.add_argument("--resolution", type=int, default=256, help="--gen --models: image size")
    parser.add_argument("--steps", type=int, default=10, help="--gen: DDIM steps of each image")
    parser.add_argument("--draft-steps", type=int, default=4, help="--gen --models: the draft's steps")
    args = parser.parse_args()
    repos = [repo.resolve() for repo in (args.repo or [HERE])]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if args.gen:
        results: dict[str, Any] = measure_gen(
            repos, args.runs, args.models, args.resolution, args.steps, args.draft_steps
        )
    else:
        results = {str(repo): measure(repo, args.runs, args.photos) for repo in repos}
    results["load_average"] = {"start": load, "end": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
