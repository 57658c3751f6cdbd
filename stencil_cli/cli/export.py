"""`stencil export`: a trained run as weights other tools load (diffusers / kohya LoRA, a diffusers folder,
one single-file checkpoint), with a model card beside it.

Parse, call the export verb (`verbs/export.py`), present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stencil_cli.base import events
from stencil_cli.cli.kit import JsonOption, handle_errors
from stencil_cli.cli.options import DeviceOption
from stencil_cli.cli.output import escape, human_bytes, info, print_json, warn
from stencil_cli.store.db import open_store
from stencil_cli.verbs.export import ExportRequest, ExportResult
from stencil_cli.verbs.export import export as export_verb

FLAGS = {"run_id": "--run", "path": "-o", "format": "--format"}
HIGH_ERROR = 0.5  # above this overall SVD error, suggest a higher --rank


def _progress(event: events.Event) -> None:
    """The verb's progress events as messages on stderr (an export is one long step)."""
    match event:
        case events.Loading(model=model, device=device):
            info(f"loading base model {escape(model)} on {device} ...")
        case events.Exporting(format=fmt):
            info(f"exporting as {fmt} ...")


@handle_errors(flags=FLAGS)
def export(
    name: Annotated[str, typer.Argument(help="Subject name.")],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Where to write (a .safetensors file; a folder for --format diffusers). "
            "A model card is written beside it.",
            show_default=False,
        ),
    ],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="kohya (LoRA for ComfyUI, A1111 and diffusers), lora (diffusers/peft LoRA: diffusers only), "
            "diffusers (pipeline folder), single-file (A1111/ComfyUI checkpoint).",
        ),
    ] = "kohya",
    run_id: Annotated[
        int | None,
        typer.Option(
            "--run",
            help="Run to export (default: the newest finished run).",
            show_default=False,
        ),
    ] = None,
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank",
            help="LoRA rank when extracting a LoRA from a full-decoder run (lora/kohya only; default 32).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace an existing export (a file and its card, or a diffusers folder)."
        ),
    ] = False,
    save_dtype: Annotated[
        str, typer.Option("--save-dtype", help="dtype of the exported tensors: fp16, bf16 or fp32.")
    ] = "fp16",
    device: DeviceOption = None,
    json_output: JsonOption = False,
) -> None:
    """Export a trained run as a LoRA, a diffusers folder or a single-file checkpoint, with a model card."""
    request = ExportRequest(
        name=name,
        format=fmt,
        path=output,
        run_id=run_id,
        rank=rank,
        force=force,
        save_dtype=save_dtype,
        device=device,
    )
    result = export_verb(open_store(), request, progress=_progress)
    _present(result, json_output)


def _present(result: ExportResult, json_output: bool) -> None:
    """The written path on stdout (or the JSON), what was made and the SVD error on stderr."""
    error = result.error
    if json_output:
        print_json(result.to_dict())
    else:
        typer.echo(str(result.path))
    what = {
        "lora": "diffusers LoRA",
        "kohya": "kohya LoRA",
        "diffusers": "diffusers folder",
        "single-file": "single-file checkpoint",
    }[result.format]
    if result.rank is not None:
        what += f" rank {result.rank}"
    source = f"{'LoRA' if result.kind == 'lora' else 'full'} run {result.run.id}"
    info(
        f"wrote {escape(result.path.name)} ({human_bytes(result.bytes)}, {what} from {source}); "
        f"model card {escape(str(result.card))}"
    )
    if result.kept_fp32:
        info(
            f"{result.kept_fp32} trained tensors kept in fp32: the export dtype would round their update "
            "back to the base weights"
        )
    if error is None:
        return
    info(
        f"SVD rank {error['rank']}: relative error of the weight difference {error['overall']:.3f} overall, "
        f"worst layer {error['worst']:.3f} ({escape(error['worst_layer'])}); biases and norms left out: "
        f"{error['left_out']:.3f} of the difference ({error['left_out_tensors']} tensors)"
    )
    if error["overall"] > HIGH_ERROR:
        warn(
            f"the rank-{error['rank']} LoRA misses much of the fine-tune (error {error['overall']:.2f}): "
            "export again with a higher --rank, or use --format diffusers / single-file for the exact weights"
        )


def register(app: typer.Typer) -> None:
    """Register `stencil export` on `app`."""
    app.command()(export)
