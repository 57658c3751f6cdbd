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
import math
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from stencil_cli import captioning, models
from stencil_cli.base import events
from stencil_cli.base.errors import FieldError, StencilError, Wording
from stencil_cli.base.events import Note, Progress, Reused, Stage, no_progress
from stencil_cli.base.fsutil import atomic_write_bytes
from stencil_cli.base.images import center_crop_resize, load_rgb
from stencil_cli.base.pngmeta import png_bytes, read_png_parameters, read_rgb
from stencil_cli.core.prompts import build_prompts, clip_token_counter, words_past_limit
from stencil_cli.models.devices import Precision
from stencil_cli.store.db import Store
from stencil_cli.store.drafts import description_hash
from stencil_cli.store.layout import GRID_NAME, batch_name, draft_name, image_name
from stencil_cli.store.records import Generation, Run, Subject
from stencil_cli.store.settings import resolve_setting
from stencil_cli.verbs.caption import CaptionerName, resolve_caption_model
from stencil_cli.verbs.common import MAX_SEED, using_subject
from stencil_cli.verbs.train import stored_model_ref

if TYPE_CHECKING:
    from PIL import Image

MAX_TAU = 1000
MAX_BATCH = 256  # seeds in one batched model call
MAX_IMAGES = 10_000  # seeds x prompts in one call: a typo like -n 1000000000 must not build a huge list
DEFAULT_BATCH_SIZE = 4  # seeds per batched model call (CPU; GPUs with >= 40 GiB)
InversionMode = Literal["nti", "npi"]  # null-text inversion (the paper) or negative-prompt inversion (faster)
INVERSION_MODES: tuple[InversionMode, ...] = get_args(InversionMode)
GenerationMode = Literal["context", "edit", "plain"]  # a drawn draft, the user's draft picture, no draft


@dataclass
class Item:
    """One image to make (per tau): a prompt and a seed; `stem` names its files, `meta` adds to its row."""

    prompt: str
    seed: int
    stem: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerateRequest:
    """What to render. None means: settled from the environment, the stored config or the default."""

    name: str
    prompts: list[str]
    count: int = 1  # seeds per prompt
    seed: int | None = None  # the first seed (random when None); image i of a prompt uses seed + i
    taus: list[float] = field(default_factory=lambda: [60.0])
    steps: int = 50
    inner_steps: int = 10
    guidance: float = 7.5
    null_lr: float = 1e-2
    inversion: InversionMode = "nti"
    draft_steps: int = 50
    draft: Path | None = None  # subject editing: this picture is the draft
    no_context: bool = False  # plain generation
    run_id: int | None = None
    output: Path | None = None  # also copy every file here
    grid: bool = False
    subject_model: str | None = None
    context_model: str | None = None
    device: str | None = None
    precision: Precision | None = None
    no_t5: bool = False
    negative: str | None = None  # what the denoise (after the injected steps) and the draft steer away from
    batch_size: int | None = None  # seeds per batched model call (None: by device, see batch_size_for)
    draft_prompt: str | None = None  # the context model's prompt, given by hand
    rewrite: bool = False  # the caption model writes each prompt's draft prompt (cached in the store)
    captioner: CaptionerName | None = None  # for `rewrite` (default: openai)
    caption_model: str | None = None  # the vision model for `rewrite` (default: as `stencil caption`)


@dataclass
class NamedItems:
    """The images a caller names itself instead of prompts x count (the DreamBench runner): each one's
    prompt, seed, file stem and row metadata, made in one fixed folder that a rerun fills up."""

    items: list[Item]
    folder: str  # the folder under the subject's generations
    reuse_drafts: bool = False  # a draft already in the folder is used instead of rendered again


@dataclass
class PlannedItem:
    """One settled image: its prompts (subject and draft), seed and file stem."""

    user_prompt: str
    prompt: str
    draft_prompt: str
    seed: int
    stem: str
    meta: dict[str, Any]
    draft_prompt_by: str | None = None  # the caption model that wrote the draft prompt (None: not rewritten)


@dataclass
class GenerationPlan:
    """Everything one generation settles before the models load."""

    subject: Subject
    run: Run
    mode: GenerationMode
    items: list[PlannedItem]
    taus: list[float]
    settings: Any  # generation.GenerationSettings
    subject_model: str
    context_model: str | None
    device: str
    precision: Precision
    no_t5: bool
    resolution: int
    folder: Path
    output: Path | None
    grid: bool
    reuse_drafts: bool
    models_root: Path
    batch_size: int | None = None
    draft_prompt_override: str | None = None
    draft_image: Image.Image | None = None
    draft_source: str | None = None
    notes: list[str] = field(default_factory=list)  # things to tell the user once
    warnings: list[str] = field(default_factory=list)  # things the user may not expect

    @property
    def expected(self) -> int:
        """How many images the plan makes when it runs to the end."""
        return len(self.items) * max(1, len(self.taus))

    def stage_totals(self) -> dict[Stage, int]:
        """Progress totals per stage (draft, inversion, null-text, denoise)."""
        from stencil_cli.core.generation import null_text_steps

        count, steps = len(self.items), self.settings.steps
        nti = self.mode != "plain" and self.settings.inversion == "nti"
        return {
            "draft": count * self.settings.draft_steps if self.mode == "context" else 0,
            "inversion": count * steps if self.mode != "plain" else 0,
            "null-text": count * null_text_steps(self.taus, steps) if nti else 0,
            "denoise": count * max(1, len(self.taus)) * steps,
        }


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


# -- 1. the plan -------------------------------------------------------------------------------------------


def check_seeds(first: int, count: int, field_name: str = "seed") -> None:
    """Refuse a first seed whose `count` seeds (first .. first + count - 1) do not fit a stored row."""
    most = MAX_SEED - (count - 1)
    if not 0 <= first <= most:
        raise FieldError(field_name, f"must be in [0, {most}] for {count} image(s) (got {first})")


def parse_taus(text: str) -> list[float]:
    """Parse '20,60,200' into distinct numbers in [0, 1000]; FieldError('tau') otherwise."""
    values: list[float] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise FieldError("tau", f"{{}}: {part!r} is not a number (e.g. 60 or 20,60,200)") from None
        if not math.isfinite(value) or not 0 <= value <= MAX_TAU:
            raise FieldError("tau", f"{{}} {part} is outside [0, {MAX_TAU}] (the default is 60)")
        if value not in values:
            values.append(value)
    if not values:
        raise FieldError("tau", "needs at least one value in [0, 1000], e.g. 60")
    return values


def prompt_lines(text: str, field_name: str = "prompts_file") -> list[str]:
    """The prompts in `text`: one per line; blank lines and lines starting with '#' are skipped."""
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise FieldError(
            field_name, "{} holds no prompt (one per line; lines starting with '#' are comments)"
        )
    return prompts


def generation_settings(request: GenerateRequest) -> Any:
    """The ML core's generation settings from the request, or a FieldError naming the bad one."""
    from stencil_cli.core.generation import GenerationSettings
    from stencil_cli.core.inversion import NullTextSettings

    inversion = request.inversion.strip().lower()
    if inversion not in INVERSION_MODES:
        raise FieldError("inversion", f"must be nti or npi (got {request.inversion!r})")
    if not (request.null_lr > 0 and math.isfinite(request.null_lr)):
        raise FieldError("null_lr", f"must be a positive number (got {request.null_lr})")
    if not (request.guidance >= 1 and math.isfinite(request.guidance)):
        raise FieldError("guidance", f"must be at least 1 (got {request.guidance})")
    for name, value, most in (
        ("steps", request.steps, MAX_TAU),
        ("inner_steps", request.inner_steps, None),
        ("draft_steps", request.draft_steps, None),
    ):
        if value < 1 or (most is not None and value > most):
            raise FieldError(
                name, f"must be in [1, {most}] (got {value})" if most else f"must be at least 1 (got {value})"
            )
    return GenerationSettings(
        steps=request.steps,
        guidance=request.guidance,
        inversion=inversion,
        null_text=NullTextSettings(lr=request.null_lr, inner_steps=request.inner_steps),
        draft_steps=request.draft_steps,
        negative=" ".join((request.negative or "").split()),
    )


def trained_run(store: Store, name: str, run_id: int | None) -> Run:
    """The done run to generate with (`run_id`, or the newest done one), with its weights on disk."""
    if run_id is not None:
        run = store.get_run(name, run_id)
        if run.status != "done":
            raise StencilError(
                f"run {run_id} of {name!r} is {run.status}, not done",
                hint=f"pick a finished run (`stencil runs {name}`) or train again: `stencil train {name}`",
            )
    else:
        found = store.latest_done_run(name)
        if found is None:
            raise StencilError(f"subject {name!r} is not trained yet: run `stencil train {name}` first")
        run = found
    if run.weights_file is None or not run.weights_file.is_file():
        raise StencilError(
            f"the weights of run {run.id} of {name!r} are missing",
            hint=f"train again with `stencil train {name}`",
        )
    check_weights_file(run.weights_file, run.id, name)
    return run


def check_weights_file(path: Path, run_id: int, name: str) -> None:
    """Refuse a trained-weights file whose safetensors header is damaged or truncated (before any model
    loads or draft renders; the tensors' own bytes are read only when the model loads)."""
    from stencil_cli.core import weights

    try:
        shapes = weights.tensor_shapes(path)
    except weights.DamagedWeightsError as error:
        raise StencilError(
            f"the trained weights {path} of run {run_id} of {name!r} are damaged ({error.detail})",
            hint=f"train again with `stencil train {name}`",
        ) from None
    if not shapes:
        raise StencilError(
            f"the trained weights {path} of run {run_id} of {name!r} hold no tensors",
            hint=f"train again with `stencil train {name}`",
        )


def load_draft(path: Path) -> tuple[Image.Image, str]:
    """A user's draft picture and its absolute path, or a FieldError('draft') saying what is wrong."""
    if not str(path).strip():
        raise FieldError("draft", "is empty: give the path of an image file")
    path = Path(path).expanduser()
    if path.is_dir():
        raise FieldError("draft", f"{{}} {path} is a folder: give one image file")
    if not path.is_file():
        raise FieldError("draft", f"{{}} {path}: no such file")
    try:
        return load_rgb(path), str(path.resolve())
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for non-images
        raise FieldError(
            "draft", f"{{}} {path} is not an image Pillow can read ({type(error).__name__})"
        ) from None


def _items(request: GenerateRequest, mode: GenerationMode, named: NamedItems | None) -> list[Item]:
    """The images to make: the caller's named items, or every prompt times `count` seeds."""
    if named is not None:
        return named.items
    prompts = [p for p in request.prompts]
    if not prompts or any(not p.strip() for p in prompts):
        raise FieldError("prompt", 'is empty: say what to render, e.g. "on a beach at sunset"')
    count = 1 if mode == "edit" else request.count
    if count < 1:
        raise FieldError("count", f"must be at least 1 (got {count})")
    if count * len(prompts) > MAX_IMAGES:
        raise FieldError("count", f"asks for {count * len(prompts)} images; at most {MAX_IMAGES} in one call")
    first = request.seed if request.seed is not None else secrets.randbelow(2**31)
    check_seeds(first, count)
    several = len(prompts) > 1
    return [
        Item(prompt, first + i, stem=f"p{p}-s{first + i}" if several else f"s{first + i}")
        for p, prompt in enumerate(prompts)
        for i in range(count)
    ]


def plan_generation(
    store: Store,
    request: GenerateRequest,
    named: NamedItems | None = None,
    *,
    models_root: Path | None = None,
) -> GenerationPlan:
    """Check and settle everything about a generation (no model is loaded here).

    `named`: the caller's own items and folder instead of the request's prompts x count (the DreamBench
    runner); `models_root`: the store whose models/ holds built presets (default: this store).
    """
    if request.draft is not None and request.no_context:
        raise FieldError(("draft", "no_context"), "{} do not go together: a draft is the context")
    if request.draft_prompt is not None and (request.draft is not None or request.no_context):
        raise FieldError("draft_prompt", "is only used when the context model draws the draft")
    if request.draft_prompt is not None and not request.draft_prompt.strip():
        raise FieldError("draft_prompt", "is empty")
    if request.rewrite:
        _check_rewrite(request)
    if request.batch_size is not None and not 1 <= request.batch_size <= MAX_BATCH:
        raise FieldError("batch_size", f"must be in [1, {MAX_BATCH}] (got {request.batch_size})")
    mode: GenerationMode = (
        "plain" if request.no_context else ("edit" if request.draft is not None else "context")
    )
    notes: list[str] = []
    warnings: list[str] = []
    if mode == "edit" and request.count > 1 and named is None:
        warnings.append(
            "with a draft picture the result does not depend on the seed: making one image per tau"
        )
    items = _items(request, mode, named)
    taus = list(request.taus) if mode != "plain" else []
    for tau in taus:
        if not 0 <= tau <= MAX_TAU:
            raise FieldError("tau", f"must be in [0, {MAX_TAU}] (got {tau})")
    settings = generation_settings(request)
    subject = store.get_subject(request.name)
    run = trained_run(store, request.name, request.run_id)
    phrase = subject.phrase or subject.class_word
    if not phrase:
        raise StencilError(
            f"subject {request.name!r} has no phrase",
            hint=f"caption it with `stencil caption {request.name}` or re-add with {{add.phrase}}",
            fields=("add.phrase",),
        )
    rewritten: dict[str, tuple[str, str]] = {}
    if request.rewrite:
        rewritten = rewrite_draft_prompts(store, request, subject, phrase, [i.prompt for i in items], notes)
    if not subject.description and mode == "context" and not rewritten:
        notes.append(
            f"{request.name} has no description (the OpenAI captioner writes one); "
            f"the draft prompt uses {phrase!r}"
        )
    planned = []
    reduced = False
    for item in items:
        written, by = rewritten.get(_prompt_key(item.prompt), (None, None))
        prompts = build_prompts(
            item.prompt, phrase, subject.description, draft_prompt=written or request.draft_prompt
        )
        reduced = reduced or (prompts.description_reduced and mode == "context")
        planned.append(
            PlannedItem(
                item.prompt,
                prompts.prompt,
                prompts.draft_prompt,
                item.seed,
                item.stem or f"s{item.seed}",
                item.meta,
                draft_prompt_by=by,
            )
        )
    if reduced:
        shown = f"{prompts.description!r}" if prompts.description else f"the phrase {phrase!r}"
        warnings.append(
            Wording(
                f"{request.name}'s description is not one noun phrase (stored before this version); "
                f"using {shown} (run `stencil caption {request.name} {{caption.force}}` for a new one)",
                ("caption.force",),
            )
        )
    notes.extend(_tau_notes(taus, settings.steps))
    draft_image, draft_source = load_draft(request.draft) if request.draft is not None else (None, None)
    trained_on = run.params.get("subject_model") or run.base_model
    subject_ref = request.subject_model or trained_on or resolve_setting(store, "subject_model", None)
    # runs store local folders as absolute paths: compare the given reference the same way
    if request.subject_model and trained_on and stored_model_ref(request.subject_model) != trained_on:
        warnings.append(
            f"run {run.id} was trained on {trained_on}; generating with {request.subject_model} as asked"
        )
    output = _prepare_output(request.output)
    return GenerationPlan(
        subject=subject,
        run=run,
        mode=mode,
        items=planned,
        taus=taus,
        settings=settings,
        subject_model=subject_ref,
        context_model=resolve_setting(store, "context_model", request.context_model)
        if mode == "context"
        else None,
        device=resolve_setting(store, "device", request.device),
        precision=resolve_setting(store, "precision", request.precision),
        no_t5=request.no_t5,
        resolution=int(run.params.get("resolution") or 0),
        folder=store.generation_dir(subject.name) / ((named.folder if named else None) or batch_name()),
        output=output,
        grid=request.grid,
        reuse_drafts=named.reuse_drafts if named is not None else False,
        models_root=models_root or store.root,
        batch_size=request.batch_size,
        draft_prompt_override=request.draft_prompt,
        draft_image=draft_image,
        draft_source=draft_source,
        notes=notes,
        warnings=warnings,
    )


def _check_rewrite(request: GenerateRequest) -> None:
    """Refuse `rewrite` where the context model draws no draft, or where the draft prompt is given."""
    if request.draft_prompt is not None:
        raise FieldError(("rewrite", "draft_prompt"), "{0} and {1} do not go together: pick one draft prompt")
    if request.draft is not None or request.no_context:
        other = "draft" if request.draft is not None else "no_context"
        raise FieldError(
            ("rewrite", other),
            "{0} and {1} do not go together: the draft prompt is only used when the "
            "context model draws the draft",
        )
    kind = (request.captioner or "openai").strip().lower()
    if kind not in ("openai", "template"):
        raise FieldError("captioner", f"must be openai or template (got {request.captioner!r})")


def _prompt_key(user_prompt: str) -> str:
    return " ".join(user_prompt.split())


def rewrite_draft_prompts(
    store: Store,
    request: GenerateRequest,
    subject: Subject,
    phrase: str,
    prompts: list[str],
    notes: list[str],
) -> dict[str, tuple[str, str]]:
    """The caption model's draft prompt for each distinct user prompt: {prompt: (draft prompt, model)}.

    Read from the store's cache when the same model wrote one for this subject, prompt, phrase and
    description; else one request per prompt (the answer is cached). A prompt the model answers with no
    usable sentence is left out (the prompt rules write its draft prompt; a note says so); the template
    captioner writes none. OPENAI_API_KEY is needed only when something is not cached yet.
    """
    kind = (request.captioner or "openai").strip().lower()
    if kind == "template":
        notes.append("the template captioner writes no draft prompt: using the rule-made one")
        return {}
    model = resolve_caption_model(store, request.caption_model)
    look = description_hash(phrase, subject.description)
    photos = [
        captioning.Photo(id=image["id"], path=store.absolute(image["file"])) for image in subject.images
    ]
    captioner: Any = None
    written: dict[str, tuple[str, str]] = {}
    for user_prompt in dict.fromkeys(_prompt_key(p) for p in prompts):
        cached = store.cached_draft_prompt(subject, user_prompt, model, look)
        if cached is not None:
            written[user_prompt] = (cached, model)
            notes.append(f"draft prompt (cached): {cached}")
            continue
        if captioner is None:
            captioner = captioning.make_captioner(kind, model=model)
        text = captioner.write_draft_prompt(photos, user_prompt, phrase, subject.description)
        if text is None:
            notes.append(
                f"the caption model's draft prompt for {user_prompt!r} was not one sentence; "
                "using the rule-made one"
            )
            continue
        store.cache_draft_prompt(subject, user_prompt, model, look, text)
        written[user_prompt] = (text, model)
        notes.append(f"draft prompt written by {model}: {text}")
    return written


def _tau_notes(taus: list[float], steps: int) -> list[str]:
    """'tau 20 and 60 inject the same 1 step at 10 steps: their images are identical', once per group."""
    from stencil_cli.core.generation import tau_groups

    notes = []
    for count, group in tau_groups(taus, steps):
        shown = [tau_label(tau) for tau in group]
        listed = ", ".join(shown[:-1]) + " and " + shown[-1]
        unit = "step" if count == 1 else "steps"
        notes.append(
            f"tau {listed} inject the same {count} {unit} at {steps} steps: their images are identical"
        )
    return notes


def _prepare_output(output: Path | None) -> Path | None:
    """Create the copy folder up front (a bad -o fails before any model loads)."""
    if output is None:
        return None
    if not str(output).strip():
        raise FieldError("output", "is empty: give a folder")
    output = Path(output).expanduser()
    if output.exists() and not output.is_dir():
        raise FieldError("output", f"{{}} {output} is a file: give a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FieldError("output", f"{{}} {output}: cannot create the folder ({error.strerror})") from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise FieldError("output", f"{{}} {output}: the folder is not writable")
    return output


def prepare_output(output: Path | None) -> Path | None:
    """Check (and create) a copy folder up front: a command that renders later fails now, not after."""
    return _prepare_output(output)


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
        "subject": plan.subject.name,
        "draft_source": plan.draft_source,
        "render_seconds": round(seconds, 4) if seconds is not None else None,
    }


def tau_label(tau: float) -> str:
    """60.0 -> '60', 12.5 -> '12.5' (for file names and labels)."""
    return f"{tau:g}"


class _Writer:
    """Writes a plan's files and rows as they arrive (atomically; copies under `output` too) and keeps what
    it wrote (the images' drafts and the grid are drawn from it)."""

    def __init__(self, store: Store, plan: GenerationPlan) -> None:
        self.store = store
        self.plan = plan
        self.result = GenerateResult(plan)
        self.draft_seconds: dict[str, float] = {}

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
        """The contact sheet (each item's draft, then its images) from the files written."""
        from stencil_cli.core.generation import contact_sheet

        rows = []
        for item in self.plan.items:
            draft = self.result.drafts.get(item.stem)
            row = [(f"draft, seed {item.seed}", read_rgb(draft))] if draft is not None else []
            row += [
                (
                    f"tau {tau_label(s.generation.tau)}"
                    if s.generation.tau is not None
                    else f"seed {item.seed}",
                    read_rgb(s.generation.image_file),
                )
                for s in self.result.images
                if s.generation.params.get("seed") == item.seed
                and s.generation.prompt == item.prompt
                and s.generation.image_file is not None
            ]
            rows.append(row)
        path = self.plan.folder / GRID_NAME
        meta = {
            "role": "grid",
            "prompts": sorted({item.prompt for item in self.plan.items}),
            "taus": self.plan.taus,
            "seeds": [item.seed for item in self.plan.items],
        }
        copy = self.write(path, png_bytes(contact_sheet(rows), meta))
        saved = SavedGrid(copy or path)
        self.result.add(saved)
        return saved


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
    ref: str, run: Run, *, device: str, precision: str, store_root: Path | None = None
) -> Iterator[Any]:
    """The subject model with the run's trained weights, freed afterwards."""
    from stencil_cli.core import weights

    with models.quiet_libraries():
        pipe = models.load_subject_pipeline(ref, device=device, precision=precision, store_root=store_root)
    try:
        assert run.weights_file is not None
        weights.load_trained_weights(pipe.unet, run.weights_file)
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
        yield from _generate(store, plan, progress)


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
    ) as pipe:
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

    With the context model's tokenizer at hand, each draft prompt is checked against its 77-token window
    (the description is shortened first; what still does not fit is reported)."""
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
        _fit_draft_prompts(plan, wanted, getattr(pipe, "tokenizer", None), progress)
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
                )
                seconds = (time.perf_counter() - started) / len(chunk)
                for item, image in zip(chunk, images, strict=True):
                    yield writer.save_draft(item, image, seconds)


def _fit_draft_prompts(
    plan: GenerationPlan, items: list[PlannedItem], tokenizer: Any, progress: Progress
) -> None:
    """Rebuild the draft prompts with the context model's token counter; report shortening and cuts once.

    A draft prompt given by hand or written by the caption model is kept as it is (only a cut is reported)."""
    if tokenizer is None:
        return
    counter = clip_token_counter(tokenizer)
    phrase = plan.subject.phrase or plan.subject.class_word or ""
    told: set[str] = set()
    for item in items:
        if plan.draft_prompt_override is not None or item.draft_prompt_by is not None:
            cut = words_past_limit(item.draft_prompt, counter)
            if cut and item.draft_prompt not in told:
                told.add(item.draft_prompt)
                whose = "the caption model's" if item.draft_prompt_by else "the given"
                message = f"{whose} draft prompt passes the draft model's 77 tokens; it will not read {cut!r}"
                progress(events.Warning(message))
            continue
        fitted = build_prompts(item.user_prompt, phrase, plan.subject.description, count_tokens=counter)
        item.draft_prompt = fitted.draft_prompt
        if fitted.shortened and "shortened" not in told:
            told.add("shortened")
            message = f"the description was shortened to the draft model's 77 tokens: {fitted.description}"
            progress(Note(message))
        if fitted.cut and "cut" not in told:
            told.add("cut")
            message = f"the draft prompt passes the draft model's 77 tokens; it will not read {fitted.cut!r}"
            progress(events.Warning(message))
