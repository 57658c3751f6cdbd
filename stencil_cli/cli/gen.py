"""`stencil gen`: a trained subject in a new context (Context Guidance), photo editing, plain generation."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar

import typer
from rich.progress import Progress

from stencil_cli.base import events
from stencil_cli.base.errors import BadInputError
from stencil_cli.base.events import Stage
from stencil_cli.cli.kit import JsonOption, handle_errors
from stencil_cli.cli.options import (
    ContextModelOption,
    DeviceOption,
    NoT5Option,
    PrecisionOption,
    SubjectModelOption,
)
from stencil_cli.cli.output import err_console, escape, info, print_json_line, shown, warn
from stencil_cli.cli.progress import add_task, progress_bar
from stencil_cli.cli.stdin import read_stdin_text, stdin_is_terminal
from stencil_cli.store.db import open_store
from stencil_cli.verbs.generate import GenerateResult, SavedImage, generate
from stencil_cli.verbs.generation_plan import (
    MAX_IMAGES,
    MAX_SEED,
    GenerateRequest,
    GenerationPlan,
    parse_taus,
    plan_generation,
    prompt_lines,
)
from stencil_cli.verbs.rerun import request_from_png

FLAGS = {
    "count": "-n",
    "prompt": "the prompt",
    "run_id": "--run",
    "output": "-o",
    "draft": "--draft",
    "stdin": "the prompt '-' (stdin)",
    "model": "--caption-model",  # the captioner's `{model}` (for --rewrite) is gen's --caption-model
}


# -- progress ------------------------------------------------------------------------------------------------


@dataclass
class StageProgress:
    """Maps the generation's progress events onto one rich bar per stage (draft, inversion, denoise...)."""

    progress: Progress
    totals: dict[Stage, int]
    tasks: dict[Stage, int] = field(default_factory=dict)
    inner_total: int = 0

    LABELS: ClassVar[dict[Stage, str]] = {"inversion": "DDIM inversion"}  # the others show the stage's name

    def task(self, stage: Stage) -> int:
        """The rich task for `stage` (created on first use)."""
        if stage not in self.tasks:
            self.tasks[stage] = add_task(self.progress, self.LABELS.get(stage, stage), self.totals.get(stage))
        return self.tasks[stage]

    def __call__(self, event: events.Event) -> None:
        """The hook: advance the stage's bar; null-text shows inner-iteration counts and the loss."""
        match event:
            case events.Warning(text=text):
                warn(text)
            case events.Note(text=text):
                info(f"[dim]{escape(text)}[/dim]")
            case events.Reused(stage=stage, steps=steps):  # steps that needed no work (a kept draft)
                self.progress.update(self.task(stage), advance=steps)
            case events.NullTextIteration(step=step, total=total, inner=inner):
                self.progress.update(self.task(event.stage), status=f"step {step}/{total}: inner {inner}")
            case events.Step(stage=stage, samples=samples, inner=int(inner), loss=loss):  # a null-text step
                self.inner_total += inner
                self.progress.update(
                    self.task(stage),
                    advance=samples,
                    status=f"{self.inner_total} inner iterations, loss {loss:.2e}",
                )
            case events.Step(stage=stage, samples=samples):  # a batched step: `samples` seeds' steps
                self.progress.update(self.task(stage), advance=samples)


# -- the command -------------------------------------------------------------------------------------------


@handle_errors(flags=FLAGS)
def gen(
    name: Annotated[
        str | None,
        typer.Argument(
            help="The subject to render (see `stencil ls`); with --from-png, the image's own subject.",
            show_default=False,
        ),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Argument(
            help="What to render. Without the subject phrase or a {} placeholder it becomes "
            "'a PHRASE PROMPT' (e.g. 'in a Superman outfit'). '-' reads one prompt per line from stdin.",
            show_default=False,
        ),
    ] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option(
            "--prompts-file",
            help="Read the prompts from this file: one per line, '#' starts a comment line.",
            show_default=False,
        ),
    ] = None,
    negative: Annotated[
        str | None,
        typer.Option(
            "--negative",
            help="Negative prompt for the denoise (after the injected steps) and the draft.",
            show_default=False,
        ),
    ] = None,
    count: Annotated[
        int, typer.Option("-n", "--count", help="Images (seeds) to make.", min=1, max=MAX_IMAGES)
    ] = 1,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            help="First seed; image i uses seed + i. [default: random]",
            min=0,
            max=MAX_SEED,
        ),
    ] = None,
    tau: Annotated[
        str,
        typer.Option(
            "--tau",
            help="Guidance strength in [0, 1000]: higher keeps more of the draft. A list (20,60,200) reuses "
            "one draft and one inversion.",
        ),
    ] = "60",
    steps: Annotated[int, typer.Option("--steps", help="DDIM steps.", min=1, max=1000)] = 50,
    inner_steps: Annotated[
        int, typer.Option("--inner-steps", help="Null-text optimisation iterations per step.", min=1)
    ] = 10,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")] = 7.5,
    null_lr: Annotated[
        float, typer.Option("--null-lr", help="Null-text learning rate (decays as lr * (1 - i/100)).")
    ] = 1e-2,
    inversion: Annotated[
        str,
        typer.Option("--inversion", help="nti (null-text, faithful) or npi (negative-prompt, ~30x faster)."),
    ] = "nti",
    draft: Annotated[
        Path | None,
        typer.Option(
            "--draft", help="Use this image as the draft instead of rendering one (subject editing)."
        ),
    ] = None,
    no_context: Annotated[
        bool,
        typer.Option(
            "--no-context", help="Plain generation with the fine-tuned model: no draft, no inversion."
        ),
    ] = False,
    draft_steps: Annotated[
        int | None,
        typer.Option(
            "--draft-steps",
            help="Draft-model steps. [default: the draft model's preset (e.g. flux-schnell 4, sd35-medium "
            "40), else 50]",
            min=1,
            show_default=False,
        ),
    ] = None,
    draft_guidance: Annotated[
        float | None,
        typer.Option(
            "--draft-guidance",
            help="Draft-model guidance scale. [default: the draft model's preset (e.g. flux-schnell and "
            "sd35-large-turbo 0), else 7.5]",
            show_default=False,
        ),
    ] = None,
    run_id: Annotated[
        int | None, typer.Option("--run", help="Use this training run. [default: the newest done run]")
    ] = None,
    output: Annotated[
        str | None,  # text, not a Path: Click reads an empty path as "." (the current folder)
        typer.Option(
            "-o", "--output", metavar="PATH", help="Also copy the images (and drafts, grid) into this folder."
        ),
    ] = None,
    grid: Annotated[
        bool, typer.Option("--grid", help="Also write a contact sheet: each draft, then each tau.")
    ] = False,
    draft_prompt: Annotated[
        str | None,
        typer.Option(
            "--draft-prompt",
            help="Use this text as the context model's draft prompt instead of the one built from the "
            "subject's description.",
        ),
    ] = None,
    rewrite: Annotated[
        bool,
        typer.Option(
            "--rewrite",
            help="Let the caption model write the draft prompt from your prompt and the subject's photos "
            "(one request per subject and prompt, cached).",
        ),
    ] = False,
    captioner: Annotated[
        str | None,
        typer.Option(
            "--captioner",
            envvar="STENCIL_CAPTIONER",
            help="For --rewrite: openai (vision model; needs OPENAI_API_KEY) or template (no request: the "
            "rule-made draft prompt). [default: openai]",
            show_default=False,
        ),
    ] = None,
    caption_model: Annotated[
        str | None,
        typer.Option(
            "--caption-model",
            envvar="STENCIL_CAPTION_MODEL",
            help="For --rewrite: the vision model (default: as `stencil caption`, gpt-4o).",
            show_default=False,
        ),
    ] = None,
    from_png: Annotated[
        Path | None,
        typer.Option(
            "--from-png",
            help="Render an image stencil made again: its subject, prompt, seed, tau, run and settings, read "
            "from its PNG metadata (only where-to-run flags apply: --device, --precision, -o, --batch-size).",
            show_default=False,
        ),
    ] = None,
    lora_scale: Annotated[
        float,
        typer.Option(
            "--lora-scale",
            help="Strength of the run's update, 0-2: a LoRA's scale; a full run interpolated towards the "
            "base model (0 = the base, 1 = as trained). Recorded in each image's metadata.",
        ),
    ] = 1.0,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            envvar="STENCIL_BATCH_SIZE",
            help="Seeds drafted, inverted and denoised together (fewer, larger model calls; the same images "
            "as one at a time within float tolerance). Lower it if memory runs out. "
            "[default: 4 on the CPU and on GPUs with 40 GB or more, else 1]",
            show_default=False,
        ),
    ] = None,
    show_prompts: Annotated[
        bool, typer.Option("--show-prompts", help="Print the subject prompt and the draft prompt.")
    ] = False,
    subject_model: SubjectModelOption = None,
    context_model: ContextModelOption = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    no_t5: NoT5Option = False,
    json_output: JsonOption = False,
) -> None:
    """Render a trained subject in a new context: draft -> null-text inversion -> guided denoise."""
    if from_png is not None:
        if prompt is not None or prompts_file is not None:
            raise BadInputError("give a prompt or --from-png, not both: the image's prompt is re-run")
        request = request_from_png(from_png, name)
        request.device, request.precision, request.output = device, precision, output
        request.batch_size, request.grid = batch_size, grid
    else:
        if name is None:
            raise BadInputError(
                "say which subject to render (see `stencil ls`), or re-run an image with --from-png"
            )
        request = GenerateRequest(
            name=name,
            prompts=_prompts(prompt, prompts_file),
            negative=negative,
            count=count,
            seed=seed,
            taus=parse_taus(tau),
            steps=steps,
            inner_steps=inner_steps,
            guidance=guidance,
            null_lr=null_lr,
            inversion=inversion,
            draft_steps=draft_steps,
            draft_guidance=draft_guidance,
            draft=draft,
            no_context=no_context,
            run_id=run_id,
            output=output,
            grid=grid,
            subject_model=subject_model,
            context_model=context_model,
            device=device,
            precision=precision,
            no_t5=no_t5,
            batch_size=batch_size,
            draft_prompt=draft_prompt,
            rewrite=rewrite,
            captioner=captioner,
            caption_model=caption_model,
            lora_scale=lora_scale,
        )
    store = open_store()
    plan = plan_generation(store, request)
    for message in plan.warnings:
        warn(message)
    for note in plan.notes:
        info(f"[dim]{shown(note)}[/dim]")
    if show_prompts:
        for item in plan.items[:1]:
            err_console.print(f"prompt:       {shown(item.prompt)}")
            err_console.print(f"draft prompt: {shown(item.draft_prompt)}")
    result = GenerateResult(plan)
    try:
        with progress_bar() as progress:
            hook = StageProgress(progress, plan.stage_totals())
            with contextlib.closing(generate(store, plan, progress=hook)) as saving:
                for saved in saving:  # each file as soon as it is written
                    result.add(saved)
                    if json_output and isinstance(saved, SavedImage):
                        _json_line(saved)
    except (KeyboardInterrupt, Exception):
        if result.images or result.drafts:
            info(
                f"[yellow]stopped after {len(result.images)} of {plan.expected} image(s)[/yellow]; "
                f"kept what was finished in {escape(str(plan.folder))}"
            )
        if result.images:  # what was finished, as the normal end prints it (JSON lines were printed already)
            _present(result, plan, json_output, finished=False)
        raise
    if result.grid_file is not None:
        info(f"contact sheet: {escape(str(result.grid_file))}")
    _present(result, plan, json_output)


def _prompts(prompt: str | None, prompts_file: Path | None) -> list[str]:
    """The prompt argument, the lines of --prompts-file, or (for '-') the lines of stdin."""
    if prompt is not None and prompts_file is not None:
        raise BadInputError("give the prompt or --prompts-file, not both")
    if prompts_file is not None:
        path = Path(prompts_file).expanduser()
        if path.is_dir():
            raise BadInputError(f"--prompts-file {path} is a folder: give a text file, one prompt per line")
        if not path.is_file():
            raise BadInputError(f"--prompts-file {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise BadInputError(f"--prompts-file {path} cannot be read as UTF-8 text: {error}") from None
        return prompt_lines(text)
    if prompt is None:
        raise BadInputError("say what to render: a prompt, '-' to read prompts from stdin, or --prompts-file")
    if prompt == "-":
        if stdin_is_terminal():
            raise BadInputError(
                "the prompt '-' reads prompts from stdin, but stdin is a terminal: pipe them in"
            )
        return prompt_lines(read_stdin_text("the prompt '-'", "--prompts-file"), "stdin")
    return [prompt]


def _json_line(saved: SavedImage) -> None:
    """One JSON line per image as soon as it is saved (JSON Lines: a pipe sees each image at once)."""
    print_json_line(saved.to_dict())


def _present(
    result: GenerateResult, plan: GenerationPlan, json_output: bool, *, finished: bool = True
) -> None:
    """One image path per line (stdout) and a summary (stderr); with --json the lines were printed already
    as each image was saved. After an interruption (`finished=False`): the images made so far, no summary."""
    if json_output:
        return
    for saved in result.images:
        typer.echo(saved.output_file or saved.generation.image_file)
    if not finished:
        return
    where = plan.output if plan.output is not None else plan.folder
    info(f"[green]made {len(result.images)} image(s)[/green] in {escape(str(where))}")


def register(app: typer.Typer) -> None:
    """Register `stencil gen`."""
    app.command("gen", no_args_is_help=True)(gen)
