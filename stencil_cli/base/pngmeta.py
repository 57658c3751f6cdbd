"""Parameters carried in PNG text chunks: write an image with them, read them back."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from stencil_cli import __version__

PNG_KEY = "stencil"  # the text chunk holding every parameter as JSON


def png_bytes(image: Image.Image, meta: dict[str, Any]) -> bytes:
    """Encode `image` as PNG with `meta` in text chunks: one per key, plus all of it as JSON ("stencil")."""
    from PIL.PngImagePlugin import PngInfo  # with its logging: not at the start-up of store commands

    info_chunks = PngInfo()
    for key, value in meta.items():
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        info_chunks.add_itxt(key, text)
    info_chunks.add_itxt(PNG_KEY, json.dumps(meta, default=str))
    info_chunks.add_text("Software", f"stencil {__version__}")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info_chunks)
    return buffer.getvalue()


def read_png_parameters(path: Path) -> dict[str, Any]:
    """The parameters a stencil PNG carries (its 'stencil' JSON text chunk); {} if none."""
    with Image.open(path) as image:
        image.load()
        text = dict(getattr(image, "text", {}) or {})
    return json.loads(text[PNG_KEY]) if PNG_KEY in text else {}


def read_rgb(path: Path) -> Image.Image:
    """An image file as an RGB picture (closed after reading)."""
    with Image.open(path) as opened:
        return opened.convert("RGB")
