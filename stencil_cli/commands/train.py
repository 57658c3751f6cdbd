"""`stencil train`: fine-tune the subject model with the Cross-Attention Guided Loss (METHOD.md, section 2).

Parse and present only: the checks, the per-subject lock, the run row, the mask pictures and the weights file
are in `workflows.py`; the loop and the masks in `training.py` / `attention.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer

from stencil_cli import workflows
from stencil_cli.clikit import JsonOption, handle_errors
from stencil_cli.commands.options import DeviceOption, PrecisionOption, SubjectModelOption, setting
from stencil_cli.errors import BadInputError
from stencil_cli.output import escape, info, print_json, warn
from stencil_cli.progress import add_task, progress_bar
from stencil_cli.store import Store, Subject, open_store

if TYPE_CHECKING:
    from rich.progress import Progress


# -- progress ------------------------------------------------------------------------------------


@dataclass
class TrainProgress:
    """Maps the workflow's progress hook onto rich bars: the mask pass, then steps with the loss."""

    progress: Progress
    name: str
    tasks: dict[str, int] = field(default_factory=dict)

    def __call__(self, stage: str, step: int, total: int | None, extra: dict[str, Any]) -> None:
        """The hook."""
        if stage == "mask pictures":
            _warn_about_masks(extra["masks"])
            return
        if stage not in self.tasks:
            label = f"training {escape(self.name)}" if stage == "train" else stage
            self.tasks[stage] = add_task(self.progress, label, total=total if stage == "train" else None)
        task = self.tasks[stage]
        if stage == "train":
            status = f"loss {extra['loss']:.4f}" if "loss" in extra else ""
            self.progress.update(task, completed=step, status=status)
        elif total is not None and step >= total:
            self.progress.update(task, total=1, completed=1)


def _warn_about_masks(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        if row["coverage"] >= 0.99 or row["coverage"] <= 0.01:
            warn(f"the mask of photo {row['image_id']} covers {row['coverage']:.0%}; see {row['file']}")


# -- the command ---------------------------------------------------------------------------------


@handle_errors
def train(
    name: Annotated[str, typer.Argument(help="Subject name.")],
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, max=100_000, help="Training steps (default 100).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Photos per step (with replacement).")] = 6,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 2e-5,
    threshold: Annotated[
        float, typer.Option("--threshold", help="Mask threshold p_t on the normalised attention map.")
    ] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Seed for masks, sampling and noise.")] = 0,
    resolution: Annotated[
        int | None,
        typer.Option(
            "--resolution",
            min=64,
            max=2048,
            help="Image size, centre crop (default: the model's, 512 for SD1.5).",
        ),
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
    context: typer.Context = None,  # type: ignore[assignment] # typer passes it; None when called directly
) -> None:
    """Fine-tune the subject model on a captioned subject; saves the trained weights as safetensors."""
    from stencil_cli import training

    if resume and masks_only:
        raise BadInputError("--resume and --masks-only do not go together")
    store = open_store()
    store.get_subject(name)  # a clear NotFoundError when the subject does not exist
    with workflows.subject_lock(store, name):
        workflows.mark_stale_runs(store, name)
        run = workflows.resumable_run(store, name) if resume else None
        if run is not None:
            config, model_ref = _resumed_config(run, steps)
            _refuse_resume_changes(
                context,
                run,
                config,
                model_ref,
                {
                    "batch_size": batch_size,
                    "lr": lr,
                    "threshold": threshold,
                    "seed": seed,
                    "resolution": resolution,
                    "train_what": train_what,
                    "no_mask": no_mask,
                    "gradient_checkpointing": gradient_checkpointing,
                    "save_dtype": save_dtype,
                    "checkpoint_every": checkpoint_every,
                    "subject_model": subject_model,
                    "precision": precision,
                },
            )
        else:
            config = training.TrainConfig(
                steps=100 if steps is None else steps,
                batch_size=batch_size,
                lr=lr,
                threshold=threshold,
                seed=seed,
                resolution=resolution or 512,  # replaced by the model's size when not given
                train=train_what,
                use_mask=not no_mask,
                save_dtype=save_dtype,
                gradient_checkpointing=gradient_checkpointing,
                checkpoint_every=checkpoint_every,
            )
            model_ref = workflows.stored_model_ref(setting(store, "subject_model", subject_model))
        config.validate()  # bad options fail before the model loads
        subject, captions = workflows.check_subject(store, name, config.use_mask or masks_only)
        if run is not None and not workflows.check_resume(run, subject, captions):
            warn(f"run {run['id']} predates caption checks: resuming with the current captions and phrase")
        if run is not None:
            workflows.check_resume_steps(store, name, run, config.steps)
        fresh = run is None
        pipe = _load_model(store, model_ref, config, device, precision, fresh=fresh, resolution=resolution)
        if config.use_mask or masks_only:
            workflows.check_captions(pipe.tokenizer, subject, captions)
        if masks_only:
            _masks_only(store, subject, pipe, config, json_output)
            return
        if run is None:
            run = workflows.start_run(store, subject, config, model_ref)
        else:
            workflows.reopen_run(store, run, config.steps)
        outcome = _train(store, subject, pipe, config, model_ref, run)
    _present(name, outcome, json_output)


def _resumed_config(run: dict[str, Any], steps: int | None) -> tuple[Any, str]:
    """The interrupted run's settings (a new --steps may extend it) and the model it trained."""
    from stencil_cli import training

    config = training.TrainConfig.from_params(run["params"])
    if steps is not None:
        config.steps = steps
    return config, run["params"].get("subject_model") or run["base_model"]


RESUME_FLAGS = {
    "batch_size": "--batch-size",
    "lr": "--lr",
    "threshold": "--threshold",
    "seed": "--seed",
    "resolution": "--resolution",
    "train_what": "--train",
    "no_mask": "--no-mask",
    "gradient_checkpointing": "--gradient-checkpointing",
    "save_dtype": "--save-dtype",
    "checkpoint_every": "--checkpoint-every",
    "subject_model": "--subject-model",
    "precision": "--precision",
}


def _given_on_the_command_line(context: typer.Context | None, parameter: str) -> bool:
    """Whether the user typed this option (not its default, nor an environment variable's value)."""
    if context is None:
        return False
    source = context.get_parameter_source(parameter)
    return source is not None and source.name == "COMMANDLINE"


def _refuse_resume_changes(
    context: typer.Context | None, run: dict[str, Any], config: Any, model_ref: str, given: dict[str, Any]
) -> None:
    """--resume keeps the run's settings: refuse typed options that differ from them (only --steps and
    --device may change), instead of silently ignoring them."""
    kept = {
        "batch_size": config.batch_size,
        "lr": config.lr,
        "threshold": config.threshold,
        "seed": config.seed,
        "resolution": config.resolution,
        "train_what": config.train,
        "no_mask": not config.use_mask,
        "gradient_checkpointing": config.gradient_checkpointing,
        "save_dtype": config.save_dtype,
        "checkpoint_every": config.checkpoint_every,
        "precision": config.precision,
    }
    conflicting = []
    for parameter, value in given.items():
        if not _given_on_the_command_line(context, parameter):
            continue
        if parameter == "subject_model":
            differs = workflows.stored_model_ref(value) != model_ref
        else:
            differs = value != kept[parameter]
        if differs:
            conflicting.append(RESUME_FLAGS[parameter])
    if conflicting:
        raise BadInputError(
            f"--resume continues run {run['id']} with its own settings: drop {', '.join(conflicting)} "
            "(only --steps and --device may change; start a fresh run to change the others)"
        )


def _load_model(
    store: Store,
    model_ref: str,
    config: Any,
    device: str | None,
    precision: str | None,
    *,
    fresh: bool,
    resolution: int | None,
) -> Any:
    """Load the subject model; a fresh run takes its precision and (unless given) resolution from it."""
    from stencil_cli import models

    torch_device = models.resolve_device(setting(store, "device", device))
    if fresh:
        config.precision = workflows.training_precision(setting(store, "precision", precision), torch_device)
    info(f"loading subject model {escape(model_ref)} on {torch_device} ...")
    pipe = workflows.load_training_pipeline(model_ref, torch_device)
    if fresh and resolution is None:
        config.resolution = models.native_resolution(pipe)
    config.validate()
    return pipe


def _masks_only(store: Store, subject: Subject, pipe: Any, config: Any, json_output: bool) -> None:
    """`--masks-only`: the mask pass and its pictures, no run."""
    mask_config = dataclasses.replace(config, use_mask=True)
    with progress_bar() as progress:
        _, rows = workflows.make_masks(
            store, subject, pipe, mask_config, progress=TrainProgress(progress, subject.name)
        )
    if json_output:
        print_json({"subject": subject.name, "masks": rows})
        return
    for row in rows:
        typer.echo(f"{row['image_id']:>4}  {row['coverage']:>4.0%}  {row['file']}")


def _train(
    store: Store, subject: Subject, pipe: Any, config: Any, model_ref: str, run: dict[str, Any]
) -> workflows.TrainOutcome:
    """Train under progress bars; after Ctrl-C say how to go on."""
    try:
        with progress_bar() as progress:
            return workflows.train_subject(
                store, subject, pipe, config, model_ref, run, progress=TrainProgress(progress, subject.name)
            )
    except KeyboardInterrupt:
        name = subject.name
        if (store.run_dir(name, run["id"]) / workflows.CHECKPOINT_NAME).is_file():
            info(f"run {run['id']} interrupted; continue it with `stencil train {escape(name)} --resume`")
        else:
            info(
                f"run {run['id']} interrupted "
                "(no checkpoint: use --checkpoint-every N to make runs resumable)"
            )
        raise


def _present(name: str, outcome: workflows.TrainOutcome, json_output: bool) -> None:
    """The finished run as JSON, or one line."""
    run = outcome.run
    if json_output:
        print_json({**run, "masks": outcome.masks})
        return
    typer.echo(
        f"trained {name}: run {run['id']}, {run['step']} steps, final loss {run['losses'][-1]:.4f}, "
        f"{run['duration_s']:.1f} s -> {run['weights_file']}"
    )


def show_masks(name: str, json_output: bool) -> None:
    """`stencil show NAME --masks`: one line per photo with its mask picture's path (stdout)."""
    store = open_store()
    subject = store.get_subject(name)
    rows = [
        {"image_id": image["id"], "sha256": image["sha256"], "file": str(path) if path else None}
        for image, path in workflows.mask_files(store, subject)
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
