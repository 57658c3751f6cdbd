"""PNG metadata other tools read: A1111's `parameters` infotext beside stencil's own chunks."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from stencil_cli.base.pngmeta import PNG_KEY, a1111_parameters, png_bytes, read_png_parameters

META = {
    "prompt": "a photo of a toy robot, in the jungle",
    "negative_prompt": "blurry",
    "seed": 7,
    "tau": 60.0,
    "injected_steps": 3,
    "steps": 50,
    "guidance": 7.5,
    "mode": "context",
    "subject": "robot",
    "subject_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "context_model": "stabilityai/stable-diffusion-3-medium-diffusers",
    "run_id": 3,
    "resolution": 512,
}


def _text(data: bytes) -> dict[str, str]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return dict(image.text)


def test_a_generated_png_carries_a1111_parameters_beside_stencils_chunks() -> None:
    text = _text(png_bytes(Image.new("RGB", (8, 8)), META))
    assert json.loads(text[PNG_KEY])["seed"] == 7  # stencil's own JSON, unchanged
    prompt, negative, fields = text["parameters"].split("\n")
    assert prompt == META["prompt"] and negative == "Negative prompt: blurry"
    assert fields.startswith(
        "Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 7, Size: 512x512, "
        "Model: stable-diffusion-v1-5/stable-diffusion-v1-5, "
    )
    assert "Stencil tau: 60.0" in fields and "Stencil draft model: stabilityai/" in fields
    assert "Stencil run: 3" in fields


def test_a1111_values_with_commas_or_colons_are_quoted() -> None:
    text = a1111_parameters({**META, "draft_prompt": 'a robot, "tin": shiny'})
    assert text is not None
    assert 'Stencil draft prompt: "a robot, \\"tin\\": shiny"' in text


def test_a_draft_or_a_sheet_without_a_prompt_gets_no_parameters_chunk() -> None:
    text = _text(png_bytes(Image.new("RGB", (8, 8)), {"role": "draft", "seed": 1}))
    assert "parameters" not in text and PNG_KEY in text


def test_no_chunk_comfyui_parses_as_its_own_json_graph(tmp_path: Path) -> None:
    """ComfyUI's PNG loader JSON-parses `workflow`, then `prompt`, before it imports `parameters`."""
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(Image.new("RGB", (8, 8)), META))
    with Image.open(path) as image:
        chunks = dict(image.text)
    assert "workflow" not in chunks and "prompt" not in chunks
    assert chunks["stencil:prompt"] == META["prompt"] and chunks["parameters"].startswith(META["prompt"])
    assert read_png_parameters(path) == META
