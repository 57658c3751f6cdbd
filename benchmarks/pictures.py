"""Make the pictures shown in docs/view.md from the DreamBench photos, through the real commands.

    python benchmarks/pictures.py [--photos ../shared/dreambench/backpack] [--out docs/img] [--keep DIR]

Builds a throwaway store (tiny random-weight models: the generated images are noise, the photos, masks,
labels and layout are what is shown), then runs what a user would: `add`, `caption --captioner template`,
`train` with previews, `gen` with three taus and `--grid` for two prompts, a subject edit (`--draft`), a plain
generation, `show --masks`, `eval` and `view`. It screenshots the page with headless Chromium (skipped with a
note when no `chromium` is installed) and writes small PNGs into `--out`: view.png (the page's first screen),
grid.png, loss.png, masks.png and scores.png (the bench chart from a results file of made-up numbers, since
the bench itself needs the eval models). Each is scaled down until it is under 150 KB.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "benchmarks"))
from browser import screenshot  # noqa: E402  (a benchmarks/ helper, not part of the package)

LIMIT = 150_000  # bytes per picture in docs/
TINY = ["--subject-model", "tiny", "--context-model", "tiny"]


def stencil(home: Path, *args: str) -> str:
    """Run one stencil command against the store at `home`; its stdout."""
    env = {**os.environ, "STENCIL_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "stencil_cli", *args], env=env, capture_output=True, text=True, cwd=home.parent
    )
    if done.returncode != 0:
        raise SystemExit(f"stencil {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def small_png(path: Path, target: Path, limit: int = LIMIT, width: int | None = None) -> int:
    """Copy the picture at `path` to `target` as a PNG under `limit` bytes (scaled down, then 256 colours
    if need be); its size in bytes."""
    with Image.open(path) as opened:
        picture = opened.convert("RGB")
    if width and picture.width > width:
        picture = picture.resize(
            (width, round(picture.height * width / picture.width)), Image.Resampling.LANCZOS
        )
    while True:
        for candidate in (picture, picture.quantize(256, dither=Image.Dither.NONE)):
            buffer = io.BytesIO()
            candidate.save(buffer, format="PNG", optimize=True)
            if buffer.tell() <= limit:
                target.write_bytes(buffer.getvalue())
                return buffer.tell()
        picture = picture.resize((picture.width * 4 // 5, picture.height * 4 // 5), Image.Resampling.LANCZOS)


def build(home: Path, photos: Path) -> dict[str, Path]:
    """A subject `backpack` with runs, images, masks and scores; the files the docs show."""
    stencil(home, "add", "backpack", str(photos), "--phrase", "backpack", "--class", "backpack")
    stencil(home, "caption", "backpack", "--captioner", "template")
    for steps in (20, 40):
        stencil(
            home,
            "train",
            "backpack",
            "--subject-model",
            "tiny",
            "--steps",
            str(steps),
            "--batch-size",
            "1",
            "--sample-every",
            "10",
            "--sample-prompt",
            "on a beach",
        )
    common = [*TINY, "--steps", "10", "--draft-steps", "4", "--inner-steps", "2"]
    stencil(
        home,
        "gen",
        "backpack",
        "in the jungle",
        "-n",
        "2",
        "--seed",
        "1",
        "--tau",
        "20,60,200",
        "--grid",
        *common,
    )
    stencil(home, "gen", "backpack", "on a snowy mountain", "-n", "2", "--seed", "5", *common)
    stencil(
        home, "gen", "backpack", "on a wooden table", "--draft", str(sorted(photos.glob("*"))[0]), *common
    )
    stencil(home, "gen", "backpack", "in the city", "--no-context", "-n", "2", *common)
    sheet = stencil(home, "show", "backpack", "--masks", "--json")
    stencil(home, "eval", "backpack", "--eval-models", "tiny")
    page = Path(stencil(home, "view", "backpack", "--no-open").strip())
    subject = home / "subjects" / "backpack"

    return {
        "page": page,
        "grid": next(subject.rglob("grid.png")),
        "loss": sorted(subject.rglob("loss.png"))[-1],
        "masks": Path(json.loads(sheet)["contact_sheet"]),
    }


def default_photos() -> Path:
    """The DreamBench backpack photos in the nearest `shared/dreambench/` above the checkout."""
    for folder in HERE.parents:
        if (folder / "shared" / "dreambench" / "backpack").is_dir():
            return folder / "shared" / "dreambench" / "backpack"
    return HERE / "dreambench" / "backpack"


def scores_chart(target: Path) -> int:
    """The bench chart of made-up scores for three subjects (the layout, not a measurement)."""
    sys.path.insert(0, str(HERE))
    from stencil_cli.verbs.bench import plot_scores

    rows = [
        {"subject": "backpack", "dino": 0.62, "clip_t": 0.30, "clip_i": 0.79},
        {"subject": "cat", "dino": 0.55, "clip_t": 0.31, "clip_i": 0.72},
        {"subject": "robot_toy", "dino": 0.49, "clip_t": 0.29, "clip_i": 0.70},
    ]
    overall = {key: sum(r[key] for r in rows) / len(rows) for key in ("dino", "clip_t", "clip_i")}
    target.write_bytes(plot_scores({"subjects": rows, "overall": overall}))
    return target.stat().st_size


def main() -> None:
    """Build the store, take the pictures, write them into --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--photos", type=Path, default=default_photos(), help="a folder of photos of one subject"
    )
    parser.add_argument("--out", type=Path, default=HERE / "docs" / "img")
    parser.add_argument("--keep", type=Path, help="build the store here and keep it (default: a temp dir)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.keep or Path(tempfile.mkdtemp(prefix="stencil-pictures-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        files = build(work / "store", args.photos.resolve())
        shot = work / "view-screenshot.png"
        if screenshot(files["page"], shot, (1280, 900)):
            print("view.png", small_png(shot, args.out / "view.png", width=1000), "bytes")
        else:
            print("no chromium: view.png not taken", file=sys.stderr)
        print("grid.png", small_png(files["grid"], args.out / "grid.png", width=900), "bytes")
        print("loss.png", small_png(files["loss"], args.out / "loss.png"), "bytes")
        print("masks.png", small_png(files["masks"], args.out / "masks.png", width=1000), "bytes")
        print("scores.png", scores_chart(args.out / "scores.png"), "bytes")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
