"""`stencil gen`: a trained subject in a new context (Context Guidance), photo editing, plain generation."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from stencil_cli import workflows
from stencil_cli.clikit import JsonOption, handle_errors
from stencil_cli.commands.options import (
    ContextModelOption,
    DeviceOption,
    NoT5Option,
    PrecisionOption,
    SubjectModelOption,
    setting,
)
from stencil_cli.errors import BadInputError, StencilError
from stencil_cli.output import err_console, escape, info, print_json, warn
from stencil_cli.progress import add_task, progress_bar
from stencil_cli.store import Store, open_store

if TYPE_CHECKING:
    from PIL import Image
    from rich.progress import Progress

MAX_TAU = 1000


# -- small pure helpers (tested directly) -----------------------------------------------------------------


def parse_taus(text: str) -> list[float]:
    """Parse `--tau 20,60,200` into numbers in [0, 1000]; BadInputError otherwise."""
    values: list[float] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise BadInputError(
                f"--tau: {part!r} is not a number (e.g. --tau 60 or --tau 20,60,200)"
            ) from None
        if not math.isfinite(value) or not 0 <= value <= MAX_TAU:
            raise BadInputError(f"--tau {part} is outside [0, {MAX_TAU}] (the default is 60)")
        if value not in values:
            values.append(value)
    if not values:
        raise BadInputError("--tau needs at least one value in [0, 1000], e.g. --tau 60")
    return values


# -- progress ------------------------------------------------------------------------------------------------


@dataclass
class StageProgress:
    """Maps the ML modules' progress hook onto one rich bar per stage (draft, inversion, denoise...)."""

    progress: Progress
    totals: dict[str, int]
    tasks: dict[str, int] = field(default_factory=dict)
    inner_total: int = 0

    LABELS = {
        "draft": "draft",
        "inversion": "DDIM inversion",
        "null-text": "null-text",
        "denoise": "denoise",
    }

    def task(self, stage: str) -> int:
        """The rich task for `stage` (created on first use)."""
        if stage not in self.tasks:
            self.tasks[stage] = add_task(self.progress, self.LABELS.get(stage, stage), self.totals.get(stage))
        return self.tasks[stage]

    def __call__(self, stage: str, step: int, total: int | None, extra: dict[str, Any]) -> None:
        """The hook: advance the stage's bar; null-text shows inner-iteration counts and the loss."""
        task = self.task(stage)
        if "advance" in extra:  # steps a pipeline or mode does not report one by one
            self.progress.update(task, advance=int(extra["advance"]))
            return
        if stage == "null-text":
            if extra.get("step_done"):
                self.inner_total += int(extra.get("inner", 0))
                self.progress.update(
                    task, advance=1, status=f"{self.inner_total} inner iterations, loss {extra['loss']:.2e}"
                )
            else:
                self.progress.update(task, status=f"step {step}/{total}: inner {extra.get('inner', 0)}")
            return
        self.progress.update(task, advance=1)


# -- the command -------------------------------------------------------------------------------------------


@handle_errors
def gen(
    name: Annotated[str, typer.Argument(help="The subject to render (see `stencil ls`).")],
    prompt: Annotated[
        str,
        typer.Argument(
            help="What to render. Without the subject phrase or a {} placeholder it becomes "
            "'a PHRASE PROMPT' (e.g. 'in a Superman outfit')."
        ),
    ],
    count: Annotated[int, typer.Option("-n", "--count", help="Images (seeds) to make.", min=1)] = 1,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            help="First seed; image i uses seed + i. [default: random]",
            min=0,
            max=workflows.MAX_SEED,
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
        int, typer.Option("--draft-steps", help="Context-model steps for the draft.", min=1)
    ] = 50,
    run_id: Annotated[
        int | None, typer.Option("--run", help="Use this training run. [default: the newest done run]")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Also copy the images (and drafts, grid) into this folder."),
    ] = None,
    grid: Annotated[
        bool, typer.Option("--grid", help="Also write a contact sheet: each draft, then each tau.")
    ] = False,
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
    # everything is checked and settled before any model loads
    if not prompt.strip():
        raise BadInputError('the prompt is empty: say what to render, e.g. "on a beach at sunset"')
    if draft is not None and no_context:
        raise BadInputError("--draft and --no-context do not go together: a draft is the context")
    if seed is not None:
        workflows.check_seeds(seed, count)
    taus = parse_taus(tau)
    settings = _settings(steps, guidance, inversion, null_lr, inner_steps, draft_steps)
    store = open_store()
    mode = "plain" if no_context else ("edit" if draft is not None else "context")
    if mode == "edit" and count > 1:
        warn("with --draft the result does not depend on the seed: making one image per tau")
        count = 1
    first_seed = seed if seed is not None else secrets.randbelow(2**31)
    job = _make_job(
        store,
        name,
        prompt,
        mode,
        run_id=run_id,
        seeds=[first_seed + i for i in range(count)],
        taus=taus,
        draft=draft,
        show_prompts=show_prompts,
        models=Models(subject_model, context_model, device, precision, no_t5),
    )
    batch = workflows.GenerationBatch(job, settings, output)
    batch.prepare()
    records = _generate(batch, grid=grid)
    _present(records, output, json_output)


def _settings(
    steps: int, guidance: float, inversion: str, null_lr: float, inner_steps: int, draft_steps: int
) -> Any:
    """The generation settings from the options, or a one-line BadInputError."""
    from stencil_cli.generation import GenerationSettings
    from stencil_cli.inversion import NullTextSettings

    inversion = inversion.strip().lower()
    if inversion not in ("nti", "npi"):
        raise BadInputError(f"--inversion must be nti or npi (got {inversion!r})")
    if not (null_lr > 0 and math.isfinite(null_lr)):
        raise BadInputError(f"--null-lr must be a positive number (got {null_lr})")
    if not (guidance >= 1 and math.isfinite(guidance)):
        raise BadInputError(f"--guidance must be at least 1 (got {guidance})")
    try:
        return GenerationSettings(
            steps=steps,
            guidance=guidance,
            inversion=inversion,
            null_text=NullTextSettings(lr=null_lr, inner_steps=inner_steps),
            draft_steps=draft_steps,
        )
    except ValueError as error:
        raise BadInputError(str(error)) from None


@dataclass
class Models:
    """The model options as given (None: settled from env/config/defaults)."""

    subject_model: str | None
    context_model: str | None
    device: str | None
    precision: str | None
    no_t5: bool


def _make_job(
    store: Store,
    name: str,
    prompt: str,
    mode: str,
    *,
    run_id: int | None,
    seeds: list[int],
    taus: list[float],
    draft: Path | None,
    show_prompts: bool,
    models: Models,
) -> workflows.GenerationJob:
    """The subject, its trained run, the prompts, the draft image and the models of this generation."""
    from stencil_cli.generation import build_prompts

    subject = store.get_subject(name)
    run = workflows.trained_run(store, name, run_id)
    phrase = subject.phrase or subject.class_word
    if not phrase:
        raise StencilError(
            f"subject {name!r} has no phrase",
            hint=f"caption it with `stencil caption {name}` or re-add with --phrase",
        )
    if not subject.description and mode == "context":
        info(
            f"[dim]{escape(name)} has no description (the OpenAI captioner writes one); "
            f"the draft prompt uses {escape(repr(phrase))}[/dim]"
        )
    prompts = build_prompts(prompt, phrase, subject.description)
    if show_prompts:
        err_console.print(f"prompt:       {escape(prompts.prompt)}")
        err_console.print(f"draft prompt: {escape(prompts.draft_prompt)}")
    draft_image, draft_source = _load_draft(draft) if draft is not None else (None, None)
    run_params = run.get("params") or {}
    trained_on = run_params.get("subject_model") or run.get("base_model")
    subject_ref = models.subject_model or trained_on or setting(store, "subject_model", None)
    # runs store local folders as absolute paths: compare the given reference the same way
    if models.subject_model and trained_on and workflows.stored_model_ref(models.subject_model) != trained_on:
        warn(f"run {run['id']} was trained on {trained_on}; generating with {models.subject_model} as asked")
    return workflows.GenerationJob(
        store=store,
        subject=subject,
        run=run,
        prompt=prompts.prompt,
        draft_prompt=prompts.draft_prompt,
        seeds=seeds,
        taus=taus if mode != "plain" else [],
        mode=mode,
        subject_model=subject_ref,
        context_model=setting(store, "context_model", models.context_model) if mode == "context" else None,
        device=setting(store, "device", models.device),
        precision=setting(store, "precision", models.precision),
        no_t5=models.no_t5,
        resolution=int(run_params.get("resolution") or 0),
        draft_image=draft_image,
        draft_source=draft_source,
    )


def _load_draft(path: Path) -> tuple[Image.Image, str]:
    from stencil_cli.images import load_rgb

    if not str(path).strip():
        raise BadInputError("--draft is empty: give the path of an image file")
    path = Path(path).expanduser()
    if path.is_dir():
        raise BadInputError(f"--draft {path} is a folder: give one image file")
    if not path.is_file():
        raise BadInputError(f"--draft {path}: no such file")
    try:
        return load_rgb(path), str(path.resolve())
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for non-images
        raise BadInputError(
            f"--draft {path} is not an image Pillow can read ({type(error).__name__})"
        ) from None


def _generate(batch: workflows.GenerationBatch, *, grid: bool) -> list[dict[str, Any]]:
    """Run the batch under progress bars; on any interruption say how much was kept, then re-raise."""
    job, settings = batch.job, batch.settings
    seeds = len(job.seeds)
    totals = {
        "draft": seeds * settings.draft_steps,
        "inversion": seeds * settings.steps,
        "null-text": seeds * settings.steps,
        "denoise": seeds * max(1, len(job.taus)) * settings.steps,
    }
    try:
        with progress_bar() as progress:
            records = workflows.generate_images(batch, progress=StageProgress(progress, totals))
    except BaseException:
        if batch.records or batch.drafts:
            info(
                f"[yellow]stopped after {len(batch.records)} of {batch.expected} image(s)[/yellow]; "
                f"kept what was finished in {escape(str(batch.folder))}"
            )
        raise
    if grid:
        info(f"contact sheet: {escape(str(batch.save_grid()))}")
    return records


def _present(records: list[dict[str, Any]], output: Path | None, json_output: bool) -> None:
    """The records as JSON, or one image path per line (stdout) and a summary (stderr)."""
    if json_output:
        print_json(records)
        return
    for record in records:
        typer.echo(record.get("output_file") or record["image_file"])
    where = output if output is not None else Path(records[0]["image_file"]).parent
    info(f"[green]made {len(records)} image(s)[/green] in {escape(str(where))}")


def register(app: typer.Typer) -> None:
    """Register `stencil gen`."""
    app.command("gen", no_args_is_help=True)(gen)
