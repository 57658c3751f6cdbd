"""Re-run an image's settings: the GenerateRequest a stencil PNG's parameters describe (`gen --from-png`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stencil_cli.base.errors import FieldError
from stencil_cli.base.pngmeta import read_png_parameters
from stencil_cli.verbs.generation_plan import GenerateRequest

# request field <- the PNG's parameter of the same meaning (what `image_metadata` writes)
CARRIED = {
    "seed": "seed",
    "steps": "steps",
    "guidance": "guidance",
    "inversion": "inversion",
    "inner_steps": "inner_steps",
    "null_lr": "null_lr",
    "draft_steps": "draft_steps",
    "negative": "negative_prompt",
    "run_id": "run_id",
    "subject_model": "subject_model",
    "context_model": "context_model",
    "lora_scale": "lora_scale",
}


def image_parameters(path: Path) -> dict[str, Any]:
    """The parameters a generated image carries, or a FieldError('from_png') saying why there are none."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise FieldError("from_png", f"{{}} {path} is a folder: give one image stencil generated")
    if not path.is_file():
        raise FieldError("from_png", f"{{}} {path}: no such file")
    try:
        meta = read_png_parameters(path)
    except Exception as error:  # noqa: BLE001 - Pillow and json raise many types for other files
        raise FieldError(
            "from_png", f"{{}} {path} is not a PNG stencil can read ({type(error).__name__})"
        ) from None
    if not meta.get("prompt") or not meta.get("subject"):
        role = "a draft" if meta.get("role") == "draft" else "not an image stencil generated"
        raise FieldError(
            "from_png", f"{{}} {path} is {role}: it carries no prompt and subject to render again"
        )
    return meta


def request_from_png(path: Path, name: str | None = None) -> GenerateRequest:
    """The request that renders `path`'s image again: its subject (or `name`), prompt, seed, tau, run and
    every setting it records. A subject-editing image re-runs with its draft picture when that file is
    still where it was."""
    meta = image_parameters(path)
    values = {field: meta[key] for field, key in CARRIED.items() if meta.get(key) is not None}
    mode = meta.get("mode", "context")
    request = GenerateRequest(
        name=name or str(meta["subject"]),
        prompts=[str(meta["prompt"])],
        taus=[float(meta["tau"])] if meta.get("tau") is not None else [60.0],
        no_context=mode == "plain",
        **values,
    )
    if mode == "context" and meta.get("draft_prompt"):
        request.draft_prompt = str(meta["draft_prompt"])  # as drawn: not rewritten or rebuilt again
    if mode == "edit":
        source = Path(str(meta.get("draft_source") or ""))
        if not source.is_file():
            raise FieldError(
                "from_png",
                f"{{}} {path} was edited from the draft picture {source}, which is gone: "
                "render it again with that picture as the draft",
            )
        request.draft = source
    return request
