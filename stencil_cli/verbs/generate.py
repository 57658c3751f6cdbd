"""Render a trained subject: Context Guidance (draft -> inversion -> denoise), editing, plain generation.

Two steps, so that everything is checked before any model loads:

1. `plan_generation(store, GenerateRequest) -> GenerationPlan`: the subject, its trained run, the prompts,
   the seeds, the taus, the models and the output folders, settled once.
2. `generate(store, plan)` yields what it saves: drafts with the context model (freed afterwards), then the
   subject model's inversion and denoise. Every draft, image and generation row is written as soon as it is
   made and yielded at once (`SavedDraft`, `SavedImage`, `SavedGrid`), so an interruption keeps what was
   finished and the caller has seen each of it; `collect` gathers them into a `GenerateResult`.

`stencil gen`, the DreamBench runner and the demo all generate through these two functions.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stencil_cli import models
from stencil_cli.base import events
from stencil_cli.base.events import Note, Progress, Reused, no_progress
from stencil_cli.base.fsutil import atomic_write_bytes
from stencil_cli.base.images import center_crop_resize
from stencil_cli.base.pngmeta import png_bytes, read_png_parameters, read_rgb
from stencil_cli.core.prompts import build_prompts, words_past_limit
from stencil_cli.store.db import Store
from stencil_cli.store.layout import GRID_NAME, draft_name, image_name
from stencil_cli.store.records import Generation, Run
from stencil_cli.verbs.common import using_subject
from stencil_cli.verbs.grid import GridRow, GridTile, grid_sheet

if TYPE_CHECKING:
    from PIL import Image

from stencil_cli.verbs.generation_plan import DEFAULT_BATCH_SIZE, GenerationPlan, PlannedItem, tau_label


@dataclass
class SavedImage:
    """One image written: its generation row, and its copy under `output` if asked."""

    generation: Generation
    output_file: Path | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (the row plus `output_file`)."""
        return {
            **self.generation.to_dict(),
            "output_file": str(self.output_file) if self.output_file else None,
        }


@dataclass
class SavedDraft:
    """One item's draft, written (or, `reused`, kept from an earlier attempt in the same folder)."""

    stem: str
    path: Path
    reused: bool = False


@dataclass
class SavedGrid:
    """The contact sheet written: its copy under `output` if asked, else the store file."""

    path: Path


Saved = SavedDraft | SavedImage | SavedGrid  # what `generate` yields


@dataclass
class GenerateResult:
    """What a generation wrote (so far, when it was interrupted)."""

    plan: GenerationPlan
    images: list[SavedImage] = field(default_factory=list)
    drafts: dict[str, Path] = field(default_factory=dict)  # stem -> draft file
    grid_file: Path | None = None

    def add(self, saved: Saved) -> None:
        """Record one file that `generate` yielded."""
        if isinstance(saved, SavedImage):
            self.images.append(saved)
        elif isinstance(saved, SavedDraft):
            self.drafts[saved.stem] = saved.path
        else:
            self.grid_file = saved.path


def collect(plan: GenerationPlan, saved: Iterable[Saved]) -> GenerateResult:
    """Everything `generate` yields for `plan`, gathered into one result (run to the end)."""
    result = GenerateResult(plan)
    for one in saved:
        result.add(one)
    return result


# -- 2. the generation ----------------------------------------------------------------------------------


def image_metadata(
    plan: GenerationPlan, item: PlannedItem, tau: float | None, draft_file: str | None
) -> dict[str, Any]:
    """The parameters one generated image carries (PNG text chunks and its generation row)."""
    settings = plan.settings
    nti = plan.mode != "plain" and settings.inversion == "nti"
    return {
        "prompt": item.prompt,
        "draft_prompt": item.draft_prompt if plan.mode == "context" else None,
        "draft_prompt_by": item.draft_prompt_by if plan.mode == "context" else None,
        "seed": item.seed,
        "tau": tau,
        "injected_steps": _injected(tau, settings.steps) if tau is not None else None,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "inversion": settings.inversion if plan.mode != "plain" else None,
        "inner_steps": settings.null_text.inner_steps if nti else None,
        "null_lr": settings.null_text.lr if nti else None,
        "draft_steps": settings.draft_steps if plan.mode == "context" else None,
        "draft_guidance": settings.draft_guidance if plan.mode == "context" else None,
        "negative_prompt": settings.negative or None,
        "mode": plan.mode,
        "subject": plan.subject.name,
        "phrase": plan.subject.phrase or plan.subject.class_word,
        "subject_model": plan.subject_model,
        "context_model": plan.context_model if plan.mode == "context" else None,
        "run_id": plan.run.id,
        "resolution": plan.resolution,
        "draft": draft_file,
        "draft_source": plan.draft_source,
        "lora_scale": plan.lora_scale,
        **item.meta,
    }


def _injected(tau: float, steps: int) -> int:
    from stencil_cli.core.generation import injected_steps

    return injected_steps(tau, steps)


def draft_metadata(plan: GenerationPlan, item: PlannedItem, seconds: float | None) -> dict[str, Any]:
    """The parameters a draft carries (how long it took to render, so a reused draft keeps its time)."""
    return {
        "role": "draft",
        "draft_prompt": item.draft_prompt if plan.mode == "context" else None,
        "draft_prompt_by": item.draft_prompt_by if plan.mode == "context" else None,
        "negative_prompt": plan.settings.negative or None,
        "seed": item.seed,
        "context_model": plan.context_model,
        "draft_steps": plan.settings.draft_steps if plan.mode == "context" else None,
        "draft_guidance": plan.settings.draft_guidance if plan.mode == "context" else None,
        "subject": plan.subject.name,
        "draft_source": plan.draft_source,
        "render_seconds": round(seconds, 4) if seconds is not None else None,
    }


class _Writer:
    """Writes a plan's files and rows as they arrive (atomically; copies under `output` too) and keeps what
    it wrote (the images' drafts and the grid are drawn from it)."""

    def __init__(self, store: Store, plan: GenerationPlan) -> None:
        self.store = store
        self.plan = plan
        self.result = GenerateResult(plan)
        self.draft_seconds: dict[str, float] = {}
        self.dtypes: dict[str, str] = {}  # the dtype each model ran in: "draft" (when drawn here), "subject"

    def copy_path(self, path: Path) -> Path | None:
        """Where `output` gets a copy of the store file `path` (None without an output folder)."""
        if self.plan.output is None:
            return None
        return self.plan.output / f"{self.plan.subject.name}-{self.plan.folder.name}-{path.name}"

    def write(self, path: Path, data: bytes) -> Path | None:
        """Write `data` to `path` and its copy; return the copy's path."""
        atomic_write_bytes(path, data)
        copy = self.copy_path(path)
        if copy is not None:
            atomic_write_bytes(copy, data)
        return copy

    def draft_path(self, item: PlannedItem) -> Path:
        """Where the draft of `item` lives."""
        return self.plan.folder / draft_name(item.stem)

    def save_draft(self, item: PlannedItem, image: Image.Image, seconds: float | None) -> SavedDraft:
        """Write the draft of `item` (with its parameters) now."""
        path = self.draft_path(item)
        self.write(path, png_bytes(image, draft_metadata(self.plan, item, seconds)))
        saved = SavedDraft(item.stem, path)
        self.result.add(saved)
        if seconds is not None:
            self.draft_seconds[item.stem] = seconds
        return saved

    def reuse_draft(self, item: PlannedItem) -> SavedDraft | None:
        """Take an existing draft of `item` (when the plan allows it); None when there is none."""
        path = self.draft_path(item)
        if not (self.plan.reuse_drafts and path.is_file()):
            return None
        saved = SavedDraft(item.stem, path, reused=True)
        self.result.add(saved)
        seconds = read_png_parameters(path).get("render_seconds")
        self.draft_seconds[item.stem] = float(seconds or 0.0)
        return saved

    def save_image(
        self,
        item: PlannedItem,
        tau: float | None,
        image: Image.Image,
        timings: dict[str, float],
        extra: dict[str, Any],
    ) -> SavedImage:
        """Write one image (PNG with its parameters) and its generation row now."""
        plan = self.plan
        stem = item.stem if tau is None else f"{item.stem}-tau{tau_label(tau)}"
        path = plan.folder / image_name(stem)
        draft_path = self.result.drafts.get(item.stem)
        carried = image_metadata(plan, item, tau, draft_path.name if draft_path else None)
        data = png_bytes(image, carried)
        row_params = {k: v for k, v in carried.items() if v is not None}
        row_params.update(
            {"batch": plan.folder.name, "timings_s": {k: round(v, 4) for k, v in timings.items()}, **extra}
        )
        if self.dtypes:
            row_params["dtypes"] = dict(self.dtypes)
        copy = self.copy_path(path)
        if copy is not None:
            row_params["output_file"] = str(copy.resolve())
        atomic_write_bytes(path, data)
        # the row right after the store file (a failed insert leaves no copy; `store clean` removes the file)
        generation = self.store.add_generation(
            plan.subject,
            {
                "run_id": plan.run.id,
                "prompt": item.prompt,
                "draft_prompt": item.draft_prompt if plan.mode == "context" else None,
                "seed": item.seed,
                "tau": tau,
                "params": row_params,
                "image_file": path,
                "draft_file": draft_path,
            },
        )
        if copy is not None:
            atomic_write_bytes(copy, data)
        saved = SavedImage(generation, copy)
        self.result.add(saved)
        return saved

    def save_grid(self) -> SavedGrid:
        """The contact sheet (each item's draft, then its images, labelled) from the files written."""
        rows = []
        for item in self.plan.items:
            draft = self.result.drafts.get(item.stem)
            tiles = [
                GridTile(
                    read_rgb(s.generation.image_file),
                    s.generation.tau,
                    s.generation.params.get("injected_steps"),
                )
                for s in self.result.images
                if s.generation.params.get("seed") == item.seed
                and s.generation.prompt == item.prompt
                and s.generation.image_file is not None
            ]
            rows.append(
                GridRow(item.prompt, item.seed, read_rgb(draft) if draft else None, tiles, self.plan.mode)
            )
        path = self.plan.folder / GRID_NAME
        meta = {
            "role": "grid",
            "prompts": sorted({item.prompt for item in self.plan.items}),
            "taus": self.plan.taus,
            "seeds": [item.seed for item in self.plan.items],
        }
        copy = self.write(path, png_bytes(grid_sheet(rows), meta))
        saved = SavedGrid(copy or path)
        self.result.add(saved)
        return saved


def dtype_name(pipe: Any) -> str:
    """A loaded pipeline's dtype by name (``float32``, ``bfloat16``, ...), as the records keep it."""
    return str(pipe.dtype).removeprefix("torch.")


@contextlib.contextmanager
def context_pipeline(
    ref: str, *, device: str, precision: str, no_t5: bool, store_root: Path | None = None
) -> Iterator[Any]:
    """The context model, loaded for the drafts and freed afterwards (before the subject model loads)."""
    with models.quiet_libraries():
        pipe = models.load_context_pipeline(
            ref, device=device, precision=precision, no_t5=no_t5, store_root=store_root
        )
    try:
        yield pipe
    finally:
        models.free_pipeline(pipe)
        del pipe


@contextlib.contextmanager
def subject_pipeline(
    ref: str,
    run: Run,
    *,
    device: str,
    precision: str,
    store_root: Path | None = None,
    lora_scale: float = 1.0,
) -> Iterator[Any]:
    """The subject model with the run's trained weights (their update scaled by `lora_scale`), freed after."""
    from stencil_cli.core import weights

    assert run.weights_file is not None
    path = run.weights_file
    # a full run's tensors go straight into place (no base decoder read), unless scaled towards the base
    in_place = weights.is_full_run(path) and lora_scale == 1.0
    with models.quiet_libraries():
        pipe = models.load_subject_pipeline(
            ref,
            device=device,
            precision=precision,
            store_root=store_root,
            replace_unet=(lambda unet: weights.full_run_tensors(unet, path)) if in_place else None,
        )
    try:
        if not in_place:
            # LoRA adapters merge into the base weights; a scaled full run is interpolated towards the base
            weights.load_trained_weights(pipe.unet, path, strength=lora_scale)
        yield pipe
    finally:
        models.free_pipeline(pipe)
        del pipe


def _groups(items: list[PlannedItem]) -> list[list[PlannedItem]]:
    """Items that share their prompts (so one batched model call can make them), in first-seen order."""
    groups: dict[tuple[str, str], list[PlannedItem]] = {}
    for item in items:
        groups.setdefault((item.prompt, item.draft_prompt), []).append(item)
    return list(groups.values())


def batch_size_for(requested: int | None, device: str) -> int:
    """The seeds drafted, inverted and denoised together: `requested`, else 4 on the CPU and on GPUs with
    40 GiB or more, else 1 (measured on the CPU; the GPU rule is an estimate, see docs/performance.md)."""
    if requested is not None:
        return requested
    torch_device = models.resolve_device(device)
    if torch_device.type != "cuda":
        return DEFAULT_BATCH_SIZE
    import torch

    total = torch.cuda.get_device_properties(torch_device).total_memory
    return DEFAULT_BATCH_SIZE if total >= 40 * 2**30 else 1


def generate(store: Store, plan: GenerationPlan, *, progress: Progress = no_progress) -> Iterator[Saved]:
    """Make the plan's images: drafts, then the subject model's inversion and denoise, in batches of seeds.

    Yields each draft, image (with its row) and the grid as soon as it is written, so what was yielded when
    an exception (Ctrl-C) stops the generation is what it kept. Progress: `Step` of the stages draft,
    inversion, null-text (the K steps the taus inject) and denoise (a batched step's `samples` is its
    batch's size), `Reused` for kept drafts, `Note` and `Warning` about the draft prompts.
    The subject is held (shared) until the iteration ends (or the iterator is closed): `stencil rm` waits.
    """
    with using_subject(store, plan.subject.name):
        store.check_subject(plan.subject.name, plan.subject.id)  # not removed since the plan was made
        locate_models(plan)
        yield from _generate(store, plan, progress)


def locate_models(plan: GenerationPlan) -> None:
    """Resolve and find every model the plan needs before any model work: a missing subject model must not
    wait until the context model has drawn every draft (minutes on a GPU) to be reported."""
    models.inspect_ref(plan.subject_model, models.SUBJECT, store_root=plan.models_root)
    if plan.mode == "context" and plan.context_model:
        models.inspect_ref(plan.context_model, models.CONTEXT, store_root=plan.models_root)


def _generate(store: Store, plan: GenerationPlan, progress: Progress) -> Iterator[Saved]:
    """`generate` while the subject is held."""
    from stencil_cli.core import generation

    writer = _Writer(store, plan)
    batch = batch_size_for(plan.batch_size, plan.device)
    if plan.mode == "context":
        yield from _render_drafts(writer, progress, batch)
    with subject_pipeline(
        plan.subject_model,
        plan.run,
        device=plan.device,
        precision=plan.precision,
        store_root=plan.models_root,
        lora_scale=plan.lora_scale,
    ) as pipe:
        writer.dtypes["subject"] = dtype_name(pipe)
        resolution = plan.resolution or models.native_resolution(pipe)
        plan.resolution = resolution
        by_stem = {item.stem: item for item in plan.items}
        if plan.mode == "plain":
            wanted = [(item.stem, item.prompt, item.seed) for item in plan.items]
            for stem, image, seconds in generation.plain_images(
                pipe, wanted, plan.settings, resolution=resolution, progress=progress
            ):
                yield writer.save_image(by_stem[stem], None, image, {"denoise": seconds}, {})
        else:
            if plan.mode == "edit" and plan.draft_image is not None:
                edit_draft = center_crop_resize(plan.draft_image, resolution)
                for item in plan.items:
                    yield writer.save_draft(item, edit_draft, None)
            for group in _groups(plan.items):
                drafts = [read_rgb(writer.result.drafts[item.stem]) for item in group]
                for index, sample in generation.iter_context_guidance(
                    pipe,
                    drafts,
                    group[0].prompt,
                    plan.taus,
                    plan.settings,
                    resolution=resolution,
                    batch_size=batch,
                    progress=progress,
                ):
                    item = group[index]
                    # draft and inversion are per item (shared by its taus); denoising per image
                    timings = {"draft": writer.draft_seconds.get(item.stem, 0.0), **sample.timings}
                    extra = {
                        "inner_iterations": sample.inversion.inner_iterations,
                        "null_text_losses": sample.inversion.losses,
                        "null_text_steps": sample.inversion.optimized_steps,
                        "batch_size": sample.batch,
                    }
                    for tau, image in zip(plan.taus, sample.images, strict=True):
                        yield writer.save_image(item, tau, image, timings, extra)
    if plan.grid:
        yield writer.save_grid()


def _render_drafts(writer: _Writer, progress: Progress, batch: int) -> Iterator[SavedDraft]:
    """Render and save every item's draft with the context model (freed afterwards), reusing kept drafts.

    With the context model's tokenizers at hand, each draft prompt is checked against its prompt window
    (`core.prompt_window`; the description is shortened first; what still does not fit is reported)."""
    plan = writer.plan
    assert plan.context_model is not None
    steps = plan.settings.draft_steps
    wanted = []
    for item in plan.items:
        kept = writer.reuse_draft(item)
        if kept is not None:
            progress(Reused("draft", steps))
            yield kept
        else:
            wanted.append(item)
    if not wanted:
        return
    from stencil_cli.core import generation

    options = {
        "device": plan.device,
        "precision": plan.precision,
        "no_t5": plan.no_t5,
        "store_root": plan.models_root,
    }
    with context_pipeline(plan.context_model, **options) as pipe:
        writer.dtypes["draft"] = dtype_name(pipe)
        _fit_draft_prompts(plan, wanted, pipe, progress)
        for group in _groups(wanted):
            for chunk in generation.chunks(group, batch):
                started = time.perf_counter()
                images = generation.render_drafts(
                    pipe,
                    chunk[0].draft_prompt,
                    resolution=plan.resolution or 512,
                    seeds=[item.seed for item in chunk],
                    steps=steps,
                    guidance=plan.settings.draft_guidance,
                    progress=progress,
                    negative=plan.settings.negative,
                    max_sequence_length=plan.settings.draft_max_sequence_length,
                )
                seconds = (time.perf_counter() - started) / len(chunk)
                for item, image in zip(chunk, images, strict=True):
                    yield writer.save_draft(item, image, seconds)


def _fit_draft_prompts(
    plan: GenerationPlan, items: list[PlannedItem], context_pipe: Any, progress: Progress
) -> None:
    """Rebuild the draft prompts for the draft model's prompt window (from its tokenizers: 77 CLIP tokens
    for SD3, T5's window for FLUX); report shortening and cuts once.

    A draft prompt given by hand or written by the caption model is kept as it is (only a cut is reported)."""
    from stencil_cli.core.prompt_window import draft_prompt_window

    window = draft_prompt_window(context_pipe, plan.settings.draft_max_sequence_length)
    if window is None:
        return
    counter, limit = window.count_tokens, window.limit
    phrase = plan.subject.phrase or plan.subject.class_word or ""
    told: set[str] = set()
    for item in items:
        if plan.draft_prompt_override is not None or item.draft_prompt_by is not None:
            cut = words_past_limit(item.draft_prompt, counter, limit)
            if cut and item.draft_prompt not in told:
                told.add(item.draft_prompt)
                whose = "the caption model's" if item.draft_prompt_by else "the given"
                message = (
                    f"{whose} draft prompt passes the draft model's {limit} tokens; it will not read {cut!r}"
                )
                progress(events.Warning(message))
            continue
        fitted = build_prompts(
            item.user_prompt, phrase, plan.subject.description, count_tokens=counter, token_limit=limit
        )
        item.draft_prompt = fitted.draft_prompt
        if fitted.shortened and "shortened" not in told:
            told.add("shortened")
            shown = fitted.description
            message = f"the description was shortened to the draft model's {limit} tokens: {shown}"
            progress(Note(message))
        if fitted.cut and "cut" not in told:
            told.add("cut")
            message = (
                f"the draft prompt passes the draft model's {limit} tokens; it will not read {fitted.cut!r}"
            )
            progress(events.Warning(message))
