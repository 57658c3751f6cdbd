"""Plan a generation before any model loads: the subject, its run, prompts, seeds, taus, models, outputs.

`plan_generation(store, GenerateRequest) -> GenerationPlan` settles everything `stencil gen`, the DreamBench
runner and the demo ask for, and fails on bad input with a `FieldError` naming the setting; the plan then goes
to `verbs.generate.generate`, which draws, inverts and denoises.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from stencil_cli import captioning
from stencil_cli.base.errors import FieldError, StencilError, Wording
from stencil_cli.base.events import Stage
from stencil_cli.base.images import load_rgb
from stencil_cli.base.targets import probe_writable_folder, refuse_inside_store, refuse_special_file
from stencil_cli.core.prompts import build_prompts
from stencil_cli.models.devices import Precision
from stencil_cli.models.refs import PAPER_DRAFT, DraftDefaults, draft_defaults, t5_required_error
from stencil_cli.store.db import Store
from stencil_cli.store.drafts import description_hash
from stencil_cli.store.layout import batch_name
from stencil_cli.store.records import Run, Subject
from stencil_cli.store.settings import resolve_setting
from stencil_cli.verbs.caption import CaptionerName, resolve_caption_model
from stencil_cli.verbs.common import MAX_SEED
from stencil_cli.verbs.train import stored_model_ref

if TYPE_CHECKING:
    from PIL import Image

MAX_TAU = 1000
MAX_BATCH = 256  # seeds in one batched model call
MAX_IMAGES = 10_000  # seeds x prompts in one call: a typo like -n 1000000000 must not build a huge list
DEFAULT_BATCH_SIZE = 4  # seeds per batched model call (CPU; GPUs with >= 40 GiB)
MAX_LORA_SCALE = 2.0  # beyond twice the trained update a fine-tune only breaks the base model
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
    draft_steps: int | None = None  # None: the draft model's preset (e.g. 4 for flux-schnell), else 50
    draft_guidance: float | None = None  # None: the draft model's preset (e.g. 0 for flux-schnell), else 7.5
    draft: Path | None = None  # subject editing: this picture is the draft
    no_context: bool = False  # plain generation
    run_id: int | None = None
    output: Path | str | None = None  # also copy every file here
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
    lora_scale: float = 1.0  # the run's update scaled (a LoRA's B @ A; a full run interpolated to the base)


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
    lora_scale: float = 1.0
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


def tau_label(tau: float) -> str:
    """60.0 -> '60', 12.5 -> '12.5' (for file names and labels)."""
    return f"{tau:g}"


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


def generation_settings(request: GenerateRequest, draft: DraftDefaults = PAPER_DRAFT) -> Any:
    """The ML core's generation settings from the request (draft settings it leaves out: `draft`, the draft
    model's defaults), or a FieldError naming the bad one."""
    from stencil_cli.core.generation import GenerationSettings
    from stencil_cli.core.inversion import NullTextSettings

    draft_steps = request.draft_steps if request.draft_steps is not None else draft.steps
    draft_guidance = request.draft_guidance if request.draft_guidance is not None else draft.guidance
    if not (draft_guidance >= 0 and math.isfinite(draft_guidance)):
        raise FieldError("draft_guidance", f"must be 0 or more (got {draft_guidance})")
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
        ("draft_steps", draft_steps, None),
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
        draft_steps=draft_steps,
        draft_guidance=draft_guidance,
        draft_max_sequence_length=draft.max_sequence_length,
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
    if "params" in run.damaged:
        raise StencilError(
            f"run {run.id} of {name!r} has damaged settings (its params in the database are not JSON)",
            hint=f"train again with `stencil train {name}`, or pick another run (`stencil runs {name}`)",
        )
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
    if not (math.isfinite(request.lora_scale) and 0 <= request.lora_scale <= MAX_LORA_SCALE):
        raise FieldError(
            "lora_scale",
            f"must be a number from 0 (the base model) to {MAX_LORA_SCALE} (got {request.lora_scale})",
        )
    if request.batch_size is not None and not 1 <= request.batch_size <= MAX_BATCH:
        raise FieldError("batch_size", f"must be in [1, {MAX_BATCH}] (got {request.batch_size})")
    store.require_writable(f"store images of {request.name!r}")
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
    context_model = (
        resolve_setting(store, "context_model", request.context_model) if mode == "context" else None
    )
    draft = draft_defaults(context_model)
    if request.no_t5 and mode == "context" and draft.t5 == "required":
        raise t5_required_error(str(context_model))
    settings = generation_settings(request, draft)
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
    output = _prepare_output(request.output, store.root)
    return GenerationPlan(
        subject=subject,
        run=run,
        mode=mode,
        items=planned,
        taus=taus,
        settings=settings,
        subject_model=subject_ref,
        context_model=context_model,
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
        lora_scale=request.lora_scale,
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


def _prepare_output(output: Path | str | None, store_root: Path | None = None) -> Path | None:
    """Create the copy folder up front (a bad -o fails before any model loads): not empty, not inside the
    store, not a file or device, and a folder this process can really write in."""
    if output is None:
        return None
    if not str(output).strip():
        raise FieldError("output", "is empty: give a folder")
    output = Path(output).expanduser()
    if store_root is not None:
        refuse_inside_store(output, store_root, "output")
    refuse_special_file(output, "output")
    if output.exists() and not output.is_dir():
        raise FieldError("output", f"{{}} {output} is a file: give a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FieldError("output", f"{{}} {output}: cannot create the folder ({error.strerror})") from None
    probe_writable_folder(output, "output")
    return output


def prepare_output(output: Path | str | None, store_root: Path | None = None) -> Path | None:
    """Check (and create) a copy folder up front: a command that renders later fails now, not after."""
    return _prepare_output(output, store_root)
