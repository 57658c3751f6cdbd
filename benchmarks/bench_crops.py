"""What placing crops on the subject costs: `prepare_training_data` on square photos (no extra pass) and on
tall photos (one more VAE encode and frozen UNet pass each, on the letterboxed photo), as a Markdown row.

    python benchmarks/bench_crops.py --model /work/fullsize/sd15 --resolution 256 --photos 2
    python benchmarks/bench_crops.py --model tiny                    # the tiny preset, built in memory

`--model` is a local SD1.5 folder (random full-size weights will do: time does not depend on the weights)
or `tiny`. Nothing is downloaded. The photos are synthetic.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stencil_cli import models  # noqa: E402
from stencil_cli.core.training import TrainConfig, prepare_training_data  # noqa: E402

CAPTION = "a photo of a toy robot on a wooden table"
PHRASE = "toy robot"


def photos(count: int, size: tuple[int, int]) -> list[Image.Image]:
    """`count` random photos of `size`."""
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)
    ]


def timed(pipe: object, images: list[Image.Image], config: TrainConfig) -> tuple[float, object]:
    """Seconds for one `prepare_training_data` call, and its result."""
    start = time.perf_counter()
    data = prepare_training_data(pipe, images, [CAPTION] * len(images), PHRASE, config)
    return time.perf_counter() - start, data


def main() -> None:
    """Parse options, time square and tall photos, print the Markdown rows."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--photos", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model == "tiny":
        pipe = models.build_tiny_subject_pipeline()
    else:
        pipe = models.load_subject_pipeline(args.model, device="cpu", precision="fp32")
    config = TrainConfig(resolution=args.resolution, batch_size=args.photos)
    side = args.resolution * 2
    timed(pipe, photos(1, (side, side)), config)  # warm-up
    square_s, square = timed(pipe, photos(args.photos, (side, side)), config)
    tall_s, tall = timed(pipe, photos(args.photos, (side, side * 2)), config)
    where = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    print("| model | device | px | photos | square s | tall s | extra per tall photo s | masks |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {Path(args.model).name} | {where} | {args.resolution} | {args.photos} | {square_s:.1f} "
        f"| {tall_s:.1f} | {(tall_s - square_s) / args.photos:.1f} | {tuple(tall.masks.shape)} |"  # type: ignore[attr-defined]
    )
    assert tuple(square.masks.shape) == tuple(tall.masks.shape)  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
