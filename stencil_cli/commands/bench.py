"""`stencil bench dreambench`: the DreamBench protocol end to end, sharded across processes with accelerate.

For each subject: add its photos, caption them (template: the class word is the phrase), train, render every
prompt (``images_per_prompt`` seeds each) with Context Guidance, score (DINO, CLIP-T, CLIP-I). Then a results
table per subject and overall (Markdown + JSON), a plot and a contact sheet per subject.

Layout of ``--out``::

    bench.json                 the settings the results were made with (resuming checks them)
    store/                     the benchmark's own stencil store: subjects, runs, generations (+ images)
    subjects/<name>/drafts/    the context model's drafts (p00-0.png: prompt 0, image 0)
    subjects/<name>/result.json, contact-sheet.png
    results.json, results.md, scores.png

Resuming: a subject whose ``result.json`` covers the requested prompts is skipped; otherwise only missing
drafts, a missing training run, missing images and missing scores are made. Sharding: every process
(``accelerate launch`` sets ``WORLD_SIZE``/``RANK``) takes subjects ``rank::world``; the main process waits
for the others (a barrier through ``accelerate.PartialState``: NCCL on GPUs, gloo on CPUs) and merges.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from stencil_cli.clikit import JsonOption, handle_errors
from stencil_cli.commands.evaluate import EvalModelsOption, clip_t_text
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
from stencil_cli.output import escape, info, print_json, settings, warn
from stencil_cli.progress import add_task, progress_bar
from stencil_cli.store import Store

bench_app = typer.Typer(help="Benchmarks: the DreamBench protocol end to end.", no_args_is_help=True)

BENCH_FILE = "bench.json"
RESULT_FILE = "result.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_FILE = "scores.png"
SHEET_FILE = "contact-sheet.png"
GENERATION_FOLDER = "bench"

# The paper's table (SD1.5 base; METHOD.md, Evaluation). GPU seconds from its GPU-hours per subject.
PAPER_ROWS: list[dict[str, Any]] = [
    {"method": "Stencil (paper)", "dino": 0.671, "clip_t": 0.328, "clip_i": None, "gpu_seconds": 360.0},
    {"method": "DreamBooth (paper)", "dino": 0.668, "clip_t": 0.305, "clip_i": None, "gpu_seconds": 720.0},
    {
        "method": "Custom Diffusion (paper)",
        "dino": 0.643,
        "clip_t": 0.305,
        "clip_i": None,
        "gpu_seconds": None,
    },
    {
        "method": "Textual Inversion (paper)",
        "dino": 0.569,
        "clip_t": 0.255,
        "clip_i": None,
        "gpu_seconds": None,
    },
    {"method": "Real images (paper)", "dino": 0.774, "clip_t": None, "clip_i": None, "gpu_seconds": None},
]


# -- settings -------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """Everything one benchmark run needs, settled before any model loads."""

    dataset: Path
    out: Path
    subjects: list[str]
    prompts: int | None = None  # the first N prompts of each subject (None: all 25)
    images_per_prompt: int = 4
    train_steps: int = 100
    batch_size: int = 6
    lr: float = 2e-5
    steps: int = 50
    inner_steps: int = 10
    inversion: str = "nti"  # nti (null-text, the paper) | npi (negative-prompt, much faster)
    draft_steps: int = 50
    tau: float = 60.0
    seed: int = 0
    captioner: str = "template"
    subject_model: str = "sd15"
    context_model: str = "sd3-medium"
    device: str = "auto"
    precision: str = "auto"
    no_t5: bool = False
    eval_dino: str = "facebook/dino-vits16"
    eval_clip: str = "openai/clip-vit-base-patch32"
    extra: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change the numbers (a resumed run must match them)."""
        keys = (
            "train_steps",
            "batch_size",
            "lr",
            "steps",
            "inner_steps",
            "inversion",
            "draft_steps",
            "tau",
            "seed",
            "captioner",
            "subject_model",
            "context_model",
            "precision",
            "no_t5",
            "eval_dino",
            "eval_clip",
        )
        return {key: getattr(self, key) for key in keys}

    def train_key(self) -> dict[str, Any]:
        """The settings a reusable training run must have been made with."""
        return {
            k: getattr(self, k)
            for k in ("train_steps", "batch_size", "lr", "seed", "subject_model", "precision", "captioner")
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        data = asdict(self)
        data["dataset"] = str(self.dataset)
        data["out"] = str(self.out)
        return data


def check_out_folder(config: BenchConfig) -> None:
    """Create ``--out`` and record the settings; a folder made with other settings is a clear error."""
    path = config.out / BENCH_FILE
    wanted = config.fingerprint()
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8")).get("settings", {})
        except (OSError, ValueError):
            stored = {}
        changed = [key for key in wanted if key in stored and stored[key] != wanted[key]]
        if changed:
            key = changed[0]
            raise BadInputError(
                f"{config.out} holds results made with other settings ({key}: {stored[key]!r}, now "
                f"{wanted[key]!r}); use another --out, or the same settings to resume"
            )
        return
    config.out.mkdir(parents=True, exist_ok=True)
    data = {"settings": wanted, "dataset": str(config.dataset)}
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


# -- sharding -------------------------------------------------------------------------------------------


@dataclass
class Shard:
    """This process's place among the benchmark's processes."""

    rank: int = 0
    world: int = 1
    state: Any = None  # accelerate.PartialState when launched with several processes

    @property
    def is_main(self) -> bool:
        """Whether this process merges and writes the results."""
        return self.rank == 0

    def mine(self, subjects: list[str]) -> list[str]:
        """The subjects this process runs (round robin)."""
        return subjects[self.rank :: self.world]

    def wait(self) -> None:
        """Wait until every process got here (no-op in a single process)."""
        if self.state is not None:
            self.state.wait_for_everyone()


def current_shard(device: str) -> Shard:
    """The shard from accelerate's environment (``WORLD_SIZE``/``RANK``); one process without it."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return Shard()
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    return Shard(state.process_index, state.num_processes, state)


def shard_device(shard: Shard, device: str) -> str:
    """The device this process uses: accelerate's per-process GPU when sharded across GPUs."""
    if shard.state is not None and device in ("auto", "cuda") and shard.state.device.type == "cuda":
        return str(shard.state.device)
    return device


def free_port() -> int:
    """An unused local TCP port for the processes' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_command(num_processes: int, child_args: list[str], *, cpu: bool) -> list[str]:
    """The `accelerate launch` command line that runs `stencil CHILD_ARGS` in `num_processes` processes."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # several local processes via torchrun; on a CPU the runner asks for gloo itself
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    if not cpu:
        command += ["--gpu_ids", "all"]
    return command + ["-m", "stencil_cli", *child_args]


# -- one subject ----------------------------------------------------------------------------------------


def _timed_sync(device: str) -> float:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _stem(prompt_index: int, image_index: int) -> str:
    return f"p{prompt_index:02d}-{image_index}"


@dataclass
class SubjectJob:
    """The plan for one subject: its prompts and the (prompt, image) items to make."""

    name: str
    class_word: str
    live: bool
    prompts: list[str]
    items: list[tuple[int, int]]


class Runner:
    """Runs subjects in this process; keeps the eval models loaded between subjects."""

    def __init__(self, config: BenchConfig, store: Store, device: str, shard: Shard | None = None) -> None:
        self.config = config
        self.store = store
        self.device = device
        self.shard = shard or Shard()
        self._eval_models: Any = None

    # -- steps ------------------------------------------------------------------------------------------

    def subject_folder(self, name: str) -> Path:
        """Where a subject's drafts, result and contact sheet go."""
        return self.config.out / "subjects" / name

    def add(self, job: SubjectJob) -> None:
        """Add the subject's photos to the benchmark store (once)."""
        from stencil_cli.images import IMAGE_SUFFIXES, RejectedImage, prepare_image

        existing = self.store.find_subject(job.name)
        if existing is not None and existing.images:
            return
        folder = self.config.dataset / job.name
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        prepared = []
        for file in files:
            result = prepare_image(file)
            if isinstance(result, RejectedImage):
                warn(f"{job.name}: skipped {file.name}: {result.reason}")
            else:
                prepared.append(result)
        if not prepared:
            raise StencilError(f"DreamBench subject {job.name!r} has no usable photos in {folder}")
        self.store.add_images(job.name, prepared, phrase=job.class_word, class_word=job.class_word)

    def caption(self, job: SubjectJob) -> None:
        """Caption the photos that have no caption yet (template captioner: the class word is the phrase)."""
        from stencil_cli.captioning import CaptionRequest, Photo, make_captioner

        subject = self.store.get_subject(job.name)
        if all(image["caption"] for image in subject.images):
            return
        captioner = make_captioner(self.config.captioner)
        photos = [Photo(image["id"], Path(image["file"])) for image in subject.images]
        result = captioner.caption(
            CaptionRequest(photos, phrase=subject.phrase, class_word=subject.class_word)
        )
        self.store.set_captions(
            job.name, result.captions, result.source, description=result.description, phrase=result.phrase
        )

    def train(self, job: SubjectJob) -> dict[str, Any]:
        """The subject's training run made with these settings, training it first if there is none."""
        from stencil_cli import models, training
        from stencil_cli.images import load_rgb

        key = self.config.train_key()
        for run in reversed(self.store.list_runs(job.name)):
            weights = run["weights_file"]
            if (
                run["status"] == "done"
                and run["params"].get("bench") == key
                and weights
                and Path(weights).is_file()
            ):
                return run
        subject = self.store.get_subject(job.name)
        device = models.resolve_device(self.device)
        dtype = models.resolve_dtype(self.config.precision, device)
        import torch

        autocast = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
        with models.quiet_libraries():
            pipe = models.load_subject_pipeline(
                self.config.subject_model, device=str(device), precision="fp32"
            )
        config = training.TrainConfig(
            steps=self.config.train_steps,
            batch_size=self.config.batch_size,
            lr=self.config.lr,
            seed=self.config.seed,
            resolution=training.default_resolution(pipe),
            precision=autocast,
        )
        config.validate()
        photos = [load_rgb(Path(image["file"])) for image in subject.images]
        captions = [image["caption"] for image in subject.images]
        params = {
            **config.to_params(),
            "subject_model": self.config.subject_model,
            "phrase": subject.phrase,
            "images": [image["id"] for image in subject.images],
            "bench": key,
        }
        run = self.store.create_run(job.name, params, self.config.subject_model)
        started = _timed_sync(self.device)
        try:
            data = training.prepare_training_data(pipe, photos, captions, subject.phrase, config)
            unet, scheduler = pipe.unet, pipe.scheduler
            models.free_pipeline(pipe)
            result = training.train_unet(unet, scheduler, data, config)
            weights = self.store.run_dir(job.name, run["id"]) / "weights.safetensors"
            tensors = training.trained_state(unet, result.names, training.SAVE_DTYPES[config.save_dtype])
            metadata = training.weights_metadata(
                config,
                self.config.subject_model,
                result.names,
                subject=job.name,
                phrase=subject.phrase or "",
                run_id=str(run["id"]),
            )
            training.save_trained_weights(weights, tensors, metadata)
        except BaseException as error:
            status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
            self.store.finish_run(run["id"], status, error=str(error) or type(error).__name__)
            raise
        duration = _timed_sync(self.device) - started
        self.store.finish_run(
            run["id"],
            "done",
            weights_path=weights,
            duration_s=round(duration, 3),
            losses=result.losses,
            step=result.steps,
        )
        del unet
        models.free_pipeline(None)
        return self.store.get_run(job.name, run["id"])

    def drafts(self, job: SubjectJob, todo: list[tuple[int, int]], resolution: int) -> None:
        """Render the missing drafts of `todo` with the context model (loaded once, freed afterwards)."""
        from stencil_cli import generation, models
        from stencil_cli.commands.gen import png_bytes

        folder = self.subject_folder(job.name) / "drafts"
        missing = [item for item in todo if not (folder / f"{_stem(*item)}.png").is_file()]
        if not missing:
            return
        subject = self.store.get_subject(job.name)
        phrase = subject.phrase or job.class_word
        with models.quiet_libraries():
            context = models.load_context_pipeline(
                self.config.context_model,
                device=self.device,
                precision=self.config.precision,
                no_t5=self.config.no_t5,
            )
        timings = self._draft_timings(job.name)
        try:
            for prompt_index, image_index in missing:
                prompts = generation.build_prompts(job.prompts[prompt_index], phrase, subject.description)
                seed = self.config.seed + image_index
                started = _timed_sync(self.device)
                draft = generation.render_draft(
                    context,
                    prompts.draft_prompt,
                    resolution=resolution,
                    seed=seed,
                    steps=self.config.draft_steps,
                )
                timings[_stem(prompt_index, image_index)] = round(_timed_sync(self.device) - started, 4)
                meta = {
                    "role": "draft",
                    "draft_prompt": prompts.draft_prompt,
                    "seed": seed,
                    "context_model": self.config.context_model,
                    "subject": job.name,
                }
                atomic_write_bytes(folder / f"{_stem(prompt_index, image_index)}.png", png_bytes(draft, meta))
                atomic_write_bytes(folder / "timings.json", json.dumps(timings, indent=1).encode())
        finally:
            models.free_pipeline(context)
            del context

    def _draft_timings(self, name: str) -> dict[str, float]:
        path = self.subject_folder(name) / "drafts" / "timings.json"
        try:
            return {str(k): float(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def generate(
        self, job: SubjectJob, todo: list[tuple[int, int]], run: dict[str, Any], on_item: Any
    ) -> None:
        """Invert each draft with the fine-tuned model and denoise it (tau); one generation row per image."""
        from PIL import Image

        from stencil_cli import generation, models, training
        from stencil_cli.commands.gen import png_bytes
        from stencil_cli.inversion import NullTextSettings

        settings_ = generation.GenerationSettings(
            steps=self.config.steps,
            null_text=NullTextSettings(inner_steps=self.config.inner_steps),
            inversion=self.config.inversion,
            draft_steps=self.config.draft_steps,
        )
        subject = self.store.get_subject(job.name)
        phrase = subject.phrase or job.class_word
        with models.quiet_libraries():
            pipe = models.load_subject_pipeline(
                self.config.subject_model, device=self.device, precision=self.config.precision
            )
        training.load_trained_weights(pipe.unet, Path(run["weights_file"]))
        resolution = int(run["params"].get("resolution") or generation.subject_resolution(pipe))
        draft_folder = self.subject_folder(job.name) / "drafts"
        image_folder = self.store.generation_dir(job.name) / GENERATION_FOLDER
        draft_timings = self._draft_timings(job.name)
        try:
            for prompt_index, image_index in todo:
                stem = _stem(prompt_index, image_index)
                prompts = generation.build_prompts(job.prompts[prompt_index], phrase, subject.description)
                seed = self.config.seed + image_index
                with Image.open(draft_folder / f"{stem}.png") as opened:
                    draft = opened.convert("RGB")
                started = _timed_sync(self.device)
                inverted = generation.invert_image(
                    pipe, draft, prompts.prompt, settings_, resolution=resolution
                )
                middle = _timed_sync(self.device)
                image = generation.guided_images(
                    pipe, inverted, prompts.prompt, [self.config.tau], settings_
                )[0]
                finished = _timed_sync(self.device)
                timings = {
                    "draft": draft_timings.get(stem, 0.0),
                    "inversion": round(middle - started, 4),
                    "denoise": round(finished - middle, 4),
                }
                meta = {
                    "prompt": prompts.prompt,
                    "draft_prompt": prompts.draft_prompt,
                    "seed": seed,
                    "tau": self.config.tau,
                    "steps": settings_.steps,
                    "inner_steps": self.config.inner_steps,
                    "inversion": self.config.inversion,
                    "mode": "context",
                    "subject": job.name,
                    "phrase": phrase,
                    "subject_model": self.config.subject_model,
                    "context_model": self.config.context_model,
                    "run_id": run["id"],
                    "resolution": resolution,
                    "draft": f"{stem}.png",
                    "bench": {"prompt_index": prompt_index, "image_index": image_index},
                }
                path = image_folder / f"{stem}.png"
                atomic_write_bytes(path, png_bytes(image, meta))
                self.store.add_generation(
                    job.name,
                    {
                        "run_id": run["id"],
                        "prompt": prompts.prompt,
                        "draft_prompt": prompts.draft_prompt,
                        "seed": seed,
                        "tau": self.config.tau,
                        "params": {
                            **meta,
                            "timings_s": timings,
                            "inner_iterations": inverted.inner_iterations,
                        },
                        "image_path": path,
                        "draft_path": None,
                    },
                )
                on_item()
        finally:
            models.free_pipeline(pipe)
            del pipe

    def eval_models(self) -> Any:
        """The DINO and CLIP models (loaded on first use, kept for the next subjects)."""
        if self._eval_models is None:
            from stencil_cli import evaluation, models

            refs = evaluation.EvalModelRefs(self.config.eval_dino, self.config.eval_clip)
            self._eval_models = evaluation.load_eval_models(refs, models.resolve_device(self.device))
        return self._eval_models

    def score(self, job: SubjectJob, rows: list[dict[str, Any]]) -> None:
        """Score the rows that have no scores from these eval models yet (stored with the generations)."""
        from stencil_cli.commands.evaluate import score_generations

        wanted = {"dino": self.config.eval_dino, "clip": self.config.eval_clip}
        unscored = [row for row in rows if not row["scores"] or row["scores"].get("eval_models") != wanted]
        if unscored:
            score_generations(self.store, self.store.get_subject(job.name), unscored, self.eval_models())

    # -- the whole subject ------------------------------------------------------------------------------

    def bench_rows(self, name: str) -> dict[tuple[int, int], dict[str, Any]]:
        """The subject's benchmark generations by (prompt index, image index) (newest wins)."""
        rows: dict[tuple[int, int], dict[str, Any]] = {}
        if self.store.find_subject(name) is None:
            return rows
        for row in self.store.list_generations(name):
            key = row["params"].get("bench")
            image = row.get("image_file")
            if isinstance(key, dict) and image and Path(image).is_file():
                rows[(int(key["prompt_index"]), int(key["image_index"]))] = row
        return rows

    def run_subject(self, job: SubjectJob, progress: Any) -> dict[str, Any]:
        """Run one subject end to end (skipping what is already done) and write its result.json."""
        folder = self.subject_folder(job.name)
        result_path = folder / RESULT_FILE
        planned = [list(item) for item in job.items]
        if result_path.is_file():
            try:
                done = json.loads(result_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                done = {}
            if done.get("items") == planned and done.get("settings") == self.config.fingerprint():
                return done
        task = add_task(progress, f"{escape(job.name)}", total=len(job.items))
        progress.update(task, status="photos and captions")
        self.add(job)
        self.caption(job)
        rows = self.bench_rows(job.name)
        todo = [item for item in job.items if item not in rows]
        progress.update(task, completed=len(job.items) - len(todo))
        if todo:
            progress.update(task, status="training")
            run = self.train(job)
            resolution = int(run["params"].get("resolution") or 512)
            progress.update(task, status="drafts")
            self.drafts(job, todo, resolution)
            progress.update(task, status="generating")
            self.generate(job, todo, run, lambda: progress.update(task, advance=1))
            rows = self.bench_rows(job.name)
        progress.update(task, status="scoring")
        chosen = [rows[item] for item in job.items]
        self.score(job, chosen)
        by_id = {row["id"]: row for row in self.store.list_generations(job.name)}
        chosen = [by_id[row["id"]] for row in chosen]
        result = self.summarise(job, chosen)
        atomic_write_bytes(result_path, (json.dumps(result, indent=2) + "\n").encode())
        self.write_contact_sheet(job, chosen)
        progress.update(task, status="[green]done[/green]")
        return result

    def summarise(self, job: SubjectJob, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The subject's result: per-prompt and per-image scores, means, GPU seconds."""
        from stencil_cli import evaluation

        run_ids = sorted({row["run_id"] for row in rows if row.get("run_id") is not None})
        train_s = 0.0
        for run_id in run_ids:
            train_s += float(self.store.get_run(job.name, run_id).get("duration_s") or 0.0)
        generate_s = sum(
            sum(float(v) for v in (row["params"].get("timings_s") or {}).values()) for row in rows
        )
        prompts = []
        for index, prompt in enumerate(job.prompts):
            mine = [row for row in rows if row["params"]["bench"]["prompt_index"] == index]
            if not mine:
                continue
            images = [
                {
                    "image_index": row["params"]["bench"]["image_index"],
                    "seed": row["seed"],
                    "generation_id": row["id"],
                    "file": row["image_file"],
                    "scores": {key: row["scores"][key] for key in evaluation.SCORE_KEYS},
                }
                for row in mine
            ]
            prompts.append(
                {
                    "index": index,
                    "prompt": prompt,
                    "text": clip_t_text(mine[0], self.store.get_subject(job.name)),
                    "images": images,
                    "mean": evaluation.mean_scores([i["scores"] for i in images]),
                }
            )
        all_scores = [image["scores"] for prompt in prompts for image in prompt["images"]]
        return {
            "subject": job.name,
            "class": job.class_word,
            "live": job.live,
            "items": [list(item) for item in job.items],
            "settings": self.config.fingerprint(),
            "images": len(all_scores),
            "mean": evaluation.mean_scores(all_scores),
            "train_seconds": round(train_s, 3),
            "generate_seconds": round(generate_s, 3),
            "gpu_seconds": round(train_s + generate_s, 3),
            "run_ids": run_ids,
            "process": {"rank": self.shard.rank, "world": self.shard.world, "device": self.device},
            "prompts": prompts,
        }

    def write_contact_sheet(self, job: SubjectJob, rows: list[dict[str, Any]]) -> None:
        """A grid: the reference photos, then one row per prompt with its images."""
        from PIL import Image

        from stencil_cli.generation import contact_sheet
        from stencil_cli.images import center_crop_resize, load_rgb

        subject = self.store.get_subject(job.name)
        columns = max(1, self.config.images_per_prompt)
        sheet_rows = [
            [
                (f"photo {i + 1}", center_crop_resize(load_rgb(Path(image["file"])), 128))
                for i, image in enumerate(subject.images[: max(columns, 4)])
            ]
        ]
        for index, _prompt in enumerate(job.prompts):
            mine = [row for row in rows if row["params"]["bench"]["prompt_index"] == index]
            cells = []
            for row in mine:
                with Image.open(row["image_file"]) as opened:
                    cells.append(
                        (f"p{index} s{row['seed']} DINO {row['scores']['dino']:.2f}", opened.convert("RGB"))
                    )
            if cells:
                sheet_rows.append(cells)
        sheet = contact_sheet(sheet_rows, cell=128)
        path = self.subject_folder(job.name) / SHEET_FILE
        from io import BytesIO

        buffer = BytesIO()
        sheet.save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())


# -- results --------------------------------------------------------------------------------------------


def merge_results(config: BenchConfig, subjects: list[str]) -> dict[str, Any]:
    """Read every subject's result.json and compute the overall row (mean over all images)."""
    from stencil_cli import evaluation

    rows = []
    for name in subjects:
        path = config.out / "subjects" / name / RESULT_FILE
        if not path.is_file():
            raise StencilError(
                f"subject {name!r} has no result in {path.parent}; run the benchmark again to finish it"
            )
        rows.append(json.loads(path.read_text(encoding="utf-8")))
    images = [image["scores"] for row in rows for prompt in row["prompts"] for image in prompt["images"]]
    gpu = [float(row["gpu_seconds"]) for row in rows]
    overall = {
        "images": len(images),
        **evaluation.mean_scores(images),
        "gpu_seconds": sum(gpu) / len(gpu) if gpu else None,
        "gpu_seconds_total": sum(gpu),
    }
    summary = [
        {
            "subject": row["subject"],
            "class": row["class"],
            "live": row["live"],
            "images": row["images"],
            **row["mean"],
            "gpu_seconds": row["gpu_seconds"],
            "train_seconds": row["train_seconds"],
            "generate_seconds": row["generate_seconds"],
        }
        for row in rows
    ]
    return {
        "benchmark": "dreambench",
        "settings": config.fingerprint(),
        "prompts_per_subject": config.prompts,
        "images_per_prompt": config.images_per_prompt,
        "subjects": summary,
        "overall": overall,
        "paper": PAPER_ROWS,
    }


def _cell(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(results: dict[str, Any]) -> str:
    """The results in the paper's layout (DINO, CLIP-T, CLIP-I, GPU seconds), per subject and overall."""
    lines = [
        "| subject | class | images | DINO | CLIP-T | CLIP-I | GPU s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["subjects"]:
        lines.append(
            f"| {row['subject']} | {row['class']} | {row['images']} | {_cell(row['dino'])} | "
            f"{_cell(row['clip_t'])} | {_cell(row['clip_i'])} | {_cell(row['gpu_seconds'], 1)} |"
        )
    o = results["overall"]
    lines.append(
        f"| **overall** | | {o['images']} | {_cell(o['dino'])} | {_cell(o['clip_t'])} | "
        f"{_cell(o['clip_i'])} | {_cell(o['gpu_seconds'], 1)} |"
    )
    return "\n".join(lines) + "\n"


def paper_table() -> str:
    """The paper's reference rows in the same layout."""
    lines = ["| method | DINO | CLIP-T | CLIP-I | GPU s / subject |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in PAPER_ROWS:
        lines.append(
            f"| {row['method']} | {_cell(row['dino'])} | {_cell(row['clip_t'])} | {_cell(row['clip_i'])} | "
            f"{_cell(row['gpu_seconds'], 0)} |"
        )
    return "\n".join(lines) + "\n"


def markdown_report(results: dict[str, Any]) -> str:
    """results.md: settings, our table, the paper's table."""
    s = results["settings"]
    return (
        "# DreamBench results\n\n"
        f"Subject model `{s['subject_model']}`, context model `{s['context_model']}`, "
        f"{s['train_steps']} training steps, {s['steps']} DDIM steps, "
        f"{s['inner_steps']} null-text iterations ({s['inversion']}), "
        f"tau {s['tau']:g}; {results['prompts_per_subject'] or 25} prompt(s) x "
        f"{results['images_per_prompt']} image(s) per subject; eval models `{s['eval_dino']}`, "
        f"`{s['eval_clip']}`. Overall = mean over all images; GPU s = mean per subject (training + drafts + "
        "inversion + denoising).\n\n"
        + markdown_table(results)
        + "\nThe paper (SD1.5 base), for reference:\n\n"
        + paper_table()
    )


def plot_scores(results: dict[str, Any]) -> Any:
    """A bar chart (Pillow only): DINO, CLIP-T and CLIP-I per subject and overall, paper lines dashed."""
    from PIL import Image, ImageDraw

    groups = [(row["subject"], row) for row in results["subjects"]] + [("overall", results["overall"])]
    colours = {"dino": (52, 101, 164), "clip_t": (204, 102, 0), "clip_i": (78, 154, 6)}
    labels = {"dino": "DINO", "clip_t": "CLIP-T", "clip_i": "CLIP-I"}
    bar, gap, left, top, height = 14, 18, 50, 40, 240
    width = left + len(groups) * (3 * bar + gap) + 20
    image = Image.new("RGB", (max(width, 300), top + height + 40), "white")
    draw = ImageDraw.Draw(image)
    base = top + height
    for tick in range(0, 11, 2):
        y = base - int(height * tick / 10)
        draw.line([(left - 4, y), (image.width - 10, y)], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{tick / 10:.1f}", fill="black")
    for key, value in (("dino", 0.671), ("clip_t", 0.328)):
        y = base - int(height * value)
        for x in range(left, image.width - 10, 8):
            draw.line([(x, y), (x + 4, y)], fill=colours[key])
    for g, (name, row) in enumerate(groups):
        x0 = left + g * (3 * bar + gap)
        for k, key in enumerate(("dino", "clip_t", "clip_i")):
            value = max(0.0, min(1.0, float(row.get(key) or 0.0)))
            x = x0 + k * bar
            draw.rectangle([x, base - int(height * value), x + bar - 2, base], fill=colours[key])
        draw.text((x0, base + 2), name[:10], fill="black")
    draw.line([(left, top), (left, base), (image.width - 10, base)], fill="black")
    x = left
    for key in ("dino", "clip_t", "clip_i"):
        draw.rectangle([x, 12, x + 10, 22], fill=colours[key])
        draw.text((x + 14, 11), labels[key], fill="black")
        x += 70
    draw.text((left, top + height + 22), "dashed lines: the paper's Stencil DINO / CLIP-T", fill="black")
    return image


def write_results(config: BenchConfig, results: dict[str, Any]) -> dict[str, Path]:
    """Write results.json, results.md and the plot into ``--out``; return their paths."""
    from io import BytesIO

    paths = {
        "json": config.out / RESULTS_JSON,
        "markdown": config.out / RESULTS_MD,
        "plot": config.out / PLOT_FILE,
    }
    atomic_write_bytes(paths["json"], (json.dumps(results, indent=2) + "\n").encode())
    atomic_write_bytes(paths["markdown"], markdown_report(results).encode())
    buffer = BytesIO()
    plot_scores(results).save(buffer, format="PNG")
    atomic_write_bytes(paths["plot"], buffer.getvalue())
    return paths


# -- driving it -----------------------------------------------------------------------------------------


def plan(config: BenchConfig, bench: Any) -> list[SubjectJob]:
    """The job of every selected subject: its prompts (first N) and its (prompt, image) items."""
    jobs = []
    for name in config.subjects:
        prompts = bench.prompts(name)
        if config.prompts is not None:
            prompts = prompts[: config.prompts]
        items = [(p, k) for p in range(len(prompts)) for k in range(config.images_per_prompt)]
        subject = bench.subjects[name]
        jobs.append(SubjectJob(name, subject.class_word, subject.live, prompts, items))
    return jobs


def run_benchmark(config: BenchConfig, shard: Shard | None = None) -> dict[str, Any] | None:
    """Run this process's share of the benchmark; the main process merges and returns the results."""
    from stencil_cli import evaluation
    from stencil_cli.store import Store

    shard = shard or Shard()
    bench = evaluation.load_dreambench(config.dataset)
    jobs = plan(config, bench)
    if shard.is_main:
        check_out_folder(config)
    shard.wait()
    device = shard_device(shard, config.device)
    store = Store(config.out / "store")
    runner = Runner(config, store, device, shard)
    mine = [job for job in jobs if job.name in shard.mine(config.subjects)]
    if shard.world > 1:
        info(
            f"process {shard.rank + 1}/{shard.world} on {device}: "
            f"{', '.join(job.name for job in mine) or 'nothing'}"
        )
    try:
        with progress_bar() as progress:
            for job in mine:
                runner.run_subject(job, progress)
    finally:
        store.close()
    shard.wait()
    if not shard.is_main:
        return None
    results = merge_results(config, config.subjects)
    write_results(config, results)
    return results


def child_args(config: BenchConfig, json_output: bool = False) -> list[str]:
    """The `stencil ...` arguments that repeat this run in each launched process."""
    args = ["-q"] if settings.quiet else []
    args += [
        "bench",
        "dreambench",
        str(config.dataset),
        "--out",
        str(config.out),
        "--subjects",
        ",".join(config.subjects),
        "--images-per-prompt",
        str(config.images_per_prompt),
        "--train-steps",
        str(config.train_steps),
        "--batch-size",
        str(config.batch_size),
        "--lr",
        repr(config.lr),
        "--steps",
        str(config.steps),
        "--inner-steps",
        str(config.inner_steps),
        "--inversion",
        config.inversion,
        "--draft-steps",
        str(config.draft_steps),
        "--tau",
        repr(config.tau),
        "--seed",
        str(config.seed),
        "--captioner",
        config.captioner,
        "--subject-model",
        config.subject_model,
        "--context-model",
        config.context_model,
        "--device",
        config.device,
        "--precision",
        config.precision,
        "--eval-models",
        f"dino={config.eval_dino},clip={config.eval_clip}",
    ]
    if config.prompts is not None:
        args += ["--prompts", str(config.prompts)]
    if config.no_t5:
        args.append("--no-t5")
    if json_output:
        args.append("--json")
    return args


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    return names or None


@bench_app.command("dreambench", no_args_is_help=True)
@handle_errors
def dreambench(
    dataset_dir: Annotated[
        Path, typer.Argument(help="The DreamBench folder (subject folders + prompts_and_classes.txt).")
    ],
    subjects: Annotated[
        str | None,
        typer.Option("--subjects", help="Comma-separated subjects. [default: every subject present]"),
    ] = None,
    prompts: Annotated[
        int | None,
        typer.Option("--prompts", help="Only the first N prompts per subject. [default: 25]", min=1),
    ] = None,
    images_per_prompt: Annotated[
        int, typer.Option("--images-per-prompt", help="Seeds per prompt.", min=1)
    ] = 4,
    out: Annotated[Path, typer.Option("--out", help="Results folder (resumable).")] = Path(
        "dreambench-results"
    ),
    train_steps: Annotated[
        int, typer.Option("--train-steps", help="Training steps per subject.", min=1)
    ] = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training batch size.", min=1)] = 6,
    lr: Annotated[float, typer.Option("--lr", help="Training learning rate.")] = 2e-5,
    steps: Annotated[int, typer.Option("--steps", help="DDIM steps (inversion and denoising).", min=1)] = 50,
    inner_steps: Annotated[
        int, typer.Option("--inner-steps", help="Null-text iterations per step.", min=1)
    ] = 10,
    inversion: Annotated[
        str, typer.Option("--inversion", help="nti (null-text, the paper) or npi (negative-prompt, faster).")
    ] = "nti",
    draft_steps: Annotated[
        int, typer.Option("--draft-steps", help="Context-model steps per draft.", min=1)
    ] = 50,
    tau: Annotated[float, typer.Option("--tau", help="Guidance strength in [0, 1000].")] = 60.0,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of image 0 of each prompt (image k: seed + k).")
    ] = 0,
    captioner: Annotated[str, typer.Option("--captioner", help="template (offline) or openai.")] = "template",
    num_processes: Annotated[
        int,
        typer.Option(
            "--num-processes", help="Launch this many processes with accelerate (one per GPU).", min=1
        ),
    ] = 1,
    eval_models: EvalModelsOption = None,
    subject_model: SubjectModelOption = None,
    context_model: ContextModelOption = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    no_t5: NoT5Option = False,
    json_output: JsonOption = False,
) -> None:
    """Run the DreamBench protocol: per subject add, caption, train, generate every prompt, score; a table."""
    from stencil_cli import evaluation
    from stencil_cli.store import open_store

    if not 0 <= tau <= 1000:
        raise BadInputError(f"--tau must be in [0, 1000] (got {tau})")
    inversion = inversion.strip().lower()
    if inversion not in ("nti", "npi"):
        raise BadInputError(f"--inversion must be nti or npi (got {inversion!r})")
    if captioner not in ("template", "openai"):
        raise BadInputError(f"unknown captioner {captioner!r}: use template or openai")
    bench = evaluation.load_dreambench(dataset_dir)
    chosen = evaluation.select_subjects(bench, dataset_dir, _split(subjects))
    user_store = open_store()
    subject_ref = setting(user_store, "subject_model", subject_model)
    context_ref = setting(user_store, "context_model", context_model)
    device_name = setting(user_store, "device", device)
    precision_name = setting(user_store, "precision", precision)
    user_store.close()
    if eval_models:
        refs = evaluation.parse_eval_models(eval_models)
    elif subject_ref == "tiny":
        refs = evaluation.parse_eval_models("tiny")
        info("subject model tiny: scoring with the tiny eval models (pass --eval-models for real ones)")
    else:
        refs = evaluation.EvalModelRefs()
    config = BenchConfig(
        dataset=dataset_dir.resolve(),
        out=out.expanduser().resolve(),
        subjects=chosen,
        prompts=prompts,
        images_per_prompt=images_per_prompt,
        train_steps=train_steps,
        batch_size=batch_size,
        lr=lr,
        steps=steps,
        inner_steps=inner_steps,
        inversion=inversion,
        draft_steps=draft_steps,
        tau=tau,
        seed=seed,
        captioner=captioner,
        subject_model=subject_ref,
        context_model=context_ref,
        device=device_name,
        precision=precision_name,
        no_t5=no_t5,
        eval_dino=refs.dino,
        eval_clip=refs.clip,
    )
    if num_processes > 1:
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            raise BadInputError("--num-processes inside `accelerate launch`: use one or the other")
        import torch

        cpu = device_name == "cpu" or (device_name == "auto" and not torch.cuda.is_available())
        if cpu and device_name == "auto":
            config.device = "cpu"
        check_out_folder(config)
        command = launch_command(num_processes, child_args(config), cpu=cpu)
        info(
            f"launching {num_processes} processes with accelerate ({'CPU, gloo' if cpu else 'one GPU each'})"
        )
        completed = subprocess.run(command, stdout=subprocess.DEVNULL, check=False)
        if completed.returncode != 0:
            raise StencilError(
                f"the benchmark processes failed (exit code {completed.returncode}); see above"
            )
        results = json.loads((config.out / RESULTS_JSON).read_text(encoding="utf-8"))
    else:
        shard = current_shard(config.device)
        results = run_benchmark(config, shard)
        if results is None:  # not the main process: the main one reports
            return
    if json_output:
        print_json(results)
        return
    typer.echo(markdown_table(results), nl=False)
    info(
        f"results: {escape(str(config.out / RESULTS_MD))}, {escape(str(config.out / RESULTS_JSON))}, "
        f"{escape(str(config.out / PLOT_FILE))}"
    )


def register(app: typer.Typer) -> None:
    """Register `stencil bench dreambench`."""
    app.add_typer(bench_app, name="bench")
