"""`stencil train`: fine-tune the subject model with the Cross-Attention Guided Loss (METHOD.md, section 2).

Glue only: checks and refusals, the per-subject lock, the run row, progress and mask pictures. The loop and
the masks are in `training.py` / `attention.py`.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from stencil_cli.clikit import JsonOption, handle_errors
from stencil_cli.commands.options import DeviceOption, PrecisionOption, SubjectModelOption, setting
from stencil_cli.errors import BadInputError, StencilError
from stencil_cli.fsutil import atomic_write_bytes
from stencil_cli.output import escape, info, print_json, settings, warn
from stencil_cli.progress import add_task, progress_bar
from stencil_cli.store import Store, Subject, open_store

WEIGHTS_NAME = "weights.safetensors"
CHECKPOINT_NAME = "checkpoint.pt"
LOCK_NAME = ".train.lock"
MASKS_DIR = "masks"
DB_UPDATE_SECONDS = 1.0


# -- the per-subject lock ------------------------------------------------------------------------


@contextlib.contextmanager
def subject_lock(store: Store, name: str) -> Iterator[None]:
    """Hold an exclusive lock on the subject's training (released by the OS if the process dies)."""
    path = store.subject_dir(name) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    handle: IO[str] = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole block
    try:
        if not _try_lock(handle):
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StencilError(
                f"subject {name!r} is already being trained (pid {holder}); wait for it to finish "
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


# -- mask pictures -------------------------------------------------------------------------------


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


def _write_mask_pictures(
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


# -- helpers -------------------------------------------------------------------------------------


def _check_subject(store: Store, name: str, use_mask: bool) -> tuple[Subject, list[str]]:
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
    return subject, [image["caption"] for image in subject.images]


def _check_captions(tokenizer: Any, subject: Subject, captions: list[str]) -> None:
    """Every caption must contain the subject phrase (as tokens); name the photo that does not."""
    from stencil_cli.attention import find_phrase_positions

    for image, caption in zip(subject.images, captions, strict=True):
        try:
            find_phrase_positions(tokenizer, caption, subject.phrase or "")
        except BadInputError as error:
            raise BadInputError(
                f"photo {image['id']} of {subject.name!r}: {error}"
            ) from error


def _stale_runs(store: Store, name: str) -> None:
    """Runs still marked running while we hold the lock belong to a process that died: mark them."""
    for run in store.list_runs(name):
        if run["status"] == "running":
            store.finish_run(run["id"], "interrupted", error="the training process ended unexpectedly")


def _resumable_run(store: Store, name: str) -> dict[str, Any]:
    """The newest interrupted/failed run of `name` that has a checkpoint."""
    for run in reversed(store.list_runs(name)):
        checkpoint = store.run_dir(name, run["id"]) / CHECKPOINT_NAME
        if run["status"] in ("interrupted", "failed") and checkpoint.is_file():
            return run
    raise StencilError(
        f"no interrupted run of {name!r} has a checkpoint to resume from "
        "(train with --checkpoint-every N to make a run resumable)"
    )


def _training_precision(precision: str, device: Any) -> str:
    import torch

    from stencil_cli.models import resolve_dtype

    dtype = resolve_dtype(precision, device)
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def _model_ref(ref: str) -> str:
    """The subject-model reference to store: local folders as absolute paths, others as given."""
    from stencil_cli.models import resolve_ref

    source = resolve_ref(ref)
    return str(source.path) if source.kind == "local" and source.path else ref


# -- the command ---------------------------------------------------------------------------------


@handle_errors
def train(
    name: Annotated[str, typer.Argument(help="Subject name.")],
    steps: Annotated[int | None, typer.Option("--steps", help="Training steps (default 100).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Photos per step (with replacement).")] = 6,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 2e-5,
    threshold: Annotated[
        float, typer.Option("--threshold", help="Mask threshold p_t on the normalised attention map.")
    ] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Seed for masks, sampling and noise.")] = 0,
    resolution: Annotated[
        int | None,
        typer.Option("--resolution", help="Image size, centre crop (default: the model's, 512 for SD1.5)."),
    ] = None,
    train_what: Annotated[
        str, typer.Option("--train", help="decoder (up_blocks, the paper) or all (the whole UNet).")
    ] = "decoder",
    no_mask: Annotated[
        bool, typer.Option("--no-mask", help="Plain MSE, no attention mask (the DreamBooth-style ablation).")
    ] = False,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Trade compute for GPU memory.")
    ] = False,
    save_dtype: Annotated[
        str, typer.Option("--save-dtype", help="dtype of the saved weights: fp16, bf16 or fp32.")
    ] = "fp16",
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Write a resumable checkpoint every N steps (0: off).")
    ] = 0,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the newest interrupted run from its checkpoint.")
    ] = False,
    masks_only: Annotated[
        bool, typer.Option("--masks-only", help="Only compute and save the mask pictures; do not train.")
    ] = False,
    subject_model: SubjectModelOption = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    json_output: JsonOption = False,
) -> None:
    """Fine-tune the subject model on a captioned subject; saves the trained weights as safetensors."""
    from stencil_cli import models, training

    store = open_store()
    run: dict[str, Any] | None = None
    if resume and masks_only:
        raise BadInputError("--resume and --masks-only do not go together")
    store.get_subject(name)  # a clear NotFoundError when the subject does not exist
    with subject_lock(store, name):
        _stale_runs(store, name)
        if resume:
            run = _resumable_run(store, name)
            config = training.TrainConfig.from_params(run["params"])
            if steps is not None:
                config.steps = steps
            model_ref = run["params"].get("subject_model") or run["base_model"]
        else:
            config = training.TrainConfig(
                steps=100 if steps is None else steps,
                batch_size=batch_size,
                lr=lr,
                threshold=threshold,
                seed=seed,
                resolution=resolution or 512,  # replaced by the model's size below
                train=train_what,
                use_mask=not no_mask,
                save_dtype=save_dtype,
                gradient_checkpointing=gradient_checkpointing,
                checkpoint_every=checkpoint_every,
            )
            model_ref = _model_ref(setting(store, "subject_model", subject_model))
        config.validate()  # bad options fail before the model loads
        subject, captions = _check_subject(store, name, config.use_mask or masks_only)
        if run is not None and run["params"].get("images") != [image["id"] for image in subject.images]:
            raise StencilError(
                f"the photos of {name!r} changed since run {run['id']}; start a fresh run (without --resume)"
            )
        torch_device = models.resolve_device(setting(store, "device", device))
        if not resume:
            config.precision = _training_precision(setting(store, "precision", precision), torch_device)
        info(f"loading subject model {escape(model_ref)} on {torch_device} ...")
        pipe = models.load_subject_pipeline(model_ref, device=str(torch_device), precision="fp32")
        if resolution is None and not resume:
            config.resolution = training.default_resolution(pipe)
        config.validate()
        if config.use_mask or masks_only:
            _check_captions(pipe.tokenizer, subject, captions)
        started = time.monotonic()
        live = Live()
        if run is None and not masks_only:
            params = {**config.to_params(), "subject_model": model_ref, "phrase": subject.phrase,
                      "images": [image["id"] for image in subject.images]}
            run = store.create_run(name, params, model_ref)
        elif run is not None:
            store.update_run(run["id"], status="running", finished=None, error=None)
        try:
            _run(
                store, subject, captions, pipe, config, model_ref, run, started, masks_only, json_output, live
            )
        except KeyboardInterrupt:
            if run is not None:
                _finish_interrupted(store, name, run, started, live)
            raise
        except BaseException as error:
            if run is not None:
                message = str(error)
                if not isinstance(error, StencilError):
                    message = f"{type(error).__name__}: {error}"
                _finish(store, run, "failed", started, error=message)
            raise


@dataclass
class Live:
    """Where training has got to (read when the run is interrupted)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)


def _finish(store: Store, run: dict[str, Any], status: str, started: float, **values: Any) -> None:
    previous = float(run.get("duration_s") or 0.0)
    store.finish_run(run["id"], status, duration_s=round(previous + time.monotonic() - started, 3), **values)


def _finish_interrupted(store: Store, name: str, run: dict[str, Any], started: float, live: Live) -> None:
    _finish(store, run, "interrupted", started, step=live.step, losses=live.losses)
    if (store.run_dir(name, run["id"]) / CHECKPOINT_NAME).is_file():
        info(f"run {run['id']} interrupted; continue it with `stencil train {escape(name)} --resume`")
    else:
        info(f"run {run['id']} interrupted (no checkpoint: use --checkpoint-every N to make runs resumable)")


def _run(
    store: Store,
    subject: Subject,
    captions: list[str],
    pipe: Any,
    config: Any,
    model_ref: str,
    run: dict[str, Any] | None,
    started: float,
    masks_only: bool,
    json_output: bool,
    live: Live,
) -> None:
    """The mask pass, then (unless masks_only) the training loop and the weights file."""
    from stencil_cli import models, training
    from stencil_cli.images import load_rgb

    name = subject.name
    photos = [load_rgb(Path(image["file"])) for image in subject.images]
    with progress_bar() as progress:
        task = add_task(progress, "masks" if config.use_mask or masks_only else "encoding", total=None)
        mask_config = config
        if masks_only and not config.use_mask:
            mask_config = training.TrainConfig.from_params({**config.to_params(), "use_mask": True})
        data = training.prepare_training_data(pipe, photos, captions, subject.phrase, mask_config)
        progress.update(task, total=1, completed=1)
    mask_rows: list[dict[str, Any]] = []
    if mask_config.use_mask:
        folders = [store.subject_dir(name) / MASKS_DIR]
        if run is not None:
            folders.insert(0, store.run_dir(name, run["id"]) / MASKS_DIR)
        mask_rows = _write_mask_pictures(folders, subject, data, captions, config.threshold)
        for row in mask_rows:
            if row["coverage"] >= 0.99 or row["coverage"] <= 0.01:
                warn(f"the mask of photo {row['image_id']} covers {row['coverage']:.0%}; see {row['file']}")
    if masks_only:
        if json_output:
            print_json({"subject": name, "masks": mask_rows})
        else:
            for row in mask_rows:
                typer.echo(f"{row['image_id']:>4}  {row['coverage']:>4.0%}  {row['file']}")
        return
    assert run is not None
    run_dir = store.run_dir(name, run["id"])
    checkpoint_path = run_dir / CHECKPOINT_NAME
    resume_state = training.load_checkpoint(checkpoint_path) if checkpoint_path.is_file() else None
    unet, scheduler = pipe.unet, pipe.scheduler
    models.free_pipeline(pipe)  # the VAE and text encoder are done; keep only the UNet
    live.step = int(resume_state["step"]) if resume_state else 0
    live.losses = [float(x) for x in resume_state["losses"]] if resume_state else []
    last_write = 0.0

    with progress_bar() as progress:
        task = add_task(progress, f"training {escape(name)}", total=config.steps)
        progress.update(task, completed=live.step)

        def on_step(step: int, loss: float) -> None:
            nonlocal last_write
            live.step = step
            live.losses.append(loss)
            progress.update(task, completed=step, status=f"loss {loss:.4f}")
            now = time.monotonic()
            if step == 1 or now - last_write >= DB_UPDATE_SECONDS:
                last_write = now
                store.update_run(run["id"], step=step, losses=live.losses)

        result = training.train_unet(
            unet, scheduler, data, config,
            checkpoint_path=checkpoint_path, resume=resume_state, on_step=on_step,
        )
    weights = run_dir / WEIGHTS_NAME
    tensors = training.trained_state(unet, result.names, training.SAVE_DTYPES[config.save_dtype])
    metadata = training.weights_metadata(
        config, model_ref, result.names, subject=name, phrase=subject.phrase or "", run_id=str(run["id"])
    )
    training.save_trained_weights(weights, tensors, metadata)
    _finish(store, run, "done", started, weights_path=weights, losses=result.losses, step=result.steps)
    checkpoint_path.unlink(missing_ok=True)
    finished = store.get_run(name, run["id"])
    if json_output:
        print_json({**finished, "masks": mask_rows})
        return
    typer.echo(
        f"trained {name}: run {run['id']}, {result.steps} steps, final loss {result.losses[-1]:.4f}, "
        f"{finished['duration_s']:.1f} s -> {weights}"
    )


def show_masks(name: str, json_output: bool) -> None:
    """`stencil show NAME --masks`: one line per photo with its mask picture's path (stdout)."""
    store = open_store()
    subject = store.get_subject(name)
    rows = [
        {"image_id": image["id"], "sha256": image["sha256"], "file": str(path) if path else None}
        for image, path in mask_files(store, subject)
    ]
    if json_output:
        print_json({"subject": name, "masks": rows})
        return
    if not any(row["file"] for row in rows):
        info(f"no mask pictures for {escape(name)} yet: run `stencil train {escape(name)} --masks-only`")
        return
    for row in rows:
        typer.echo(f"{row['image_id']:>4}  {row['file'] or '(none yet)'}")


def register(app: typer.Typer) -> None:
    """Register `stencil train` on `app`."""
    app.command()(train)
    _ = settings
