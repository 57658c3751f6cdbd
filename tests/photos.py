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
