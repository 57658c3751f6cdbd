"""Parameters carried in PNG text chunks: write an image with them, read them back."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from stencil_cli import __version__

PNG_KEY = "stencil"  # the text chunk holding every parameter as JSON
A1111_KEY = "parameters"  # the chunk A1111's PNG Info, ComfyUI and image sites read
# chunk names ComfyUI reads as its own JSON before it looks at `parameters` (its PNG loader parses `workflow`,
# then `prompt`, with JSON.parse): stencil's per-key chunks of these names are written as `stencil:<key>`
FOREIGN_KEYS = frozenset({"workflow", "prompt"})
SAMPLER = "DDIM"  # the subject model's scheduler (stencil always denoises with DDIM)
# stencil's own settings, written after A1111's fields as extra `key: value` pairs (A1111 keeps unknown keys)
EXTRA_FIELDS = (
    ("Stencil mode", "mode"),
    ("Stencil tau", "tau"),
    ("Stencil injected steps", "injected_steps"),
    ("Stencil draft model", "context_model"),
    ("Stencil draft prompt", "draft_prompt"),
    ("Stencil inversion", "inversion"),
    ("Stencil subject", "subject"),
    ("Stencil run", "run_id"),
    ("Stencil LoRA scale", "lora_scale"),
)


def _a1111_value(value: Any) -> str:
    """A value as A1111's infotext writes it: quoted (JSON) when it holds a comma, colon or newline."""
    text = value if isinstance(value, str) else json.dumps(value)
    return json.dumps(text) if any(c in text for c in ',:\n"') else text


def a1111_parameters(meta: dict[str, Any]) -> str | None:
    """The `parameters` text of an image in AUTOMATIC1111's infotext format; None for meta without a prompt.

    ``PROMPT\nNegative prompt: NEG\nSteps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 512x512,
    Model: ID, Stencil tau: 60, ...``: the prompt, then A1111's own fields, then stencil's as extra pairs."""
    prompt = meta.get("prompt")
    if not isinstance(prompt, str):
        return None
    lines = [prompt.replace("\n", " ")]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {str(meta['negative_prompt']).replace(chr(10), ' ')}")
    size = meta.get("resolution")
    fields = [
        ("Steps", meta.get("steps")),
        ("Sampler", SAMPLER),
        ("CFG scale", meta.get("guidance")),
        ("Seed", meta.get("seed")),
        ("Size", f"{size}x{size}" if size else None),
        ("Model", meta.get("subject_model")),
    ]
    fields += [(label, meta.get(key)) for label, key in EXTRA_FIELDS]
    lines.append(", ".join(f"{label}: {_a1111_value(value)}" for label, value in fields if value is not None))
    return "\n".join(lines)


def png_bytes(image: Image.Image, meta: dict[str, Any]) -> bytes:
    """Encode `image` as PNG with `meta` in text chunks: one per key, plus all of it as JSON ("stencil")."""
    from PIL.PngImagePlugin import PngInfo  # with its logging: not at the start-up of store commands

    info_chunks = PngInfo()
    for key, value in meta.items():
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        info_chunks.add_itxt(f"{PNG_KEY}:{key}" if key in FOREIGN_KEYS else key, text)
    info_chunks.add_itxt(PNG_KEY, json.dumps(meta, default=str))
    parameters = a1111_parameters(meta)
    if parameters is not None and A1111_KEY not in meta:
        info_chunks.add_itxt(A1111_KEY, parameters)
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
