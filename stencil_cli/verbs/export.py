"""Export a trained run in the formats other tools load: a diffusers or kohya LoRA, a diffusers pipeline
folder, one single-file checkpoint (see `stencil_cli.core.export` for the formats).

`export(store, ExportRequest) -> ExportResult` settles the run and refuses bad requests (format, run, rank,
paths) before any model loads, then loads the run's base model at full precision and writes the export and
its model card. Nothing is written when a request is refused; a crash leaves no half file under the target
name (the ML core writes to a temp name and moves it into place).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stencil_cli import models
from stencil_cli.base.errors import BadInputError, FieldError
from stencil_cli.base.events import Exporting, Loading, Progress, no_progress
from stencil_cli.base.targets import (
    check_replaceable,
    probe_writable_folder,
    refuse_inside_store,
    refuse_special_file,
)
from stencil_cli.models.devices import DtypeName
from stencil_cli.store.db import Store
from stencil_cli.store.records import Run
from stencil_cli.store.settings import resolve_setting
from stencil_cli.verbs.generation_plan import trained_run

if TYPE_CHECKING:  # the ML core loads torch: the verb imports it when it runs, not at start-up
    from stencil_cli.core.export import ExportFormat
    from stencil_cli.core.weights import WeightsKind

# stencil_cli.core.export's FORMATS, LORA_FORMATS and SAVE_DTYPES, without loading torch (checked by a test)
FORMATS: tuple[ExportFormat, ...] = ("lora", "kohya", "diffusers", "single-file")
LORA_FORMATS: tuple[ExportFormat, ...] = ("lora", "kohya")
SAVE_DTYPES: tuple[DtypeName, ...] = ("fp16", "bf16", "fp32")
EXPORT_MARKER = "stencil_export.json"  # marks a diffusers folder as an earlier export (core.export writes it)


@dataclass
class ExportRequest:
    """What to export. `run_id` None: the newest finished run; `rank` None: the run's own (or 32 by SVD)."""

    name: str
    format: ExportFormat
    path: Path
    run_id: int | None = None
    rank: int | None = None
    force: bool = False
    save_dtype: DtypeName = "fp16"
    device: str | None = None
    models_root: Path | None = None  # the store whose models/ holds built presets (default: this store)


@dataclass
class ExportResult:
    """What the export wrote: the file (or folder), its model card, its size and how it was made.

    `error` (a full run exported as a LoRA): how well the rank-`rank` SVD reproduces the run's weight
    difference, the fields of `core.export.ExtractionError` (overall, worst, worst_layer, left_out,
    left_out_tensors, layers, rank)."""

    subject: str
    run: Run
    format: ExportFormat
    path: Path
    card: Path
    bytes: int
    kind: WeightsKind  # the run's kind
    rank: int | None
    error: dict[str, Any] | None = None
    kept_fp32: int = 0  # trained tensors kept in fp32 because the export dtype would round their update away

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "subject": self.subject,
            "run_id": self.run.id,
            "format": self.format,
            "path": str(self.path),
            "card": str(self.card),
            "bytes": self.bytes,
            "kind": self.kind,
            "rank": self.rank,
            "error": self.error,
            "kept_fp32": self.kept_fp32,
        }


def export(store: Store, request: ExportRequest, *, progress: Progress = no_progress) -> ExportResult:
    """Export one run of a subject; see the module docstring.

    Progress: `Loading` (the base model, the device) before the base model loads, then `Exporting` (the
    format) before the writing.
    """
    from stencil_cli.core import export as export_core

    if request.format not in FORMATS:
        raise FieldError("format", f"{{}} {request.format!r} is unknown: use one of {', '.join(FORMATS)}")
    if request.save_dtype not in SAVE_DTYPES:
        raise FieldError(
            "save_dtype", f"{{}} must be one of {', '.join(SAVE_DTYPES)} (got {request.save_dtype!r})"
        )
    run = finished_run(store, request.name, request.run_id)
    check_rank(run, request.format, request.rank)
    target = Path(request.path).expanduser().absolute()
    check_target(request.format, target, request.force, store.root)
    export_core.check_request(request.format, target, rank=request.rank, force=request.force, kind=run.kind)

    model_ref = run.params.get("subject_model") or run.base_model or ""
    root = request.models_root or store.root
    device = models.resolve_device(resolve_setting(store, "device", request.device))
    progress(Loading(model_ref, str(device)))
    with models.quiet_libraries():
        pipe = models.load_subject_pipeline(model_ref, device=str(device), precision="fp32", store_root=root)
    progress(Exporting(request.format))
    assert run.weights_file is not None  # trained_run checked it
    with models.quiet_libraries():  # save_pretrained's progress bars
        written = export_core.export_run(
            pipe,
            run.weights_file,
            request.format,
            target,
            rank=request.rank,
            force=request.force,
            save_dtype=request.save_dtype,
            base_model=base_model_id(model_ref, root),
        )
    del pipe
    models.free_pipeline(None)
    error = written.error.__dict__.copy() if written.error is not None else None
    return ExportResult(
        subject=request.name,
        run=run,
        format=written.format,
        path=written.path,
        card=written.card,
        bytes=written.bytes,
        kind=written.kind,
        rank=written.rank,
        error=error,
        kept_fp32=written.kept_fp32,
    )


# -- checks before the model loads -----------------------------------------------------------------------


def finished_run(store: Store, name: str, run_id: int | None) -> Run:
    """The done run to export (`run_id`, or the newest done one); a run that is not done is bad input."""
    if run_id is not None:
        run = store.get_run(name, run_id)
        if run.status != "done":
            finished = [str(other.id) for other in store.list_runs(name) if other.status == "done"]
            which = f"finished: {', '.join(finished)}" if finished else "none is finished yet"
            raise FieldError(
                "run_id",
                f"run {run_id} of {name!r} is {run.status}, not done: "
                f"pick a finished run with {{}} ({which})",
            )
    elif store.latest_done_run(name) is None:
        runs = store.list_runs(name)
        if runs:
            newest = runs[-1]
            raise BadInputError(
                f"subject {name!r} has no finished run to export (run {newest.id} is {newest.status}): "
                f"finish it with `stencil train {name} {{train.resume}}` or train again",
                fields=("train.resume",),
            )
    return trained_run(store, name, run_id)


def check_rank(run: Run, fmt: str, rank: int | None) -> None:
    """Refuse a rank that cannot apply: off the LoRA formats, <= 0, not a LoRA run's own, too large."""
    if rank is None:
        return
    if fmt not in LORA_FORMATS:
        raise FieldError("rank", f"{{}} applies only to the lora and kohya formats (not {fmt})")
    if rank <= 0:
        raise FieldError("rank", f"{{}} must be a positive whole number (got {rank})")
    if run.kind == "lora":
        trained = run.params.get("lora_rank")
        if rank != trained:
            raise FieldError(
                "rank",
                f"run {run.id} is a LoRA of rank {trained} and exports at that rank: drop {{}} "
                "(it is for extracting a LoRA from a full run)",
            )
        return
    allowed = largest_rank(run)
    if allowed and rank > allowed:
        raise FieldError(
            "rank", f"{{}} {rank} is more than the largest layer of run {run.id} allows ({allowed})"
        )


def largest_rank(run: Run) -> int:
    """The largest rank an SVD of this run's weights can have: min(out, in * kh * kw) over its layers.

    Read from the weights file's header (no tensor is loaded)."""
    from stencil_cli.core.export import max_extraction_rank
    from stencil_cli.core.weights import tensor_shapes

    assert run.weights_file is not None
    shapes = tensor_shapes(run.weights_file).values()
    return max_extraction_rank(shape for shape in shapes if len(shape) >= 2)


def check_target(fmt: str, target: Path, force: bool, store_root: Path) -> None:
    """Refuse a target that is empty, inside the store, in a missing or unwritable folder, a device, FIFO or
    socket, a folder stencil did not export, or one (or its model card) that exists unless forced."""
    from stencil_cli.core.export import card_path

    if not str(target).strip() or not target.name:
        raise FieldError("path", "{} is empty: give the file (or, for diffusers, the folder) to write")
    refuse_inside_store(target, store_root, "path")
    if not target.parent.is_dir():
        raise FieldError(
            "path",
            f"{{}} {target}: the folder {target.parent} does not exist; create it first or pick another path",
        )
    refuse_special_file(target, "path")
    if fmt == "diffusers" and target.exists() and not target.is_dir():
        raise FieldError("path", f"{{}} {target} is a file; a diffusers export is a folder")
    if fmt != "diffusers" and target.is_dir():
        raise FieldError("path", f"{{}} {target} is a folder; the {fmt} export is one file")
    existing = [target] + ([card_path(fmt, target)] if fmt != "diffusers" else [])
    for path in existing:
        check_replaceable(path, force=force, field="path", ours=_stencil_export)
    probe_writable_folder(target.parent, "path", target)


def _stencil_export(folder: Path) -> bool:
    """Whether `folder` is a diffusers folder that `stencil export` wrote (it carries stencil_export.json)."""
    return (folder / EXPORT_MARKER).is_file() and (folder / "model_index.json").is_file()


def base_model_id(model_ref: str, store_root: Path) -> str:
    """The base model as other tools name it: the Hub id of a preset, else the reference itself."""
    try:
        source = models.resolve_ref(model_ref, store_root=store_root)
    except BadInputError:
        return model_ref
    return source.repo_id or model_ref
