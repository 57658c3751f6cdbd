"""The glue between the store and the ML modules, shared by the commands and the DreamBench runner.

Train a subject (masks, loop, weights, run row), render and save drafts and images (PNG parameters, generation
rows), score generations. Functions here may use the store and the ML modules but never print: they report
progress through a hook ``progress(stage, step, total, extra)`` (the signature the ML modules use) and raise
`StencilError` / `BadInputError` for problems the user can fix. The commands present; the runner aggregates.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from stencil_cli import __version__
from stencil_cli.errors import BadInputError, StencilError
from stencil_cli.fsutil import atomic_write_bytes
from stencil_cli.store import Store, Subject

if TYPE_CHECKING:
    from PIL import Image

Progress = Callable[[str, int, int | None, dict[str, Any]], None]

WEIGHTS_NAME = "weights.safetensors"
CHECKPOINT_NAME = "checkpoint.pt"
LOCK_NAME = ".train.lock"
MASKS_DIR = "masks"
DB_UPDATE_SECONDS = 1.0
PNG_KEY = "stencil"  # the text chunk holding every parameter as JSON
CAPTIONS_KEY = "captions_sha256"  # run params: the hash of the captions + phrase trained on
MAX_SEED = 2**63 - 1  # generation rows store the seed as an SQLite INTEGER (signed 64-bit)


def check_seeds(first: int, count: int, option: str = "--seed") -> None:
    """Refuse a first seed whose `count` seeds (first .. first + count - 1) do not fit a stored row."""
    most = MAX_SEED - (count - 1)
    if not 0 <= first <= most:
        raise BadInputError(f"{option} must be in [0, {most}] for {count} image(s) (got {first})")


def no_progress(stage: str, step: int, total: int | None, extra: dict[str, Any]) -> None:
    """The default progress hook: report nothing."""


# -- timing --------------------------------------------------------------------------------------


def synced_clock(device: Any) -> float:
    """`time.perf_counter()` after the device's queued work is done (CUDA runs asynchronously)."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


# -- PNG parameters ------------------------------------------------------------------------------


def png_bytes(image: Image.Image, meta: dict[str, Any]) -> bytes:
    """Encode `image` as PNG with `meta` in text chunks: one per key, plus all of it as JSON ("stencil")."""
    from PIL.PngImagePlugin import PngInfo

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
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        text = dict(getattr(image, "text", {}) or {})
    return json.loads(text[PNG_KEY]) if PNG_KEY in text else {}


def read_rgb(path: Path) -> Image.Image:
    """An image file as an RGB picture (closed after reading)."""
    from PIL import Image

    with Image.open(path) as opened:
        return opened.convert("RGB")


# -- training: the per-subject lock --------------------------------------------------------------


@contextlib.contextmanager
def subject_lock(store: Store, name: str) -> Iterator[None]:
    """Hold an exclusive lock on the subject's training (released by the OS if the process dies)."""
    path = store.subject_dir(name) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    handle: IO[str] = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole block
    try:
        handle.seek(0)  # "a+" opens at the end; msvcrt.locking locks from the current position (byte 0)
        if not _try_lock(handle):
            handle.seek(0)
            holder = handle.read().strip()
            who = f"by process {holder}" if holder else "by another process"
            raise StencilError(
                f"subject {name!r} is already being trained {who}; wait for it to finish "
                "or stop it with Ctrl-C"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock


def _try_lock(handle: IO[str]) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


# -- training: mask pictures ---------------------------------------------------------------------


def mask_path(folder: Path, image: dict[str, Any]) -> Path:
    """Where a photo's mask picture lives in `folder` (named by photo id and content hash)."""
    return folder / f"{image['id']}-{image['sha256'][:12]}.png"


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
) -> list[dict[str, Any]]:
    """Save one overlay PNG per photo into every folder; return id, path and mask coverage per photo."""
    from PIL import PngImagePlugin

    from stencil_cli.training import overlay_mask

    rows = []
    for index, image in enumerate(subject.images):
        mask = data.masks[index]
        coverage = float(mask.float().mean())
        picture = overlay_mask(data.crops[index], mask)
        text = PngImagePlugin.PngInfo()
        text.add_text("stencil:caption", captions[index])
        text.add_text("stencil:threshold", str(threshold))
        text.add_text("stencil:coverage", f"{coverage:.4f}")
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", pnginfo=text)
        paths = []
        for folder in folders:
            target = mask_path(folder, image)
            atomic_write_bytes(target, buffer.getvalue())
            paths.append(target)
        rows.append({"image_id": image["id"], "file": str(paths[0]), "coverage": round(coverage, 4)})
    return rows


# -- training: checks ----------------------------------------------------------------------------


def check_subject(store: Store, name: str, use_mask: bool) -> tuple[Subject, list[str]]:
    """The subject and its captions, or a refusal saying what to do first."""
    subject = store.get_subject(name)
    if not subject.images:
        raise StencilError(f"subject {name!r} has no photos: add some with `stencil add {name} PHOTOS...`")
    missing = [image["id"] for image in subject.images if not (image["caption"] or "").strip()]
    if missing:
        raise StencilError(
            f"{len(missing)} of {len(subject.images)} photos of {name!r} have no caption "
            f"(ids {', '.join(map(str, missing[:8]))}): run `stencil caption {name}` first"
        )
    if use_mask and not (subject.phrase or "").strip():
        raise StencilError(
            f"subject {name!r} has no phrase to locate it by: "
            f"set one with `stencil caption {name} --phrase WORDS`"
        )
    if use_mask:
        from stencil_cli.captioning import contains_phrase

        phrase = subject.phrase or ""
        lacking = [image["id"] for image in subject.images if not contains_phrase(image["caption"], phrase)]
        if lacking:
            raise StencilError(
                f"{len(lacking)} of {len(subject.images)} captions of {name!r} lack the phrase {phrase!r} "
                f"(ids {', '.join(map(str, lacking[:8]))}): recaption with `stencil caption {name} --force`"
            )
    return subject, [image["caption"] for image in subject.images]


def check_captions(tokenizer: Any, subject: Subject, captions: list[str]) -> None:
    """Every caption must contain the subject phrase (as tokens); name the photo that does not."""
    from stencil_cli.attention import find_phrase_positions

    for image, caption in zip(subject.images, captions, strict=True):
        try:
            find_phrase_positions(tokenizer, caption, subject.phrase or "")
        except BadInputError as error:
            raise BadInputError(f"photo {image['id']} of {subject.name!r}: {error}") from error


def mark_stale_runs(store: Store, name: str) -> None:
    """Runs still marked running while we hold the lock belong to a process that died: mark them."""
    for run in store.list_runs(name):
        if run["status"] == "running":
            store.finish_run(run["id"], "interrupted", error="the training process ended unexpectedly")


def resumable_run(store: Store, name: str) -> dict[str, Any]:
    """The newest interrupted/failed run of `name` that has a checkpoint."""
    for run in reversed(store.list_runs(name)):
        checkpoint = store.run_dir(name, run["id"]) / CHECKPOINT_NAME
        if run["status"] in ("interrupted", "failed") and checkpoint.is_file():
            return run
    raise StencilError(
        f"no interrupted run of {name!r} has a checkpoint to resume from "
        "(train with --checkpoint-every N to make a run resumable)"
    )


def check_resume_steps(store: Store, name: str, run: dict[str, Any], steps: int) -> None:
    """Refuse resuming `run` to a step count its checkpoint has already reached."""
    from stencil_cli import training

    path = store.run_dir(name, run["id"]) / CHECKPOINT_NAME
    done = int(training.load_checkpoint(path, mmap=True)["step"])
    if steps < done:
        raise BadInputError(
            f"--steps {steps} is fewer than the {done} steps in run {run['id']}'s checkpoint: "
            "give at least that many to resume"
        )


def captions_digest(captions: list[str], phrase: str | None) -> str:
    """A hash of the captions and the phrase the masks and caption embeddings come from."""
    text = json.dumps({"captions": list(captions), "phrase": phrase or ""}, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def check_resume(run: dict[str, Any], subject: Subject, captions: list[str]) -> bool:
    """Refuse to resume `run` when the subject's photos, captions or phrase changed since it started
    (the masks would silently change mid-run). False when the run predates the caption hash (unchecked)."""
    if run["params"].get("images") != [image["id"] for image in subject.images]:
        raise StencilError(
            f"the photos of {subject.name!r} changed since run {run['id']}; "
            "start a fresh run (without --resume)"
        )
    stored = run["params"].get(CAPTIONS_KEY)
    if stored is None:
        return False
    if stored != captions_digest(captions, subject.phrase):
        raise StencilError(
            f"the captions or the phrase of {subject.name!r} changed since run {run['id']} was started "
            "(the masks would change mid-run); start a fresh run (without --resume)"
        )
    return True


def training_precision(precision: str, device: Any) -> str:
    """The autocast name (fp32 / fp16 / bf16) that `precision` ('auto', ...) means on `device`."""
    import torch

    from stencil_cli.models import resolve_dtype

    dtype = resolve_dtype(precision, device)
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def stored_model_ref(ref: str) -> str:
    """The subject-model reference to store: local folders as absolute paths, others as given."""
    from stencil_cli.models import resolve_ref

    source = resolve_ref(ref)
    return str(source.path) if source.kind == "local" and source.path else ref


def load_training_pipeline(model_ref: str, device: Any) -> Any:
    """The subject pipeline to train on `device` (fp32 master weights; autocast does mixed precision)."""
    from stencil_cli import models

    with models.quiet_libraries():
        return models.load_subject_pipeline(model_ref, device=str(device), precision="fp32")


# -- training: the run ---------------------------------------------------------------------------


def start_run(
    store: Store, subject: Subject, config: Any, model_ref: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Create the run row: the training settings, the model, the phrase, the photos and a captions hash."""
    params = {
        **config.to_params(),
        "subject_model": model_ref,
        "phrase": subject.phrase,
        "images": [image["id"] for image in subject.images],
        CAPTIONS_KEY: captions_digest([image["caption"] or "" for image in subject.images], subject.phrase),
        **(extra or {}),
    }
    return store.create_run(subject.name, params, model_ref)


def reopen_run(store: Store, run: dict[str, Any], steps: int) -> None:
    """Mark a run being resumed as running again, with its (possibly new) step count in its params."""
    params = {**run["params"], "steps": steps}
    store.update_run(run["id"], status="running", finished=None, error=None, params=params)
    run["params"] = params


@dataclass
class TrainOutcome:
    """What training a subject produced."""

    run: dict[str, Any]  # the finished run row
    masks: list[dict[str, Any]]  # image_id, file, coverage per photo (empty with --no-mask)


def make_masks(
    store: Store,
    subject: Subject,
    pipe: Any,
    config: Any,
    run: dict[str, Any] | None = None,
    *,
    progress: Progress = no_progress,
) -> tuple[Any, list[dict[str, Any]]]:
    """Encode the photos and captions, compute the masks and save their pictures (subject and run folders).

    Reports ``("masks" | "encoding", 0|1, 1, {})`` around the pass and ``("mask pictures", 1, 1,
    {"masks": rows})`` once the pictures are written.
    """
    from stencil_cli import training
    from stencil_cli.images import load_rgb

    captions = [image["caption"] for image in subject.images]
    photos = [load_rgb(Path(image["file"])) for image in subject.images]
    stage = "masks" if config.use_mask else "encoding"
    progress(stage, 0, 1, {})
    data = training.prepare_training_data(pipe, photos, captions, subject.phrase, config)
    progress(stage, 1, 1, {})
    rows: list[dict[str, Any]] = []
    if config.use_mask:
        folders = [store.subject_dir(subject.name) / MASKS_DIR]
        if run is not None:
            folders.insert(0, store.run_dir(subject.name, run["id"]) / MASKS_DIR)
        rows = write_mask_pictures(folders, subject, data, captions, config.threshold)
        progress("mask pictures", 1, 1, {"masks": rows})
    return data, rows


def train_subject(
    store: Store,
    subject: Subject,
    pipe: Any,
    config: Any,
    model_ref: str,
    run: dict[str, Any],
    *,
    progress: Progress = no_progress,
) -> TrainOutcome:
    """Masks, the training loop (from the run's checkpoint if there is one), the weights file, the done run.

    Reports the mask pass (see `make_masks`) and ``("train", step, config.steps, {"loss": loss})`` per step.
    Ctrl-C marks the run interrupted (with its step and losses), any other error failed; both re-raise.
    """
    from stencil_cli import models, training

    name = subject.name
    device = next(pipe.unet.parameters()).device
    started = synced_clock(device)
    previous = float(run.get("duration_s") or 0.0)
    # what the run recorded so far (a resumed run): kept if we stop before the loop starts
    step, losses = int(run.get("step") or 0), [float(x) for x in run.get("losses") or []]

    def elapsed() -> float:
        return round(previous + synced_clock(device) - started, 3)

    try:
        data, masks = make_masks(store, subject, pipe, config, run, progress=progress)
        run_dir = store.run_dir(name, run["id"])
        checkpoint_path = run_dir / CHECKPOINT_NAME
        resume_state = training.load_checkpoint(checkpoint_path) if checkpoint_path.is_file() else None
        unet, scheduler = pipe.unet, pipe.scheduler
        models.free_pipeline(pipe)  # the VAE and text encoder are done; keep only the UNet
        step = int(resume_state["step"]) if resume_state else 0
        losses = [float(x) for x in resume_state["losses"]] if resume_state else []
        progress("train", step, config.steps, {})
        last_write = 0.0

        def on_step(done: int, loss: float) -> None:
            nonlocal step, last_write
            step = done
            losses.append(loss)
            progress("train", done, config.steps, {"loss": loss})
            now = time.monotonic()
            if done == 1 or now - last_write >= DB_UPDATE_SECONDS:
                last_write = now
                store.update_run(run["id"], step=done, losses=losses)

        result = training.train_unet(
            unet,
            scheduler,
            data,
            config,
            checkpoint_path=checkpoint_path,
            resume=resume_state,
            on_step=on_step,
        )
        weights = run_dir / WEIGHTS_NAME
        save_run_weights(weights, unet, result.names, config, model_ref, subject, run)
    except KeyboardInterrupt:
        store.finish_run(run["id"], "interrupted", duration_s=elapsed(), step=step, losses=losses)
        raise
    except BaseException as error:
        message = str(error) if isinstance(error, StencilError) else f"{type(error).__name__}: {error}"
        store.finish_run(run["id"], "failed", duration_s=elapsed(), error=message)
        raise
    store.finish_run(
        run["id"], "done", duration_s=elapsed(), weights_path=weights, losses=result.losses, step=result.steps
    )
    checkpoint_path.unlink(missing_ok=True)
    del unet
    models.free_pipeline(None)
    return TrainOutcome(store.get_run(name, run["id"]), masks)


def save_run_weights(
    path: Path,
    unet: Any,
    names: list[str],
    config: Any,
    model_ref: str,
    subject: Subject,
    run: dict[str, Any],
) -> None:
    """Write the trained parameters (in `config.save_dtype`) and their metadata atomically to `path`."""
    from stencil_cli import training

    tensors = training.trained_state(unet, names, training.SAVE_DTYPES[config.save_dtype])
    metadata = training.weights_metadata(
        config, model_ref, names, subject=subject.name, phrase=subject.phrase or "", run_id=str(run["id"])
    )
    training.save_trained_weights(path, tensors, metadata)


# -- generation: what to make --------------------------------------------------------------------


@dataclass
class GenerationJob:
    """Everything one generation settles before the models load (prompts, seeds, taus, models)."""

    store: Store
    subject: Subject
    run: dict[str, Any]
    prompt: str
    draft_prompt: str
    seeds: list[int]
    taus: list[float]
    mode: str  # context | edit | plain
    subject_model: str
    context_model: str | None
    device: str
    precision: str
    no_t5: bool
    resolution: int
    draft_image: Image.Image | None = None
    draft_source: str | None = None


def trained_run(store: Store, name: str, run_id: int | None) -> dict[str, Any]:
    """The done run to generate with (`run_id`, or the newest done one), with its weights on disk."""
    if run_id is not None:
        run = store.get_run(name, run_id)
        if run["status"] != "done":
            raise StencilError(
                f"run {run_id} of {name!r} is {run['status']}, not done",
                hint=f"pick a finished run (`stencil show {name}`) or train again: `stencil train {name}`",
            )
    else:
        run = store.latest_done_run(name)
        if run is None:
            raise StencilError(f"subject {name!r} is not trained yet: run `stencil train {name}` first")
    if not run.get("weights_file") or not Path(run["weights_file"]).is_file():
        raise StencilError(
            f"the weights of run {run['id']} of {name!r} are missing",
            hint=f"train again with `stencil train {name}`",
        )
    return run


def image_metadata(
    job: GenerationJob, settings: Any, *, seed: int, tau: float | None, draft_file: str | None
) -> dict[str, Any]:
    """The parameters one generated image carries (PNG text chunks and its generation row)."""
    nti = job.mode != "plain" and settings.inversion == "nti"
    return {
        "prompt": job.prompt,
        "draft_prompt": job.draft_prompt if job.mode == "context" else None,
        "seed": seed,
        "tau": tau,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "inversion": settings.inversion if job.mode != "plain" else None,
        "inner_steps": settings.null_text.inner_steps if nti else None,
        "null_lr": settings.null_text.lr if nti else None,
        "draft_steps": settings.draft_steps if job.mode == "context" else None,
        "mode": job.mode,
        "subject": job.subject.name,
        "phrase": job.subject.phrase or job.subject.class_word,
        "subject_model": job.subject_model,
        "context_model": job.context_model if job.mode == "context" else None,
        "run_id": job.run["id"],
        "resolution": job.resolution,
        "draft": draft_file,
        "draft_source": job.draft_source,
    }


def draft_metadata(job: GenerationJob, seed: int) -> dict[str, Any]:
    """The parameters a draft carries."""
    return {
        "role": "draft",
        "draft_prompt": job.draft_prompt if job.mode == "context" else None,
        "seed": seed,
        "context_model": job.context_model,
        "subject": job.subject.name,
        "draft_source": job.draft_source,
    }


# -- generation: the models ----------------------------------------------------------------------


@contextlib.contextmanager
def context_pipeline(ref: str, *, device: str, precision: str, no_t5: bool) -> Iterator[Any]:
    """The context model, loaded for the drafts and freed afterwards (before the subject model loads)."""
    from stencil_cli import models

    with models.quiet_libraries():
        pipe = models.load_context_pipeline(ref, device=device, precision=precision, no_t5=no_t5)
    try:
        yield pipe
    finally:
        models.free_pipeline(pipe)
        del pipe


@contextlib.contextmanager
def subject_pipeline(ref: str, run: dict[str, Any], *, device: str, precision: str) -> Iterator[Any]:
    """The subject model with the run's trained weights, freed afterwards."""
    from stencil_cli import models, training

    with models.quiet_libraries():
        pipe = models.load_subject_pipeline(ref, device=device, precision=precision)
    try:
        training.load_trained_weights(pipe.unet, Path(run["weights_file"]))
        yield pipe
    finally:
        models.free_pipeline(pipe)
        del pipe


def render_draft(
    context: Any, job: GenerationJob, seed: int, settings: Any, *, resolution: int, progress: Progress
) -> tuple[Image.Image, float]:
    """One draft with the context model and its seconds; the progress bar always gets every draft step."""
    from stencil_cli import generation

    reported = 0

    def counting(stage: str, step: int, total: int | None, extra: dict[str, Any]) -> None:
        nonlocal reported
        reported += 1
        progress(stage, step, total, extra)

    started = synced_clock(job.device)
    image = generation.render_draft(
        context,
        job.draft_prompt,
        resolution=resolution,
        seed=seed,
        steps=settings.draft_steps,
        guidance=settings.draft_guidance,
        progress=counting,
    )
    seconds = synced_clock(job.device) - started
    if reported < settings.draft_steps:  # a pipeline without step callbacks
        missing = settings.draft_steps - reported
        progress("draft", settings.draft_steps, settings.draft_steps, {"advance": missing})
    return image, seconds


@dataclass
class Guided:
    """One draft inverted and denoised once per tau."""

    images: list[Image.Image]
    inversion: Any  # inversion.InversionResult
    timings: dict[str, float]  # inversion (for the draft), denoise (per image)


def guided_generation(
    pipe: Any,
    draft: Image.Image,
    prompt: str,
    taus: list[float],
    settings: Any,
    *,
    resolution: int,
    progress: Progress = no_progress,
) -> Guided:
    """Invert `draft` with the subject model (nti or npi), then denoise it once per tau (Context Guidance)."""
    from stencil_cli import generation

    device = generation.pipe_device(pipe)
    started = synced_clock(device)
    inverted = generation.invert_image(
        pipe, draft, prompt, settings, resolution=resolution, progress=progress
    )
    middle = synced_clock(device)
    if settings.inversion == "npi":  # no null-text steps to report
        progress("null-text", settings.steps, settings.steps, {"advance": settings.steps})
    images = generation.guided_images(pipe, inverted, prompt, taus, settings, progress=progress)
    finished = synced_clock(device)
    timings = {"inversion": middle - started, "denoise": (finished - middle) / max(1, len(images))}
    return Guided(images, inverted, timings)


# -- generation: files and rows ------------------------------------------------------------------


def save_draft(
    path: Path, image: Image.Image, job: GenerationJob, seed: int, *, copy_to: Path | None = None
) -> None:
    """Write a draft (with its parameters) atomically, and its copy when asked."""
    data = png_bytes(image, draft_metadata(job, seed))
    atomic_write_bytes(path, data)
    if copy_to is not None:
        atomic_write_bytes(copy_to, data)


def save_generation(
    job: GenerationJob,
    settings: Any,
    *,
    seed: int,
    tau: float | None,
    image: Image.Image,
    path: Path,
    draft_path: Path | None,
    meta: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    copy_to: Path | None = None,
) -> dict[str, Any]:
    """Write one image (PNG with its parameters, atomically; and its copy) and add its generation row.

    `meta` adds to what the PNG and the row carry, `params` to the row only. Returns the row.
    """
    carried = image_metadata(
        job, settings, seed=seed, tau=tau, draft_file=draft_path.name if draft_path else None
    )
    carried.update(meta or {})
    data = png_bytes(image, carried)
    row_params = {k: v for k, v in carried.items() if v is not None}
    row_params.update(params or {})
    if copy_to is not None:
        row_params["output_file"] = str(copy_to.resolve())
    atomic_write_bytes(path, data)
    # the row right after the store file (a failing insert leaves no copy; `stencil clean` removes the file)
    record = job.store.add_generation(
        job.subject.name,
        {
            "run_id": job.run["id"],
            "prompt": job.prompt,
            "draft_prompt": job.draft_prompt if job.mode == "context" else None,
            "seed": seed,
            "tau": tau,
            "params": row_params,
            "image_path": path,
            "draft_path": draft_path,
        },
    )
    if copy_to is not None:
        atomic_write_bytes(copy_to, data)
        record["output_file"] = row_params["output_file"]
    return record


def tau_label(tau: float) -> str:
    """60.0 -> '60', 12.5 -> '12.5' (for file names and labels)."""
    return f"{tau:g}"


def batch_id() -> str:
    """A folder name for one `stencil gen` call: UTC time plus a random suffix."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


@dataclass
class GenerationBatch:
    """The files of one `stencil gen` call, written as each is made (an interruption keeps them)."""

    job: GenerationJob
    settings: Any
    output: Path | None
    name: str = field(default_factory=batch_id)
    drafts: dict[int, Path] = field(default_factory=dict)
    images: list[tuple[int, float | None, Path]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        """The batch's folder in the store."""
        return self.job.store.generation_dir(self.job.subject.name) / self.name

    @property
    def expected(self) -> int:
        """How many images the batch makes when it runs to the end."""
        return len(self.job.seeds) * max(1, len(self.job.taus))

    def prepare(self) -> None:
        """Create the output folder up front (a bad -o fails before any model loads)."""
        if self.output is None:
            return
        self.output = Path(self.output).expanduser()
        try:
            self.output.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StencilError(f"cannot create the output folder {self.output}: {error.strerror}") from None

    def copy_path(self, path: Path) -> Path | None:
        """Where `-o` gets a copy of the store file `path` (None without -o)."""
        if self.output is None:
            return None
        return self.output / f"{self.job.subject.name}-{self.name}-{path.name}"

    def save_draft(self, seed: int, image: Image.Image) -> Path:
        """Write the draft of `seed` (with its parameters) now."""
        path = self.folder / f"draft-s{seed}.png"
        save_draft(path, image, self.job, seed, copy_to=self.copy_path(path))
        self.drafts[seed] = path
        return path

    def save_image(
        self,
        seed: int,
        tau: float | None,
        image: Image.Image,
        timings: dict[str, float],
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        """Write one image and add its generation row now; returns the row."""
        stem = f"s{seed}" if tau is None else f"s{seed}-tau{tau_label(tau)}"
        path = self.folder / f"{stem}.png"
        params = {"batch": self.name, "timings_s": {k: round(v, 3) for k, v in timings.items()}, **extra}
        record = save_generation(
            self.job,
            self.settings,
            seed=seed,
            tau=tau,
            image=image,
            path=path,
            draft_path=self.drafts.get(seed),
            params=params,
            copy_to=self.copy_path(path),
        )
        self.images.append((seed, tau, path))
        self.records.append(record)
        return record

    def save_grid(self) -> Path:
        """The contact sheet (each seed's draft, then its images) from the files written; returns its path."""
        from stencil_cli.generation import contact_sheet

        rows = []
        for seed in self.job.seeds:
            row = [(f"draft, seed {seed}", read_rgb(self.drafts[seed]))] if seed in self.drafts else []
            row += [
                (f"tau {tau_label(t)}" if t is not None else f"seed {s}", read_rgb(path))
                for s, t, path in self.images
                if s == seed
            ]
            rows.append(row)
        path = self.folder / "grid.png"
        job = self.job
        meta = {"role": "grid", "prompt": job.prompt, "taus": job.taus, "seeds": job.seeds}
        data = png_bytes(contact_sheet(rows), meta)
        atomic_write_bytes(path, data)
        copy = self.copy_path(path)
        if copy is not None:
            atomic_write_bytes(copy, data)
        for record in self.records:
            record["grid_file"] = str(path)
        return copy or path


def _render_drafts(batch: GenerationBatch, progress: Progress) -> dict[int, float]:
    """Render and save every seed's draft with the context model (freed afterwards); seconds per seed."""
    job = batch.job
    assert job.context_model is not None
    seconds: dict[int, float] = {}
    options = {"device": job.device, "precision": job.precision, "no_t5": job.no_t5}
    with context_pipeline(job.context_model, **options) as pipe:
        for seed in job.seeds:
            image, seconds[seed] = render_draft(
                pipe, job, seed, batch.settings, resolution=job.resolution or 512, progress=progress
            )
            batch.save_draft(seed, image)
    return seconds


def generate_images(batch: GenerationBatch, *, progress: Progress = no_progress) -> list[dict[str, Any]]:
    """Draft(s) with the context model, then per seed the subject model's inversion and denoise.

    Each draft, image and generation row is written as soon as it is made, so an interruption keeps every
    finished image (`batch.records`). Stages reported: draft, inversion, null-text, denoise. Returns the rows.
    """
    from stencil_cli import generation, models
    from stencil_cli.images import center_crop_resize

    job, settings = batch.job, batch.settings
    draft_seconds = _render_drafts(batch, progress) if job.mode == "context" else {}
    with subject_pipeline(job.subject_model, job.run, device=job.device, precision=job.precision) as pipe:
        job.resolution = job.resolution or models.native_resolution(pipe)
        if job.mode == "edit" and job.draft_image is not None:
            edit_draft = center_crop_resize(job.draft_image, job.resolution)
            for seed in job.seeds:
                batch.save_draft(seed, edit_draft)
        for seed in job.seeds:
            if job.mode == "plain":
                started = synced_clock(job.device)
                image = generation.plain_generate(
                    pipe, job.prompt, seed, settings, resolution=job.resolution, progress=progress
                )
                batch.save_image(seed, None, image, {"denoise": synced_clock(job.device) - started}, {})
                continue
            guided = guided_generation(
                pipe,
                read_rgb(batch.drafts[seed]),
                job.prompt,
                job.taus,
                settings,
                resolution=job.resolution,
                progress=progress,
            )
            # draft and inversion are per seed (shared by its taus); denoising per image
            timings = {"draft": draft_seconds.get(seed, 0.0), **guided.timings}
            extra = {
                "inner_iterations": guided.inversion.inner_iterations,
                "null_text_losses": guided.inversion.losses,
            }
            for tau, image in zip(job.taus, guided.images, strict=True):
                batch.save_image(seed, tau, image, timings, extra)
    return batch.records


# -- evaluation ----------------------------------------------------------------------------------


def clip_t_text(generation: dict[str, Any], subject: Subject) -> str:
    """The text CLIP-T compares with: the subject prompt the image was rendered from (phrase included)."""
    from stencil_cli.generation import build_prompts

    prompt = generation.get("prompt") or ""
    phrase = subject.phrase or subject.class_word
    if not phrase:
        return prompt
    try:
        return build_prompts(prompt, phrase).prompt
    except ValueError:
        return prompt


def score_generations(
    store: Store,
    subject: Subject,
    generations: list[dict[str, Any]],
    models: Any,
    *,
    on_missing: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Score `generations` of `subject` against its photos, store the scores, return one row per image.

    A generation whose image file is gone is skipped (and passed to `on_missing`).
    """
    from stencil_cli import evaluation
    from stencil_cli.images import load_rgb

    photos = [load_rgb(Path(image["file"])) for image in subject.images if Path(image["file"]).is_file()]
    if not photos:
        raise StencilError(f"subject {subject.name!r} has no photos to compare against")
    references = evaluation.embed_references(models, photos)
    present = [g for g in generations if g.get("image_file") and Path(g["image_file"]).is_file()]
    present_ids = {g["id"] for g in present}
    if on_missing is not None:
        for missing in (g for g in generations if g["id"] not in present_ids):
            on_missing(missing)
    images = [load_rgb(Path(g["image_file"])) for g in present]
    texts = [clip_t_text(g, subject) for g in present]
    scores = evaluation.score_images(models, images, references, texts)
    rows = []
    for generation, text, score in zip(present, texts, scores, strict=True):
        stored = {
            **score.to_dict(),
            "eval_models": models.refs.to_dict(),
            "clip_t_text": text,
            "references": references.count,
        }
        store.set_generation_scores(generation["id"], stored)
        rows.append(
            {
                "id": generation["id"],
                "prompt": generation.get("prompt"),
                "image_file": generation["image_file"],
                "scores": score.to_dict(),
                "clip_t_text": text,
            }
        )
    return rows
