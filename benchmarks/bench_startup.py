"""Start-up cost of a store command: wall time and peak memory of whole `stencil ls --json` processes.

    python benchmarks/bench_startup.py [--runs 7] [--photos 10] [--repo PATH]

Builds a throwaway store with one subject of `--photos` photos, then runs `python -m stencil_cli ls
--json` `--runs` times as separate processes (the way a shell loop pays for it) and prints the median wall
time and the median peak resident memory (from the child's rusage). `--repo` measures another checkout (e.g.
an older commit in a worktree) with the same Python, for a before/after in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    """Parse the arguments, measure, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--photos", type=int, default=10)
    parser.add_argument(
        "--repo", type=Path, action="append", help="checkout(s) to measure (default: this one)"
    )
    args = parser.parse_args()
    results = {str(repo): measure(repo.resolve(), args.runs, args.photos) for repo in (args.repo or [HERE])}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
