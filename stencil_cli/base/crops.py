"""Square crops that keep the subject: choose where a non-square photo is cut, given where its subject is.

Training needs square crops (METHOD.md, section 2: shorter side to the resolution, then a square). A centre
crop cuts off a subject that is not in the middle (a dog at the top of a portrait photo loses its head), so
the crop is chosen from a map of the subject over the whole photo (the mask pass on the letterboxed photo,
`letterbox` + `box_from_canvas_mask`): the square of the photo's shorter side that holds the most of the
subject, centred on it where several do. A square photo, or an empty map, keeps the centre crop.
Boxes are (left, top, right, bottom) in the photo's pixels.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]
CropChoice = Literal["subject", "centre"]  # a non-square photo's square: on its subject, or its middle
CROP_CHOICES: tuple[CropChoice, ...] = get_args(CropChoice)
LETTERBOX_FILL = (127, 127, 127)  # about 0 once scaled to [-1, 1]: no colour for the mask pass to see


def centre_box(width: int, height: int) -> Box:
    """The centred square of side min(width, height)."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def subject_box(width: int, height: int, subject: np.ndarray) -> Box:
    """The square of side min(width, height) holding the most of `subject` (a map of any resolution laid
    over the whole photo, larger where the subject is), centred on the subject among equally good ones."""
    side = min(width, height)
    weights = np.clip(np.asarray(subject, dtype=np.float64), 0.0, None)
    if width == height or weights.ndim != 2 or not np.isfinite(weights).all() or weights.sum() <= 0:
        return centre_box(width, height)
    wide = width > height
    profile = weights.sum(axis=0 if wide else 1)  # the subject along the photo's long side
    long_px = width if wide else height
    cells = len(profile)
    cell_px = long_px / cells
    window = min(cells, max(1, round(side / cell_px)))
    sums = np.convolve(profile, np.ones(window), mode="valid")  # the subject inside each window position
    best = np.flatnonzero(sums >= sums.max() * (1 - 1e-9))
    centroid = float((profile * (np.arange(cells) + 0.5)).sum() / profile.sum())
    # among windows holding the same, the one whose centre is nearest the subject's
    offset = int(best[np.argmin(np.abs(best + window / 2 - centroid))])
    start = min(max(0, round(offset * cell_px)), long_px - side)
    return (start, 0, start + side, side) if wide else (0, start, side, start + side)


def crop_resize(image: Image.Image, box: Box, size: int) -> Image.Image:
    """The square `box` of `image` resized to `size` x `size` (bicubic); a square photo's full box is the
    same as `images.center_crop_resize`."""
    return image.resize((size, size), Image.Resampling.BICUBIC, box=box)


def letterbox(image: Image.Image, size: int) -> tuple[Image.Image, Box]:
    """The whole photo scaled to fit a `size` x `size` square, centred on grey, and where it lies there."""
    scale = size / max(image.size)
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGB", (size, size), LETTERBOX_FILL)
    left, top = (size - width) // 2, (size - height) // 2
    canvas.paste(image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC), (left, top))
    return canvas, (left, top, left + width, top + height)


def box_from_canvas_mask(photo_size: tuple[int, int], mask: np.ndarray, placed: Box, canvas: int) -> Box:
    """The subject-keeping box of a photo from a mask computed on its letterboxed canvas (`letterbox`):
    the mask (any resolution over the canvas) is cut to where the photo lies, the grey border left out."""
    grid = np.asarray(mask, dtype=np.float64)
    rows, cols = grid.shape
    left, top, right, bottom = placed
    x0, x1 = int(left * cols / canvas), max(int(left * cols / canvas) + 1, round(right * cols / canvas))
    y0, y1 = int(top * rows / canvas), max(int(top * rows / canvas) + 1, round(bottom * rows / canvas))
    return subject_box(*photo_size, grid[y0:y1, x0:x1])
