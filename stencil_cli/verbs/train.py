"""Train a subject: checks, the per-subject lock, the run row, the masks, the loop, the weights file.

`train(store, TrainRequest)` is the one training verb: `stencil train`, the DreamBench runner and the demo all
call it. It settles the configuration (or the interrupted run's, with --resume), refuses what cannot work
before the model loads, and leaves the run `done`, `failed` or `interrupted` whatever happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stencil_cli import models
from stencil_cli.base import events
from stencil_cli.base.errors import BadInputError, DiskFullError, FieldError, StencilError, worded
from stencil_cli.base.events import Event, Loading, Progress, Stage, Step, Working, no_progress
from stencil_cli.base.fsutil import atomic_write_bytes
from stencil_cli.base.images import load_rgb
from stencil_cli.captioning import contains_phrase
from stencil_cli.models.devices import DtypeName
from stencil_cli.store.db import Store
from stencil_cli.store.layout import CHECKPOINT_NAME, LOSS_CURVE_NAME, MASKS_DIR, WEIGHTS_NAME, mask_path
from stencil_cli.store.records import Run, Subject
from stencil_cli.store.settings import resolve_setting
from stencil_cli.verbs.common import (
    MAX_SEED,
    refuse_missing_photos,
    subject_lock,
    synced_clock,
    using_subject,
)
from stencil_cli.verbs.previews import make_previewer, preview_steps, sample_settings

if TYPE_CHECKING:  # the ML core loads torch (and crops numpy): the verbs import them when they run
    from stencil_cli.base.crops import CropChoice
    from stencil_cli.core.attention import MaskFrom
    from stencil_cli.core.training import TrainedPart

DB_UPDATE_SECONDS = 1.0
CAPTIONS_KEY = "captions_sha256"  # run params: the hash of the captions + phrase trained on
DEFAULT_STEPS = 100
DEFAULT_LR = 2e-5  # the paper's learning rate for the full decoder fine-tune
MAX_BATCH_SIZE = 64  # photos per step: a typo like --batch-size 100000 must not try to allocate it
# the settings a resumed run keeps (only `steps` and `device` may change)
RESUME_KEPT = (
    "batch_size",
    "lr",
    "threshold",
    "seed",
    "resolution",
    "train",
    "use_mask",
    "gradient_checkpointing",
    "save_dtype",
    "mask_from",
    "crop",
    "checkpoint_every",
    "subject_model",
    "precision",
    "lora_rank",
    "lora_alpha",
)


@dataclass
class TrainRequest:
    """What to train. None means: the default (or, with `resume`, the interrupted run's value)."""

    name: str
    steps: int | None = None
    batch_size: int = 6
    lr: float | None = None  # None: 2e-5, or 1e-4 for a LoRA run
    threshold: float = 0.2
    seed: int = 0
    resolution: int | None = None
    train: TrainedPart = "decoder"
    use_mask: bool = True
    gradient_checkpointing: bool = False
    save_dtype: DtypeName = "fp32"  # exact: the update (~1/50 of a weight) survives (docs/training.md)
    mask_from: MaskFrom = "caption"  # caption (the paper) | both (the authors' [empty, caption] batch)
    crop: CropChoice = "subject"  # non-square photos: the square on the subject, or the centre (the paper)
    checkpoint_every: int = 0
    resume: bool = False
    masks_only: bool = False
    subject_model: str | None = None
    device: str | None = None
    precision: str | None = None
    lora_rank: int | None = None  # None: fine-tune the decoder itself (the paper); N: LoRA adapters of rank N
    lora_alpha: float | None = None  # LoRA scale numerator (alpha / rank); None: alpha = rank
    given: frozenset[str] = frozenset()  # fields the user set explicitly (checked against a resumed run)
    models_root: Path | None = None  # the store whose models/ holds built presets (default: this store)
    extra_params: dict[str, Any] = field(default_factory=dict)  # stored in the run's params (e.g. bench key)
    # previews (verbs/previews.py): None/() means not asked (or, with `resume`, the interrupted run's value)
    sample_every: int | None = None
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int | None = None


@dataclass
class MaskPicture:
    """One photo's mask overlay and how much of the photo the mask covers."""

    image_id: int
    file: str
    coverage: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MaskPictures(Event):
    """Progress event: the mask pass wrote its pictures (one per photo, with its coverage)."""

    masks: list[MaskPicture]


@dataclass
class TrainResult:
    """What training produced: the finished run (None with masks_only) and the mask pictures."""

    subject: str
    run: Run | None
    masks: list[MaskPicture]


# -- the verb --------------------------------------------------------------------------------------------


def train(store: Store, request: TrainRequest, *, progress: Progress = no_progress) -> TrainResult:
    """Train (or resume, or only compute masks for) a subject; see the module docstring.

    Progress: `Loading` (the model, the device) before the model loads, the mask pass (`Working` and then a
    `Step` of the stage "masks", or "encoding" without masks, then `MaskPictures`), ``Step("train", step,
    steps, loss=...)`` per step, and `Step` of the stage "samples" per preview.
    """
    if request.resume and request.masks_only:
        raise FieldError(("resume", "masks_only"), "{} do not go together")
    check_request(request)
    store.get_subject(request.name)  # a clear NotFoundError when the subject does not exist
    store.require_writable(f"train {request.name!r}")
    with using_subject(store, request.name), subject_lock(store, request.name):
        mark_stale_runs(store, request.name)
        run = resumable_run(store, request.name) if request.resume else None
        if run is not None:
            config, model_ref = resumed_config(store, run, request)
        else:
            config, model_ref = fresh_config(store, request)
        config.validate()  # bad options fail before the model loads
        samples = preview_settings(request, config, run)
        subject, captions = check_subject(store, request.name, config.use_mask or request.masks_only)
        if run is not None:
            if not check_resume(run, subject, captions):
                message = (
                    f"run {run.id} predates caption checks: resuming with the current captions and phrase"
                )
                progress(events.Warning(message))
            check_resume_steps(store, request.name, run, config.steps)
        pipe = _load_model(store, model_ref, config, request, fresh=run is None, progress=progress)
        if config.use_mask or request.masks_only:
            check_captions(pipe.tokenizer, subject, captions)
        if request.masks_only:
            _, masks = make_masks(
                store, subject, pipe, dataclasses.replace(config, use_mask=True), progress=progress
            )
            return TrainResult(subject.name, None, masks)
        sample_params = samples.to_params() if samples is not None else {}
        if run is None:
            run = start_run(store, subject, config, model_ref, {**sample_params, **request.extra_params})
        else:
            run = reopen_run(store, run, config.steps, sample_params)
        return train_subject(store, subject, pipe, config, model_ref, run, progress=progress, samples=samples)


def preview_settings(request: TrainRequest, config: Any, run: Run | None) -> Any:
    """The run's preview settings (None: no previews), checked; a resumed run keeps its own unless given."""
    samples = sample_settings(
        request.sample_every,
        request.sample_prompts,
        request.sample_steps,
        config.seed,
        run.params if run is not None else None,
    )
    if samples is not None and request.masks_only:
        raise FieldError(("sample_prompts", "masks_only"), "{} do not go together: nothing is trained")
    return samples


def check_request(request: TrainRequest) -> None:
    """Refuse values that cannot work before anything else happens (the same seed range as `gen`)."""
    if isinstance(request.seed, bool) or not 0 <= request.seed <= MAX_SEED:
        raise FieldError("seed", f"must be in [0, {MAX_SEED}] (got {request.seed})")
    if not 1 <= request.batch_size <= MAX_BATCH_SIZE:
        raise FieldError("batch_size", f"must be in [1, {MAX_BATCH_SIZE}] (got {request.batch_size})")


def fresh_config(store: Store, request: TrainRequest) -> tuple[Any, str]:
    """The training settings of a new run, and the subject model it trains (as the run stores it)."""
    from stencil_cli.core.training import TrainConfig

    if request.lora_alpha is not None and request.lora_rank is None:
        raise FieldError(("lora_alpha", "lora_rank"), "{0} needs {1}: it scales the LoRA adapters")
    config = TrainConfig(
        steps=DEFAULT_STEPS if request.steps is None else request.steps,
        batch_size=request.batch_size,
        lr=default_lr(request.lora_rank) if request.lr is None else request.lr,
        threshold=request.threshold,
        seed=request.seed,
        resolution=request.resolution or 512,  # replaced by the model's size when not given
        train=request.train,
        use_mask=request.use_mask,
        save_dtype=request.save_dtype,
        mask_from=request.mask_from,
        crop=request.crop,
        gradient_checkpointing=request.gradient_checkpointing,
        checkpoint_every=request.checkpoint_every,
        lora_rank=request.lora_rank,
        lora_alpha=request.lora_alpha,
    )
    return config, stored_model_ref(resolve_setting(store, "subject_model", request.subject_model))


def default_lr(lora_rank: int | None) -> float:
    """The learning rate when none is given: the paper's for the decoder, a higher one for LoRA adapters."""
    from stencil_cli.core.weights import LORA_DEFAULT_LR

    return LORA_DEFAULT_LR if lora_rank else DEFAULT_LR


def resumed_config(store: Store, run: Run, request: TrainRequest) -> tuple[Any, str]:
    """The interrupted run's settings (new `steps` may extend it); refuse explicit settings that differ."""
    from stencil_cli.core.training import TrainConfig

    config = TrainConfig.from_params(run.params)
    if "crop" not in run.params:  # begun before crops were placed on the subject: keep its centre crops
        config.crop = "centre"
    if request.steps is not None:
        config.steps = request.steps
    model_ref = run.params.get("subject_model") or run.base_model or ""
    kept = {**dataclasses.asdict(config), "subject_model": model_ref}
    if config.lora_rank:  # a LoRA run trained without an alpha used alpha = rank
        kept["lora_alpha"] = config.effective_lora_alpha
    conflicting = []
    for name in RESUME_KEPT:
        if name not in request.given:
            continue
        value = getattr(request, name)
        differs = stored_model_ref(value) != model_ref if name == "subject_model" else value != kept[name]
        if differs:
            conflicting.append(name)
    if conflicting:
        raise FieldError(
            conflicting,
            f"resuming run {run.id} keeps its own settings: drop {{}} "
            "(only the steps and the device may change; start a fresh run to change the others)",
        )
    return config, model_ref


def _load_model(
    store: Store, model_ref: str, config: Any, request: TrainRequest, *, fresh: bool, progress: Progress
) -> Any:
    """Load the subject model; a fresh run takes its precision and (unless given) resolution from it."""
    device = models.resolve_device(resolve_setting(store, "device", request.device))
    if fresh:
        config.precision = training_precision(resolve_setting(store, "precision", request.precision), device)
    progress(Loading(model_ref, str(device)))
    pipe = load_training_pipeline(model_ref, device, request.models_root or store.root)
    if fresh and request.resolution is None:
        config.resolution = models.native_resolution(pipe)
    config.validate()
    if fresh:
        from stencil_cli.core.training import check_lora_rank

        check_lora_rank(pipe.unet, config.lora_rank, config.train)
    return pipe


# -- checks ------------------------------------------------------------------------------------------------


def check_subject(store: Store, name: str, use_mask: bool) -> tuple[Subject, list[str]]:
    """The subject and its captions, or a refusal saying what to do first."""
    subject = store.get_subject(name)
    if not subject.images:
        raise StencilError(f"subject {name!r} has no photos: add some with `stencil add {name} PHOTOS...`")
    refuse_missing_photos(store, name)
    missing = [image["id"] for image in subject.images if not (image["caption"] or "").strip()]
    if missing:
        raise StencilError(
            f"{len(missing)} of {len(subject.images)} photos of {name!r} have no caption "
            f"(ids {', '.join(map(str, missing[:8]))}): run `stencil caption {name}` first"
        )
    if use_mask and not (subject.phrase or "").strip():
        raise StencilError(
            f"subject {name!r} has no phrase to locate it by: "
            f"set one with `stencil caption {name} {{caption.phrase=WORDS}}`",
            fields=("caption.phrase",),
        )
    if use_mask:
        phrase = subject.phrase or ""
        lacking = [image["id"] for image in subject.images if not contains_phrase(image["caption"], phrase)]
        if lacking:
            raise StencilError(
                f"{len(lacking)} of {len(subject.images)} captions of {name!r} lack the phrase {phrase!r} "
                f"(ids {', '.join(map(str, lacking[:8]))}): recaption with `stencil caption {name} "
                "{caption.force}`",
                fields=("caption.force",),
            )
    return subject, [image["caption"] for image in subject.images]


def check_captions(tokenizer: Any, subject: Subject, captions: list[str]) -> None:
    """Every caption must contain the subject phrase (as tokens); name the photo that does not."""
    from stencil_cli.core.attention import find_phrase_positions

    for image, caption in zip(subject.images, captions, strict=True):
        try:
            find_phrase_positions(tokenizer, caption, subject.phrase or "")
        except BadInputError as error:
            raise error.prefixed(f"photo {image['id']} of {subject.name!r}: ") from error


def mark_stale_runs(store: Store, name: str) -> None:
    """Runs still marked running while we hold the lock belong to a process that died: mark them."""
    for run in store.list_runs(name):
        if run.status == "running":
            store.finish_run(run.id, "interrupted", error="the training process ended unexpectedly")


def resumable_run(store: Store, name: str) -> Run:
    """The newest interrupted/failed run of `name` that has a checkpoint."""
    for run in reversed(store.list_runs(name)):
        checkpoint = store.run_dir(name, run.id) / CHECKPOINT_NAME
        if run.status in ("interrupted", "failed") and checkpoint.is_file():
            return run
    raise StencilError(
        f"no interrupted run of {name!r} has a checkpoint to resume from "
        "(train with {checkpoint_every=N} to make a run resumable)",
        fields=("checkpoint_every",),
    )


def check_resume_steps(store: Store, name: str, run: Run, steps: int) -> None:
    """Refuse resuming `run` to a step count its checkpoint has already reached."""
    from stencil_cli.core import training

    path = store.run_dir(name, run.id) / CHECKPOINT_NAME
    done = int(training.load_checkpoint(path, mmap=True)["step"])
    if steps < done:
        raise FieldError(
            "steps",
            f"{{}} {steps} is fewer than the {done} steps in run {run.id}'s checkpoint: "
            "give at least that many to resume",
        )


def captions_digest(captions: list[str], phrase: str | None) -> str:
    """A hash of the captions and the phrase the masks and caption embeddings come from."""
    text = json.dumps({"captions": list(captions), "phrase": phrase or ""}, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def check_resume(run: Run, subject: Subject, captions: list[str]) -> bool:
    """Refuse to resume `run` when the subject's photos, captions or phrase changed since it started
    (the masks would silently change mid-run). False when the run predates the caption hash (unchecked)."""
    if run.params.get("images") != [image["id"] for image in subject.images]:
        raise StencilError(
            f"the photos of {subject.name!r} changed since run {run.id}; "
            "start a fresh run (without {resume})",
            fields=("resume",),
        )
    stored = run.params.get(CAPTIONS_KEY)
    if stored is None:
        return False
    if stored != captions_digest(captions, subject.phrase):
        raise StencilError(
            f"the captions or the phrase of {subject.name!r} changed since run {run.id} was started "
            "(the masks would change mid-run); start a fresh run (without {resume})",
            fields=("resume",),
        )
    return True


def training_precision(precision: str, device: Any) -> DtypeName:
    """The autocast name (fp32 / fp16 / bf16) that `precision` ('auto', ...) means on `device`."""
    import torch

    dtype = models.resolve_dtype(precision, device)
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def stored_model_ref(ref: str) -> str:
    """The subject-model reference to store: local folders as absolute paths, others as given."""
    source = models.resolve_ref(ref)
    return str(source.path) if source.kind == "local" and source.path else ref


def load_training_pipeline(model_ref: str, device: Any, store_root: Path | None = None) -> Any:
    """The subject pipeline to train on `device` (fp32 master weights; autocast does mixed precision)."""
    with models.quiet_libraries():
        return models.load_subject_pipeline(
            model_ref, device=str(device), precision="fp32", store_root=store_root
        )


# -- the run -----------------------------------------------------------------------------------------------


def start_run(
    store: Store, subject: Subject, config: Any, model_ref: str, extra: dict[str, Any] | None = None
) -> Run:
    """Create the run row: the training settings, the model, the phrase, the photos and a captions hash."""
    params = {
        **config.to_params(),
        "subject_model": model_ref,
        "phrase": subject.phrase,
        "images": [image["id"] for image in subject.images],
        CAPTIONS_KEY: captions_digest([image["caption"] or "" for image in subject.images], subject.phrase),
        **(extra or {}),
    }
    return store.create_run(subject.name, params, model_ref, subject_id=subject.id)


def reopen_run(store: Store, run: Run, steps: int, extra: dict[str, Any] | None = None) -> Run:
    """Mark a run being resumed as running again, with its (possibly new) step count (and `extra`) in its
    params."""
    params = {**run.params, **(extra or {}), "steps": steps}
    store.update_run(run.id, status="running", finished=None, error=None, params=params)
    return dataclasses.replace(run, status="running", finished=None, error=None, params=params)


def mask_files(store: Store, subject: Subject) -> list[tuple[dict[str, Any], Path | None]]:
    """Each photo of `subject` with its latest mask picture (None where no mask pass has run)."""
    folder = store.subject_dir(subject.name) / MASKS_DIR
    result: list[tuple[dict[str, Any], Path | None]] = []
    for image in subject.images:
        path = mask_path(folder, image)
        result.append((image, path if path.is_file() else None))
    return result


def write_mask_pictures(
    folders: list[Path], subject: Subject, data: Any, captions: list[str], threshold: float
) -> list[MaskPicture]:
    """Save one overlay PNG per photo into every folder; return id, path and mask coverage per photo."""
    from PIL import PngImagePlugin

    from stencil_cli.core.training import overlay_mask

    rows = []
    for index, image in enumerate(subject.images):
        mask = data.masks[index]
        coverage = float(mask.float().mean())
        picture = overlay_mask(data.crops[index], mask)
        text = PngImagePlugin.PngInfo()
        text.add_text("stencil:caption", captions[index])
        text.add_text("stencil:threshold", str(threshold))
        text.add_text("stencil:coverage", f"{coverage:.4f}")
        if index < len(data.boxes):  # where the trained square lies in the photo (left, top, right, bottom)
            text.add_text("stencil:crop", ",".join(str(value) for value in data.boxes[index]))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", pnginfo=text)
        paths = []
        for folder in folders:
            target = mask_path(folder, image)
            atomic_write_bytes(target, buffer.getvalue())
            paths.append(target)
        rows.append(MaskPicture(image["id"], str(paths[0]), round(coverage, 4)))
    return rows


def make_masks(
    store: Store,
    subject: Subject,
    pipe: Any,
    config: Any,
    run: Run | None = None,
    *,
    progress: Progress = no_progress,
) -> tuple[Any, list[MaskPicture]]:
    """Encode the photos and captions, compute the masks and save their pictures (subject and run folders)."""
    from stencil_cli.core import training

    captions = [image["caption"] for image in subject.images]
    photos = [load_rgb(Path(image["file"])) for image in subject.images]
    stage: Stage = "masks" if config.use_mask else "encoding"
    progress(Working(stage))
    data = training.prepare_training_data(pipe, photos, captions, subject.phrase, config)
    progress(Step(stage, 1, 1))
    rows: list[MaskPicture] = []
    if config.use_mask:
        folders = [store.subject_dir(subject.name) / MASKS_DIR]
        if run is not None:
            folders.insert(0, store.run_dir(subject.name, run.id) / MASKS_DIR)
        rows = write_mask_pictures(folders, subject, data, captions, config.threshold)
        progress(MaskPictures(rows))
    return data, rows


def train_subject(
    store: Store,
    subject: Subject,
    pipe: Any,
    config: Any,
    model_ref: str,
    run: Run,
    *,
    progress: Progress = no_progress,
    samples: Any = None,
) -> TrainResult:
    """Masks, the training loop (from the run's checkpoint if there is one), the weights file, the done run.

    With `samples` (verbs/previews.SampleSettings), previews are rendered every N steps and after the last
    one, with the pipeline's VAE and text encoder (kept for that; freed otherwise).

    Ctrl-C marks the run interrupted (with its step and losses), any other error failed; both re-raise.
    """
    from stencil_cli.core import training

    name = subject.name
    device = next(pipe.unet.parameters()).device
    started = synced_clock(device)
    previous = float(run.duration_s or 0.0)
    # what the run recorded so far (a resumed run): kept if we stop before the loop starts
    step, losses = run.step, list(run.losses)

    def elapsed() -> float:
        return round(previous + synced_clock(device) - started, 3)

    try:
        data, masks = make_masks(store, subject, pipe, config, run, progress=progress)
        run_dir = store.run_dir(name, run.id)
        checkpoint_path = run_dir / CHECKPOINT_NAME
        resume_state = training.load_checkpoint(checkpoint_path) if checkpoint_path.is_file() else None
        unet, scheduler = pipe.unet, pipe.scheduler
        step = int(resume_state["step"]) if resume_state else 0
        previewer = None
        if samples is None:
            models.free_pipeline(pipe)  # the VAE and text encoder are done; keep only the UNet
        else:
            previewer = _previewer(pipe, samples, subject, run, run_dir, model_ref, step, config, progress)
        losses = [float(x) for x in resume_state["losses"]] if resume_state else []
        progress(Step("train", step, config.steps))
        last_write = 0.0

        def on_step(done: int, loss: float) -> None:
            nonlocal step, last_write
            step = done
            losses.append(loss)
            progress(Step("train", done, config.steps, loss=loss))
            now = time.monotonic()
            if done == 1 or now - last_write >= DB_UPDATE_SECONDS:
                last_write = now
                store.update_run(run.id, step=done, losses=losses)

        result = training.train_unet(
            unet,
            scheduler,
            data,
            config,
            checkpoint_path=checkpoint_path,
            resume=resume_state,
            on_step=on_step,
            sample_every=samples.every if samples is not None else 0,
            on_sample=previewer,
            on_checkpoint_full=lambda at, error: progress(
                events.Warning(f"{error.message} (the checkpoint of step {at}); training goes on")
            ),
        )
        weights = run_dir / WEIGHTS_NAME
        try:
            save_run_weights(weights, unet, result.names, config, model_ref, subject, run)
        except DiskFullError as error:
            raise keep_steps_after_disk_full(error, result, checkpoint_path, name) from error
        if previewer is not None and previewer.last_step != result.steps:
            previewer(result.steps, unet)  # after the last step
    except KeyboardInterrupt:
        store.finish_run(run.id, "interrupted", duration_s=elapsed(), step=step, losses=losses)
        write_loss_curve(store.run_dir(name, run.id), losses, f"{name} run {run.id} (interrupted)")
        raise
    except WeightsNotSavedError as error:
        store.finish_run(
            run.id, "failed", duration_s=elapsed(), error=str(error), step=error.steps, losses=error.losses
        )
        raise
    except BaseException as error:
        message = str(error) if isinstance(error, StencilError) else f"{type(error).__name__}: {error}"
        store.finish_run(run.id, "failed", duration_s=elapsed(), error=message, step=step, losses=losses)
        raise
    store.finish_run(
        run.id, "done", duration_s=elapsed(), weights_file=weights, losses=result.losses, step=result.steps
    )
    checkpoint_path.unlink(missing_ok=True)
    write_loss_curve(run_dir, result.losses, f"{name} run {run.id}")
    del unet
    models.free_pipeline(pipe if samples is not None else None)
    return TrainResult(name, store.get_run(name, run.id), masks)


def _previewer(
    pipe: Any,
    samples: Any,
    subject: Subject,
    run: Run,
    run_dir: Path,
    model_ref: str,
    start: int,
    config: Any,
    progress: Progress,
) -> Any:
    """The renderer of this run's previews (counting the images it will make, for the progress hook)."""
    meta = {"subject": subject.name, "run_id": run.id, "subject_model": model_ref, "phrase": subject.phrase}
    total = len(preview_steps(samples, start, config.steps)) * len(samples.prompts)
    phrase = subject.phrase or subject.class_word
    return make_previewer(pipe, samples, phrase, run_dir, meta, total=total, progress=progress)


def write_loss_curve(run_dir: Path, losses: list[float], title: str) -> None:
    """Draw the run's loss per step into `loss.png` beside its weights (a failure to write is not fatal)."""
    from stencil_cli.verbs.charts import loss_curve_png  # Pillow's drawing loads FreeType: not at start-up

    with contextlib.suppress(OSError):
        atomic_write_bytes(run_dir / LOSS_CURVE_NAME, loss_curve_png([float(x) for x in losses], title))


class WeightsNotSavedError(DiskFullError):
    """The disk filled up while the trained weights were written; says what was kept and how to go on."""

    def __init__(self, path: Path, hint: str, steps: int, losses: list[float]) -> None:
        super().__init__(path, hint=hint)
        self.steps = steps
        self.losses = losses


def keep_steps_after_disk_full(
    error: DiskFullError, result: Any, checkpoint_path: Path, name: str
) -> WeightsNotSavedError:
    """After a full disk at the weights: keep the trained steps in a resumable checkpoint if one fits."""
    resume = (
        f"free some space, then `stencil train {name} {{train.resume}}` writes the weights without training "
        "again"
    )
    kept = checkpoint_path.is_file() and _checkpoint_step(checkpoint_path) == result.steps
    if not kept and result.save_checkpoint is not None:
        try:
            result.save_checkpoint(checkpoint_path)
            kept = True
        except DiskFullError:
            kept = False
    if kept:
        hint = f"the {result.steps} trained steps are kept in the checkpoint {checkpoint_path}: {resume}"
    else:
        hint = (
            "no checkpoint of the trained steps fitted on the disk either, so nothing could be kept: "
            "free some space and train again"
        )
    hint = worded(hint, ("train.resume",))
    return WeightsNotSavedError(Path(error.path), hint, result.steps, list(result.losses))


def _checkpoint_step(path: Path) -> int | None:
    from stencil_cli.core import training

    try:
        return int(training.load_checkpoint(path, mmap=True)["step"])
    except StencilError:
        return None


def save_run_weights(
    path: Path, unet: Any, names: list[str], config: Any, model_ref: str, subject: Subject, run: Run
) -> None:
    """Write the trained parameters (in `config.save_dtype`) and their metadata atomically to `path`."""
    from stencil_cli.core import weights
    from stencil_cli.core.precision import SAVE_DTYPES

    tensors = weights.trained_state(unet, names, SAVE_DTYPES[config.save_dtype])
    metadata = weights.weights_metadata(
        config, model_ref, names, subject=subject.name, phrase=subject.phrase or "", run_id=str(run.id)
    )
    weights.save_trained_weights(path, tensors, metadata)


def masks_of(store: Store, name: str) -> list[dict[str, Any]]:
    """The latest mask picture of each photo of `name` (file None where no mask pass has run)."""
    subject = store.get_subject(name)
    return [
        {"image_id": image["id"], "sha256": image["sha256"], "file": str(path) if path else None}
        for image, path in mask_files(store, subject)
    ]
