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
    batch = Batch(job, settings, output)
    batch.prepare()
    try:
        records = _run_job(batch, grid=grid)
    except BaseException:
        if batch.records or batch.drafts:
            info(
                f"[yellow]stopped after {len(batch.records)} of {batch.expected} image(s)[/yellow]; "
                f"kept what was finished in {escape(str(batch.folder))}"
            )
        raise
    if json_output:
        print_json(records)
        return
    for record in records:
        typer.echo(record.get("output_file") or record["image_file"])
    where = output if output is not None else Path(records[0]["image_file"]).parent
    info(f"[green]made {len(records)} image(s)[/green] in {escape(str(where))}")


@dataclass
class Batch:
    """The files of one `stencil gen` call, written as each is made (an interruption keeps them)."""

    job: Job
    settings: Any
    output: Path | None
    name: str = field(default_factory=batch_id)
    drafts: dict[int, Path] = field(default_factory=dict)
    images: list[tuple[int, float | None, Path]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    copies: list[Path] = field(default_factory=list)

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

    def _copy_name(self, path: Path) -> str:
        return f"{self.job.subject.name}-{self.name}-{path.name}"

    def _write(self, path: Path, data: bytes) -> None:
        """Write one file atomically into the store and, with -o, its copy."""
        atomic_write_bytes(path, data)
        if self.output is not None:
            copy = self.output / self._copy_name(path)
            atomic_write_bytes(copy, data)
            self.copies.append(copy)

    def save_draft(self, seed: int, image: Image.Image) -> Path:
        """Write the draft of `seed` (with its parameters) now."""
        job = self.job
        path = self.folder / f"draft-s{seed}.png"
        meta = {
            "role": "draft",
            "draft_prompt": job.draft_prompt if job.mode == "context" else None,
            "seed": seed,
            "context_model": job.context_model,
            "subject": job.subject.name,
            "draft_source": job.draft_source,
        }
        self._write(path, png_bytes(image, meta))
        self.drafts[seed] = path
        return path

    def load_draft(self, seed: int) -> Image.Image:
        """The draft of `seed`, read back from its file (drafts are not kept in memory)."""
        from PIL import Image

        with Image.open(self.drafts[seed]) as opened:
            return opened.convert("RGB")

    def save_image(
        self,
        seed: int,
        tau: float | None,
        image: Image.Image,
        timings: dict[str, float],
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        """Write one image (PNG with its parameters) and add its generation row now; returns the row."""
        job = self.job
        stem = f"s{seed}" if tau is None else f"s{seed}-tau{tau_label(tau)}"
        path = self.folder / f"{stem}.png"
        draft_file = self.drafts.get(seed)
        meta = _image_meta(
            job, self.settings, seed=seed, tau=tau, draft_file=draft_file.name if draft_file else None
        )
        self._write(path, png_bytes(image, meta))
        params = {k: v for k, v in meta.items() if v is not None}
        params.update(batch=self.name, timings_s={k: round(v, 3) for k, v in timings.items()}, **extra)
        if self.output is not None:
            params["output_file"] = str((self.output / self._copy_name(path)).resolve())
        record = job.store.add_generation(
            job.subject.name,
            {
                "run_id": job.run["id"],
                "prompt": job.prompt,
                "draft_prompt": job.draft_prompt if job.mode == "context" else None,
                "seed": seed,
                "tau": tau,
                "params": params,
                "image_path": path,
                "draft_path": draft_file,
            },
        )
        if self.output is not None:
            record["output_file"] = params["output_file"]
        self.images.append((seed, tau, path))
        self.records.append(record)
        return record

    def save_grid(self) -> Path:
        """The contact sheet (each seed's draft, then its images), built from the files written."""
        from PIL import Image

        from stencil_cli.generation import contact_sheet

        def read(path: Path) -> Image.Image:
            with Image.open(path) as opened:
                return opened.convert("RGB")

        rows = []
        for seed in self.job.seeds:
            row = [(f"draft, seed {seed}", read(self.drafts[seed]))] if seed in self.drafts else []
            row += [
                (f"tau {tau_label(t)}" if t is not None else f"seed {s}", read(path))
                for s, t, path in self.images
                if s == seed
            ]
            rows.append(row)
        path = self.folder / "grid.png"
        meta = {"role": "grid", "prompt": self.job.prompt, "taus": self.job.taus, "seeds": self.job.seeds}
        self._write(path, png_bytes(contact_sheet(rows), meta))
        for record in self.records:
            record["grid_file"] = str(path)
        return self.copies[-1] if self.output is not None else path


def _run_job(batch: Batch, *, grid: bool) -> list[dict[str, Any]]:
    """Draft(s), then the subject model: inversion and denoise per seed. Each file and row is written as soon
    as it is made, so an interruption keeps every finished image. Returns the rows."""
    from stencil_cli import generation, models, training

    job, settings = batch.job, batch.settings
    per_seed = len(job.seeds)
    n_taus = max(1, len(job.taus))
    totals = {
        "draft": per_seed * settings.draft_steps,
        "inversion": per_seed * settings.steps,
        "null-text": per_seed * settings.steps,
        "denoise": per_seed * n_taus * settings.steps,
    }
    draft_seconds: dict[int, float] = {}
    with progress_bar() as progress:
        hook = StageProgress(progress, totals)
        if job.mode == "context":
            with models.quiet_libraries():
                context = models.load_context_pipeline(
                    job.context_model, device=job.device, precision=job.precision, no_t5=job.no_t5
                )
            resolution = job.resolution or 512
            try:
                for seed in job.seeds:
                    before = hook.counts.get("draft", 0)
                    started = time.perf_counter()
                    draft = generation.render_draft(
                        context,
                        job.draft_prompt,
                        resolution=resolution,
                        seed=seed,
                        steps=settings.draft_steps,
                        guidance=settings.draft_guidance,
                        progress=hook,
                    )
                    draft_seconds[seed] = time.perf_counter() - started
                    batch.save_draft(seed, draft)
                    reported = hook.counts.get("draft", 0) - before
                    if reported < settings.draft_steps:
                        hook.finish("draft", int(settings.draft_steps - reported))
            finally:
                models.free_pipeline(context)
                del context
        with models.quiet_libraries():
            pipe = models.load_subject_pipeline(job.subject_model, device=job.device, precision=job.precision)
        try:
            training.load_trained_weights(pipe.unet, Path(job.run["weights_file"]))
            resolution = job.resolution or generation.subject_resolution(pipe)
            job.resolution = resolution
            if job.mode == "edit" and job.draft_image is not None:
                edit_draft = center_crop_resize(job.draft_image, resolution)
                for seed in job.seeds:
                    batch.save_draft(seed, edit_draft)
            for seed in job.seeds:
                if job.mode == "plain":
                    started = time.perf_counter()
                    image = generation.plain_generate(
                        pipe, job.prompt, seed, settings, resolution=resolution, progress=hook
                    )
                    batch.save_image(seed, None, image, {"denoise": time.perf_counter() - started}, {})
                    continue
                started = time.perf_counter()
                inverted = generation.invert_image(
                    pipe, batch.load_draft(seed), job.prompt, settings, resolution=resolution, progress=hook
                )
                inversion_s = time.perf_counter() - started
                if settings.inversion == "npi":
                    hook.finish("null-text", settings.steps)
                started = time.perf_counter()
                images = generation.guided_images(
                    pipe, inverted, job.prompt, job.taus, settings, progress=hook
                )
                # draft and inversion are per seed (shared by its taus); denoising per image
                timings = {
                    "draft": draft_seconds.get(seed, 0.0),
                    "inversion": inversion_s,
                    "denoise": (time.perf_counter() - started) / len(images),
                }
                extra = {"inner_iterations": inverted.inner_iterations, "null_text_losses": inverted.losses}
                for tau_value, image in zip(job.taus, images, strict=True):
                    batch.save_image(seed, tau_value, image, timings, extra)
        finally:
            models.free_pipeline(pipe)
    if grid:
        where = batch.save_grid()
        info(f"contact sheet: {escape(str(where))}")
    return batch.records


def register(app: typer.Typer) -> None:
    """Register `stencil gen`."""
    app.command("gen", no_args_is_help=True)(gen)
