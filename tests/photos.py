"""Synthetic photos for tests: every mode and oddity photo intake has to handle."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from stencil_cli.store.db import Store


def make_photo(
    path: Path,
    size: tuple[int, int] = (320, 288),
    *,
    mode: str = "RGB",
    seed: int = 0,
    fmt: str | None = None,
    **save_kwargs: object,
) -> Path:
    """Write a small picture (a coloured square on a gradient) in `mode`; distinct per `seed`."""
    width, height = size
    image = Image.new("RGB", size, (20 + seed * 37 % 200, 120, 200 - seed * 13 % 150))
    draw = ImageDraw.Draw(image)
    draw.rectangle([width // 4, height // 4, width // 2, height // 2], fill=(250, 30 + seed % 200, 40))
    draw.line([0, 0, width, height], fill=(seed % 255, 255, 0), width=5)
    if mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(Image.new("L", size, 0))  # fully transparent: must come out white
        image.paste((255, 0, 0, 255), (0, 0, width // 8, height // 8))
    elif mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **save_kwargs)
    return path


def add_subject(cli: Any, tmp_path: Path, name: str = "robot", phrase: str | None = "toy robot") -> Store:
    """`stencil add` a subject of two plain photos (no captions) and return the open store."""
    from stencil_cli.store.db import open_store

    folder = tmp_path / f"photos-{name}"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (256, 256), (40 * i + 20, 90, 160)).save(folder / f"{i}.png")
    args = ["add", name, str(folder)] + (["--phrase", phrase] if phrase else [])
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return open_store()


def make_scene(path: Path, size: tuple[int, int] = (640, 512), **save_kwargs: object) -> Path:
    """Write a photo-like picture (sky-to-ground gradient, soft shapes in muted colours, as a camera sees
    them): unlike `make_photo`'s saturated flat colours, 8-bit YUV codecs keep it within 2 levels."""
    import numpy as np
    from PIL import ImageFilter

    width, height = size
    rows = np.linspace(0, 1, height)[:, None, None]
    columns = np.linspace(0, 1, width)[None, :, None]
    sky, ground = np.array([110, 160, 210]), np.array([120, 140, 90])
    pixels = (sky * (1 - rows) + ground * rows + 20 * columns).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse([width * 0.3, height * 0.3, width * 0.65, height * 0.75], fill=(190, 150, 110))
    draw.rectangle([width * 0.1, height * 0.12, width * 0.25, height * 0.4], fill=(90, 70, 60))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.filter(ImageFilter.GaussianBlur(1.5)).save(path, **save_kwargs)
    return path
