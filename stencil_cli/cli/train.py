"""`stencil train`: fine-tune the subject model with the Cross-Attention Guided Loss (METHOD.md, section 2).

Parse, call the train verb (`verbs/train.py`), present.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import typer
from rich.progress import Progress

from stencil_cli.base import events
from stencil_cli.base.events import Stage
from stencil_cli.cli.kit import JsonOption, given_fields, handle_errors
from stencil_cli.cli.options import DeviceOption, PrecisionOption, SubjectModelOption
from stencil_cli.cli.output import escape, info, print_json, warn
from stencil_cli.cli.progress import add_task, progress_bar
from stencil_cli.store.db import Store, open_store
from stencil_cli.store.layout import CHECKPOINT_NAME
from stencil_cli.verbs.common import MAX_SEED
from stencil_cli.verbs.train import (
    MAX_BATCH_SIZE,
    MaskPicture,
    MaskPictures,
    TrainRequest,
    TrainResult,
)
from stencil_cli.verbs.train import train as train_verb

# -- progress ------------------------------------------------------------------------------------


@dataclass
class TrainProgress:
    """Maps the train verb's progress events onto rich bars: the mask pass (a spinner until it is done),
    then the steps with the loss, and the previews."""

    progress: Progress
    name: str
    tasks: dict[Stage, int] = field(default_factory=dict)

    def label(self, stage: Stage) -> str:
        """The bar's title for `stage`."""
        return {"train": f"training {escape(self.name)}", "samples": "previews"}.get(stage, stage)

    def __call__(self, event: events.Event) -> None:
        """The hook."""
        match event:
            case events.Loading(model=model, device=device):
                info(f"loading subject model {escape(model)} on {device} ...")
            case events.Warning(text=text):
                warn(text)
            case MaskPictures(masks=masks):
                _warn_about_masks(masks)
            case events.Working(stage=stage):  # one long step: no total until it is done
                self.tasks[stage] = add_task(self.progress, self.label(stage), total=None)
            case events.Step(stage=stage, step=step, total=total) if stage in self.tasks:
                self.progress.update(self.tasks[stage], total=total, completed=step, status=_status(event))
            case events.Step(stage=stage, step=step, total=total):
                self.tasks[stage] = add_task(self.progress, self.label(stage), total=total)
                self.progress.update(self.tasks[stage], completed=step, status=_status(event))


def _status(step: events.Step) -> str:
    """A bar's status: the loss of a training step, the training step a preview shows."""
    if step.loss is not None:
        return f"loss {step.loss:.4f}"
    return f"step {step.at}" if step.at is not None else ""


def _warn_about_masks(masks: list[MaskPicture]) -> None:
    for mask in masks:
        if mask.coverage >= 0.99 or mask.coverage <= 0.01:
            warn(f"the mask of photo {mask.image_id} covers {mask.coverage:.0%}; see {mask.file}")


# -- the command ---------------------------------------------------------------------------------


FLAGS = {  # flags unlike --field-name
    "train": "--train",
    "use_mask": "--no-mask",
    "lora_rank": "--lora",
    "sample_prompts": "--sample-prompt",
}
RENAMED = {  # parameters unlike their field
    "train_what": "train",
    "no_mask": "use_mask",
    "lora": "lora_rank",
    "sample_prompt": "sample_prompts",
}


@handle_errors(flags=FLAGS)
def train(
    name: Annotated[str, typer.Argument(help="Subject name.")],
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, max=100_000, help="Training steps (default 100).")
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            min=1,
            max=MAX_BATCH_SIZE,
            help=f"Photos per step (with replacement), 1-{MAX_BATCH_SIZE}.",
        ),
    ] = 6,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Adam learning rate (default 2e-5; 1e-4 with --lora).", show_default=False),
    ] = None,
    threshold: Annotated[
        float, typer.Option("--threshold", help="Mask threshold p_t on the normalised attention map.")
    ] = 0.2,
    seed: Annotated[
        int, typer.Option("--seed", min=0, max=MAX_SEED, help="Seed for masks, sampling and noise.")
    ] = 0,
    resolution: Annotated[
        int | None,
        typer.Option(
            "--resolution",
            min=64,
            max=2048,
            help="Size of the photos' square crops (default: the model's, 512 for SD1.5).",
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
        str,
        typer.Option(
            "--save-dtype",
            help="dtype of the saved weights: fp32 (exact), fp16 (half the file; loses ~1% of the update) "
            "or bf16.",
        ),
    ] = "fp32",
    mask_from: Annotated[
        str,
        typer.Option(
            "--mask-from",
            help="Condition the mask pass on the caption (the paper), or average the authors' "
            "[empty prompt, caption] batch (both).",
        ),
    ] = "caption",
    crop: Annotated[
        str,
        typer.Option(
            "--crop",
            help="Where non-square photos are cut to a square: on the subject, found by a mask pass on the "
            "whole photo (subject), or in the middle (centre, the paper's). Square photos are not cut.",
        ),
    ] = "subject",
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Write a resumable checkpoint every N steps (0: off).")
    ] = 0,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the newest interrupted run from its checkpoint.")
    ] = False,
    masks_only: Annotated[
        bool, typer.Option("--masks-only", help="Only compute and save the mask pictures; do not train.")
    ] = False,
    lora: Annotated[
        int | None,
        typer.Option(
            "--lora",
            metavar="RANK",
            help="Train LoRA adapters of this rank on the decoder's attention layers instead of fine-tuning "
            "the decoder itself (a few-MB file; the full decoder fine-tune is the paper's method and the "
            "default).",
            show_default=False,
        ),
    ] = None,
    lora_alpha: Annotated[
        float | None,
        typer.Option(
            "--lora-alpha",
            metavar="A",
            help="LoRA scale numerator: updates are scaled by alpha / rank (default: alpha = rank, scale 1). "
            "Needs --lora.",
            show_default=False,
        ),
    ] = None,
    sample_every: Annotated[
        int | None,
        typer.Option(
            "--sample-every",
            metavar="N",
            help="Render previews with the current weights every N steps (and after the last step) into the "
            "run's samples/ folder. Needs --sample-prompt.",
            show_default=False,
        ),
    ] = None,
    sample_prompt: Annotated[
        list[str] | None,
        typer.Option(
            "--sample-prompt",
            metavar="TEXT",
            help="A preview prompt (repeatable), through the prompt rules: 'on a beach' renders "
            "'a PHRASE on a beach'. Without --sample-every: previews after the last step only.",
            show_default=False,
        ),
    ] = None,
    sample_steps: Annotated[
        int | None,
        typer.Option(
            "--sample-steps",
            metavar="K",
            help="DDIM steps per preview (1-1000; default 20). Previews use --seed.",
            show_default=False,
        ),
    ] = None,
    subject_model: SubjectModelOption = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    json_output: JsonOption = False,
    context: typer.Context = None,  # type: ignore[assignment] # typer passes it; None when called directly
) -> None:
    """Fine-tune the subject model on a captioned subject; saves the trained weights as safetensors."""
    request = TrainRequest(
        name=name,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        threshold=threshold,
        seed=seed,
        resolution=resolution,
        train=train_what,
        use_mask=not no_mask,
        gradient_checkpointing=gradient_checkpointing,
        save_dtype=save_dtype,
        mask_from=mask_from,
        crop=crop,
        checkpoint_every=checkpoint_every,
        resume=resume,
        masks_only=masks_only,
        subject_model=subject_model,
        device=device,
        precision=precision,
        lora_rank=lora,
        lora_alpha=lora_alpha,
        sample_every=sample_every,
        sample_prompts=tuple(sample_prompt or ()),
        sample_steps=sample_steps,
        given=given_fields(context, RENAMED),
    )
    store = open_store()
    try:
        with progress_bar() as progress:
            result = train_verb(store, request, progress=TrainProgress(progress, name))
    except KeyboardInterrupt:
        _say_how_to_resume(store, name)
        raise
    _present(result, json_output)


def _say_how_to_resume(store: Store, name: str) -> None:
    """After Ctrl-C: how to go on with the interrupted run (if one was started)."""
    runs = store.list_runs(name) if store.find_subject(name) else []
    run = runs[-1] if runs else None
    if run is None or run.status != "interrupted":
        return
    if (store.run_dir(name, run.id) / CHECKPOINT_NAME).is_file():
        info(f"run {run.id} interrupted; continue it with `stencil train {escape(name)} --resume`")
    else:
        info(f"run {run.id} interrupted (no checkpoint: use --checkpoint-every N to make runs resumable)")


def _present(result: TrainResult, json_output: bool) -> None:
    """The finished run (or the mask pictures) as JSON, or as lines."""
    masks = [mask.to_dict() for mask in result.masks]
    run = result.run
    if run is None:  # --masks-only
        if json_output:
            print_json({"subject": result.subject, "masks": masks})
            return
        for mask in result.masks:
            typer.echo(f"{mask.image_id:>4}  {mask.coverage:>4.0%}  {mask.file}")
        return
    if json_output:
        print_json({**run.to_dict(), "masks": masks})
        return
    loss = f"{run.final_loss:.4f}" if run.final_loss is not None else "-"
    kind = f"LoRA rank {run.params['lora_rank']} " if run.kind == "lora" else ""
    typer.echo(
        f"trained {result.subject}: {kind}run {run.id}, {run.step} steps, final loss {loss}, "
        f"{run.duration_s or 0:.1f} s -> {run.weights_file}"
    )


def register(app: typer.Typer) -> None:
    """Register `stencil train` on `app`."""
    app.command()(train)
