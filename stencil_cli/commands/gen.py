"""`stencil gen`: a trained subject in a new context (Context Guidance), photo editing, plain generation."""

from __future__ import annotations

import io
import json
import math
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from stencil_cli import __version__
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
from stencil_cli.fsutil import atomic_write_bytes
from stencil_cli.images import center_crop_resize
from stencil_cli.output import err_console, escape, info, print_json, warn
from stencil_cli.progress import add_task, progress_bar
from stencil_cli.store import Store, Subject, open_store

if TYPE_CHECKING:
    from PIL import Image
    from rich.progress import Progress

MAX_TAU = 1000
PNG_KEY = "stencil"  # the text chunk holding every parameter as JSON


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


def tau_label(tau: float) -> str:
    """60.0 -> '60', 12.5 -> '12.5' (for file names and labels)."""
    return f"{tau:g}"


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


def batch_id() -> str:
    """A folder name for one `stencil gen` call: UTC time plus a random suffix."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


# -- progress ------------------------------------------------------------------------------------------------


@dataclass
class StageProgress:
    """Maps the ML modules' progress hook onto one rich bar per stage (draft, inversion, denoise...)."""

    progress: Progress
    totals: dict[str, int]
    tasks: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
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

    def __call__(self, stage: str, step: int, total: int, extra: dict[str, Any]) -> None:
        """The hook: advance the stage's bar; null-text shows inner-iteration counts and the loss."""
        task = self.task(stage)
        if stage == "null-text":
            if extra.get("step_done"):
                self.counts[stage] = self.counts.get(stage, 0) + 1
                self.inner_total += int(extra.get("inner", 0))
                self.progress.update(
                    task, advance=1, status=f"{self.inner_total} inner iterations, loss {extra['loss']:.2e}"
                )
            else:
                self.progress.update(task, status=f"step {step}/{total}: inner {extra.get('inner', 0)}")
            return
        self.counts[stage] = self.counts.get(stage, 0) + 1
        self.progress.update(task, advance=1)

    def finish(self, stage: str, count: int) -> None:
        """Advance `stage` by `count` (for pipelines or modes that report no steps)."""
        self.counts[stage] = self.counts.get(stage, 0) + count
        self.progress.update(self.task(stage), advance=count)


# -- the command -------------------------------------------------------------------------------------------


@dataclass
class Job:
    """Everything settled before the models load."""

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


def _load_draft(path: Path) -> tuple[Image.Image, str]:
    from stencil_cli.images import load_rgb

    path = Path(path).expanduser()
    if not path.is_file():
        raise BadInputError(f"--draft {path}: no such file")
    try:
        return load_rgb(path), str(path.resolve())
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for non-images
        raise BadInputError(
            f"--draft {path} is not an image Pillow can read ({type(error).__name__})"
        ) from None


def _trained_run(store: Store, name: str, run_id: int | None) -> dict[str, Any]:
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


def _image_meta(
    job: Job, settings: Any, *, seed: int, tau: float | None, draft_file: str | None
) -> dict[str, Any]:
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
        int | None, typer.Option("--seed", help="First seed; image i uses seed + i. [default: random]")
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
    from stencil_cli.generation import GenerationSettings, build_prompts
    from stencil_cli.inversion import NullTextSettings

    # -- validate everything before any model loads ------------------------------------------------------
    if not prompt.strip():
        raise BadInputError('the prompt is empty: say what to render, e.g. "on a beach at sunset"')
    taus = parse_taus(tau)
    inversion = inversion.strip().lower()
    if inversion not in ("nti", "npi"):
        raise BadInputError(f"--inversion must be nti or npi (got {inversion!r})")
    if not (null_lr > 0 and math.isfinite(null_lr)):
        raise BadInputError(f"--null-lr must be a positive number (got {null_lr})")
    if not (guidance >= 1 and math.isfinite(guidance)):
        raise BadInputError(f"--guidance must be at least 1 (got {guidance})")
    if draft is not None and no_context:
        raise BadInputError("--draft and --no-context do not go together: a draft is the context")
    store = open_store()
    subject = store.get_subject(name)
    run = _trained_run(store, name, run_id)
    phrase = subject.phrase or subject.class_word
    if not phrase:
        raise StencilError(
            f"subject {name!r} has no phrase",
            hint=f"caption it with `stencil caption {name}` or re-add with --phrase",
        )
    if not subject.description and not no_context and draft is None:
        info(
            f"[dim]{escape(name)} has no description (the OpenAI captioner writes one); "
            f"the draft prompt uses {escape(repr(phrase))}[/dim]"
        )
    prompts = build_prompts(prompt, phrase, subject.description)
    if show_prompts:
        err_console.print(f"prompt:       {escape(prompts.prompt)}")
        err_console.print(f"draft prompt: {escape(prompts.draft_prompt)}")
    draft_image, draft_source = _load_draft(draft) if draft is not None else (None, None)
    mode = "plain" if no_context else ("edit" if draft is not None else "context")
    first_seed = seed if seed is not None else secrets.randbelow(2**31)
    if mode == "edit" and count > 1:
        warn("with --draft the result does not depend on the seed: making one image per tau")
        count = 1
    run_params = run.get("params") or {}
    trained_on = run_params.get("subject_model") or run.get("base_model")
    subject_ref = subject_model or trained_on or setting(store, "subject_model", None)
    if subject_model and trained_on and subject_model != trained_on:
        warn(f"run {run['id']} was trained on {trained_on}; generating with {subject_model} as asked")
    job = Job(
        store=store,
        subject=subject,
        run=run,
        prompt=prompts.prompt,
        draft_prompt=prompts.draft_prompt,
        seeds=[first_seed + i for i in range(count)],
        taus=taus if mode != "plain" else [],
        mode=mode,
        subject_model=subject_ref,
        context_model=setting(store, "context_model", context_model) if mode == "context" else None,
        device=setting(store, "device", device),
        precision=setting(store, "precision", precision),
        no_t5=no_t5,
        resolution=int(run_params.get("resolution") or 0),
        draft_image=draft_image,
        draft_source=draft_source,
    )
    try:
        settings = GenerationSettings(
            steps=steps,
            guidance=guidance,
            inversion=inversion,
            null_text=NullTextSettings(lr=null_lr, inner_steps=inner_steps),
            draft_steps=draft_steps,
        )
    except ValueError as error:
        raise BadInputError(str(error)) from None
    records = _run_job(job, settings, output=output, grid=grid)
    if json_output:
        print_json(records)
        return
    for record in records:
        typer.echo(record.get("output_file") or record["image_file"])
    where = output if output is not None else Path(records[0]["image_file"]).parent
    info(f"[green]made {len(records)} image(s)[/green] in {escape(str(where))}")


def _run_job(job: Job, settings: Any, *, output: Path | None, grid: bool) -> list[dict[str, Any]]:
    """Draft(s), then the subject model: inversion and denoise per seed, files, rows. Returns the rows."""
    from stencil_cli import generation, models, training

    timings: dict[str, float] = {"draft": 0.0, "inversion": 0.0, "denoise": 0.0}
    per_seed = len(job.seeds)
    n_taus = max(1, len(job.taus))
    totals = {
        "draft": per_seed * settings.draft_steps,
        "inversion": per_seed * settings.steps,
        "null-text": per_seed * settings.steps,
        "denoise": per_seed * n_taus * settings.steps,
    }
    drafts: dict[int, Image.Image] = {}
    with progress_bar() as progress:
        hook = StageProgress(progress, totals)
        if job.mode == "context":
            started = time.perf_counter()
            with models.quiet_libraries():
                context = models.load_context_pipeline(
                    job.context_model, device=job.device, precision=job.precision, no_t5=job.no_t5
                )
            resolution = job.resolution or 512
            try:
                for seed in job.seeds:
                    before = hook.counts.get("draft", 0)
                    drafts[seed] = generation.render_draft(
                        context,
                        job.draft_prompt,
                        resolution=resolution,
                        seed=seed,
                        steps=settings.draft_steps,
                        guidance=settings.draft_guidance,
                        progress=hook,
                    )
                    reported = hook.counts.get("draft", 0) - before
                    if reported < settings.draft_steps:
                        hook.finish("draft", int(settings.draft_steps - reported))
            finally:
                models.free_pipeline(context)
                del context
            timings["draft"] = time.perf_counter() - started
        with models.quiet_libraries():
            pipe = models.load_subject_pipeline(job.subject_model, device=job.device, precision=job.precision)
        training.load_trained_weights(pipe.unet, Path(job.run["weights_file"]))
        resolution = job.resolution or generation.subject_resolution(pipe)
        job.resolution = resolution
        if job.mode == "edit" and job.draft_image is not None:
            edit_draft = center_crop_resize(job.draft_image, resolution)
            drafts = {seed: edit_draft for seed in job.seeds}
        results: list[tuple[int, float | None, Image.Image, dict[str, Any]]] = []
        for seed in job.seeds:
            if job.mode == "plain":
                started = time.perf_counter()
                image = generation.plain_generate(
                    pipe, job.prompt, seed, settings, resolution=resolution, progress=hook
                )
                timings["denoise"] += time.perf_counter() - started
                results.append((seed, None, image, {}))
                continue
            started = time.perf_counter()
            inverted = generation.invert_image(
                pipe, drafts[seed], job.prompt, settings, resolution=resolution, progress=hook
            )
            timings["inversion"] += time.perf_counter() - started
            if settings.inversion == "npi":
                hook.finish("null-text", settings.steps)
            started = time.perf_counter()
            images = generation.guided_images(pipe, inverted, job.prompt, job.taus, settings, progress=hook)
            timings["denoise"] += time.perf_counter() - started
            extra = {"inner_iterations": inverted.inner_iterations, "null_text_losses": inverted.losses}
            for tau_value, image in zip(job.taus, images, strict=True):
                results.append((seed, tau_value, image, extra))
        models.free_pipeline(pipe)
    return _write_outputs(job, settings, drafts, results, timings, output=output, grid=grid)


def _write_outputs(
    job: Job,
    settings: Any,
    drafts: dict[int, Image.Image],
    results: list[tuple[int, float | None, Image.Image, dict[str, Any]]],
    timings: dict[str, float],
    *,
    output: Path | None,
    grid: bool,
) -> list[dict[str, Any]]:
    """Write PNGs (with parameters) and drafts into the store, copy them to `output`, add a row per image."""
    from stencil_cli.generation import contact_sheet

    batch = batch_id()
    folder = job.store.generation_dir(job.subject.name) / batch
    if output is not None:
        output = Path(output).expanduser()
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StencilError(f"cannot create the output folder {output}: {error.strerror}") from None
    copies: list[tuple[Path, Path]] = []
    draft_files: dict[int, Path] = {}
    for seed, image in drafts.items():
        path = folder / f"draft-s{seed}.png"
        meta = {
            "role": "draft",
            "draft_prompt": job.draft_prompt if job.mode == "context" else None,
            "seed": seed,
            "context_model": job.context_model,
            "subject": job.subject.name,
            "draft_source": job.draft_source,
        }
        atomic_write_bytes(path, png_bytes(image, meta))
        draft_files[seed] = path
        copies.append((path, Path(f"{job.subject.name}-{batch}-{path.name}")))
    records: list[dict[str, Any]] = []
    for seed, tau_value, image, extra in results:
        stem = f"s{seed}" if tau_value is None else f"s{seed}-tau{tau_label(tau_value)}"
        path = folder / f"{stem}.png"
        draft_file = draft_files.get(seed)
        meta = _image_meta(
            job, settings, seed=seed, tau=tau_value, draft_file=draft_file.name if draft_file else None
        )
        atomic_write_bytes(path, png_bytes(image, meta))
        copy_name = Path(f"{job.subject.name}-{batch}-{path.name}")
        copies.append((path, copy_name))
        params = {k: v for k, v in meta.items() if v is not None}
        params.update(batch=batch, timings_s={k: round(v, 3) for k, v in timings.items()}, **extra)
        if output is not None:
            params["output_file"] = str((output / copy_name).resolve())
        record = job.store.add_generation(
            job.subject.name,
            {
                "run_id": job.run["id"],
                "prompt": job.prompt,
                "draft_prompt": job.draft_prompt if job.mode == "context" else None,
                "seed": seed,
                "tau": tau_value,
                "params": params,
                "image_path": path,
                "draft_path": draft_file,
            },
        )
        if output is not None:
            record["output_file"] = params["output_file"]
        records.append(record)
    if grid:
        rows = []
        for seed in job.seeds:
            row = [(f"draft, seed {seed}", drafts[seed])] if seed in drafts else []
            row += [
                (f"tau {tau_label(t)}" if t is not None else f"seed {s}", image)
                for s, t, image, _ in results
                if s == seed
            ]
            rows.append(row)
        sheet = contact_sheet(rows)
        path = folder / "grid.png"
        atomic_write_bytes(
            path,
            png_bytes(sheet, {"role": "grid", "prompt": job.prompt, "taus": job.taus, "seeds": job.seeds}),
        )
        copies.append((path, Path(f"{job.subject.name}-{batch}-grid.png")))
        for record in records:
            record["grid_file"] = str(path)
        info(f"contact sheet: {escape(str(path if output is None else output / copies[-1][1]))}")
    if output is not None:
        for source, name in copies:
            atomic_write_bytes(output / name, source.read_bytes())
    return records


def register(app: typer.Typer) -> None:
    """Register `stencil gen`."""
    app.command("gen", no_args_is_help=True)(gen)
