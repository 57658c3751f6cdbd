"""The DreamBench protocol end to end (the runner behind `stencil bench dreambench`), sharded by processes.

For each subject: add its photos, caption them (template: the class word is the phrase), train, render every
prompt (``images_per_prompt`` seeds each) with Context Guidance, score (DINO, CLIP-T, CLIP-I). Then a results
table per subject and overall (Markdown + JSON), a plot and a contact sheet per subject. Training, drafts,
images and scores go through the same verbs as `stencil add` / `caption` / `train` / `gen` / `eval`. Nothing
here prints: progress and notes go as events (`SubjectStatus`, `Note`, `Warning`) to the hook the command
passes.

Layout of ``--out``::

    bench.json                 the settings the results were made with (resuming checks them)
    store/                     the benchmark's own stencil store: subjects, runs (+ masks), generations
    store/subjects/<name>/generations/bench/   the images (p00-0-tau60.png: prompt 0, image 0) and the
                                               context model's drafts (draft-p00-0.png)
    subjects/<name>/result.json, contact-sheet.png
    results.json, results.md, scores.png

Resuming: a subject whose ``result.json`` covers the requested prompts is skipped; otherwise only missing
drafts, a missing training run, missing images and missing scores are made. Sharding: every process
(``accelerate launch`` sets ``WORLD_SIZE``/``RANK``) takes subjects ``rank::world``; the main process waits
for the others (a barrier through ``accelerate.PartialState``: NCCL on GPUs, gloo on CPUs) and merges.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from PIL import Image

from stencil_cli import captioning, models
from stencil_cli.base import events
from stencil_cli.base.errors import EXIT_FAILURE, FieldError, StencilError
from stencil_cli.base.events import Event, Note, Progress, no_progress
from stencil_cli.base.fsutil import atomic_write_bytes
from stencil_cli.base.images import center_crop_resize, load_rgb
from stencil_cli.models import EvalModelRefs, draft_defaults, parse_eval_models, t5_required_error
from stencil_cli.models.devices import Precision
from stencil_cli.store.db import Store
from stencil_cli.store.layout import BENCH_BATCH, CONTACT_SHEET_NAME
from stencil_cli.store.records import Generation, Run
from stencil_cli.store.settings import resolve_setting
from stencil_cli.verbs.caption import CaptionerName, CaptionRequest, caption, resolve_caption_model
from stencil_cli.verbs.evaluate import clip_t_text, score_generations
from stencil_cli.verbs.generate import SavedImage, generate
from stencil_cli.verbs.generation_plan import (
    INVERSION_MODES,
    GenerateRequest,
    InversionMode,
    Item,
    NamedItems,
    check_seeds,
    plan_generation,
)
from stencil_cli.verbs.sheets import Panel, Picture, SheetRow, draw_sheet
from stencil_cli.verbs.subjects import AddRequest, add_photos
from stencil_cli.verbs.train import TrainRequest, resumable_run, train

BENCH_FILE = "bench.json"
RESULT_FILE = "result.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_FILE = "scores.png"
SHEET_CELL = 160  # the bench contact sheet's picture size
TRAIN_FIELDS = {"steps": "train_steps"}  # TrainConfig's fields as BenchConfig names them

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


def setting(default: Any = dataclasses.MISSING, *, numbers: bool, trains: bool = False) -> Any:
    """A BenchConfig field that says whether it changes the numbers (`numbers`: it is in the fingerprint a
    resumed run must match) and whether a subject's training run depends on it (`trains`: in its key)."""
    return dataclasses.field(default=default, metadata={"numbers": numbers, "trains": trains})


@dataclass
class BenchConfig:
    """Everything one benchmark run needs, settled before any model loads.

    Every field is a `setting` saying whether it changes the numbers: the fingerprint and the training key
    are read from that, and `stencil bench` passes every field on to the processes it launches."""

    dataset: Path = setting(numbers=False)
    out: Path = setting(numbers=False)
    subjects: list[str] = setting(numbers=False)
    prompts: int | None = setting(None, numbers=False)  # the first N prompts of each subject (None: all 25)
    images_per_prompt: int = setting(4, numbers=False)
    train_steps: int = setting(100, numbers=True, trains=True)
    batch_size: int = setting(6, numbers=True, trains=True)
    lr: float = setting(2e-5, numbers=True, trains=True)
    steps: int = setting(50, numbers=True)
    inner_steps: int = setting(10, numbers=True)
    inversion: InversionMode = setting("nti", numbers=True)
    draft_steps: int | None = setting(None, numbers=True)  # None: the context model's preset, else 50
    tau: float = setting(60.0, numbers=True)
    seed: int = setting(0, numbers=True, trains=True)
    captioner: CaptionerName = setting("openai", numbers=True, trains=True)  # as `stencil caption`
    caption_model: str | None = setting(None, numbers=True)  # None: stored `caption_model`, else gpt-4o
    subject_model: str = setting("sd15", numbers=True, trains=True)
    context_model: str = setting("sd3-medium", numbers=True)
    device: str = setting("auto", numbers=False)
    precision: Precision = setting("auto", numbers=True, trains=True)
    no_t5: bool = setting(False, numbers=True)
    eval_dino: str = setting("facebook/dino-vits16", numbers=True)
    eval_clip: str = setting("openai/clip-vit-base-patch32", numbers=True)
    # the user's store: built presets (tiny) live there, not in --out
    models_root: Path | None = setting(None, numbers=False)

    def __post_init__(self) -> None:
        if self.draft_steps is None:  # settled here, so the fingerprint holds the number the drafts use
            self.draft_steps = draft_defaults(self.context_model).steps

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change the numbers (a resumed run must match them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["numbers"]}

    def train_key(self) -> dict[str, Any]:
        """The settings a reusable training run must have been made with."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["trains"]}

    def validate(self) -> None:
        """A FieldError naming the setting that cannot work (before any work)."""
        if self.out.exists() and not self.out.is_dir():
            raise FieldError("out", f"{{}} {self.out} is a file: give a folder for the results")
        if not 0 <= self.tau <= 1000:
            raise FieldError("tau", f"must be in [0, 1000] (got {self.tau})")
        if self.inversion not in INVERSION_MODES:
            raise FieldError("inversion", f"must be nti or npi (got {self.inversion!r})")
        if self.captioner not in ("template", "openai"):
            raise FieldError("captioner", f"must be template or openai (got {self.captioner!r})")
        if self.no_t5 and draft_defaults(self.context_model).t5 == "required":
            raise t5_required_error(self.context_model)  # before any subject trains
        counts = {
            "steps": (self.steps, 1000),
            "inner_steps": (self.inner_steps, None),
            "draft_steps": (self.draft_steps, None),
            "images_per_prompt": (self.images_per_prompt, None),
            "prompts": (1 if self.prompts is None else self.prompts, None),
        }
        for name, (value, most) in counts.items():
            if value < 1 or (most is not None and value > most):
                bounds = f"in [1, {most}]" if most is not None else "at least 1"
                raise FieldError(name, f"must be {bounds} (got {value})")
        check_seeds(self.seed, self.images_per_prompt)
        try:  # the full training config, as every subject will train with it
            self.train_config(resolution=512, precision="fp32").validate()
        except FieldError as error:  # the training steps are --train-steps here (--steps are DDIM steps)
            raise error.renamed(TRAIN_FIELDS) from None

    def generate_request(self, name: str) -> GenerateRequest:
        """How every benchmark image of subject `name` is rendered (Context Guidance at one tau)."""
        return GenerateRequest(
            name=name,
            prompts=[],
            taus=[self.tau],
            steps=self.steps,
            inner_steps=self.inner_steps,
            inversion=self.inversion,
            draft_steps=self.draft_steps,
            subject_model=self.subject_model,
            context_model=self.context_model,
            device=self.device,
            precision=self.precision,
            no_t5=self.no_t5,
        )

    def train_config(self, *, resolution: int, precision: str) -> Any:
        """The training settings of every subject (the model's resolution, the autocast precision)."""
        from stencil_cli.core.training import TrainConfig

        return TrainConfig(
            steps=self.train_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=self.seed,
            resolution=resolution,
            precision=precision,
        )


def settle_config(
    store: Store,
    config: BenchConfig,
    *,
    subjects: list[str] | None,
    eval_models: str | None,
    models: tuple[str | None, str | None, str | None, str | None],
) -> list[str]:
    """Check every setting, pick the subjects, settle the models (flag > env > config > default) in place.

    Returns notes for the user. Runs before any work: a bad setting must not fail after hours of training.
    """
    from stencil_cli.core import evaluation

    config.validate()
    bench = evaluation.load_dreambench(config.dataset)
    config.subjects = evaluation.select_subjects(bench, config.dataset, subjects)
    subject_model, context_model, device, precision = models
    config.subject_model = resolve_setting(store, "subject_model", subject_model)
    config.context_model = resolve_setting(store, "context_model", context_model)
    config.device = resolve_setting(store, "device", device)
    config.precision = resolve_setting(store, "precision", precision)
    config.models_root = store.root
    if config.captioner == "openai":
        if not (os.environ.get(captioning.KEY_ENV) or os.environ.get(captioning.BASE_URL_ENV)):
            raise FieldError(
                "captioner",
                f"the benchmark captions with the vision model like `stencil caption`, and "
                f"{captioning.KEY_ENV} is not set: export it, or pass {{}} template (offline; its table is "
                "not comparable with the paper's)",
                exit_code=EXIT_FAILURE,
            )
        config.caption_model = resolve_caption_model(store, config.caption_model)
    else:
        config.caption_model = None
    notes = []
    if eval_models:
        refs = parse_eval_models(eval_models)
    elif config.subject_model == "tiny":
        refs = parse_eval_models("tiny")
        notes.append("subject model tiny: scoring with the tiny eval models (give real ones to compare)")
    else:
        refs = EvalModelRefs()
    config.eval_dino, config.eval_clip = refs.dino, refs.clip
    return notes


def launch_on_cpu(config: BenchConfig) -> bool:
    """Whether launched processes run on the CPU (settles `auto` to `cpu` when no GPU is there)."""
    import torch

    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if cpu and config.device == "auto":
        config.device = "cpu"
    return cpu


def check_out_folder(config: BenchConfig) -> None:
    """Create ``--out`` and record the settings; a folder made with other settings is a clear error."""
    path = config.out / BENCH_FILE
    wanted = config.fingerprint()
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            stored = data["settings"] if isinstance(data, dict) else None
        except (OSError, ValueError, KeyError):
            stored = None
        if not isinstance(stored, dict):  # the settings check must not be skipped silently
            raise FieldError(
                "out",
                f"{path} cannot be read as a benchmark's settings; use another {{}}, or delete that file "
                "if the folder holds no results you want to keep",
            )
        changed = [key for key in wanted if key in stored and stored[key] != wanted[key]]
        if changed:
            key = changed[0]
            raise FieldError(
                "out",
                f"{config.out} holds results made with other settings ({key}: {stored[key]!r}, now "
                f"{wanted[key]!r}); use another {{}}, or the same settings to resume",
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


# -- one subject ----------------------------------------------------------------------------------------


def _stem(prompt_index: int, image_index: int) -> str:
    return f"p{prompt_index:02d}-{image_index}"


@dataclass(frozen=True)
class SubjectStatus(Event):
    """Progress event: what the runner does now for `subject` ("training", ..., "done"), with its images
    made of planned. Besides these the runner reports a `Note` (which subjects this process runs) and a
    `Warning` for what it skips (a photo that cannot be used, a missing image file)."""

    subject: str
    doing: str
    done: int
    total: int


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

    def __init__(
        self,
        config: BenchConfig,
        store: Store,
        device: str,
        shard: Shard | None = None,
        progress: Progress = no_progress,
    ) -> None:
        self.config = config
        self.store = store
        self.device = device
        self.shard = shard or Shard()
        self.progress = progress
        self._eval_models: Any = None

    # -- steps ------------------------------------------------------------------------------------------

    def subject_folder(self, name: str) -> Path:
        """Where a subject's result and contact sheet go."""
        return self.config.out / "subjects" / name

    def add(self, job: SubjectJob) -> None:
        """Add the subject's photos to the benchmark store (once)."""
        existing = self.store.find_subject(job.name)
        if existing is not None and existing.images:
            return
        folder = self.config.dataset / job.name
        word = job.class_word
        request = AddRequest(job.name, [folder], phrase=word, class_word=word, skip_bad=True)
        outcome = add_photos(self.store, request)
        for rejected in outcome.skipped:
            self.progress(events.Warning(f"{job.name}: skipped {rejected.source.name}: {rejected.reason}"))

    def caption(self, job: SubjectJob) -> None:
        """Caption the photos that have no caption yet (checked and stored like `stencil caption`)."""
        request = CaptionRequest(job.name, captioner=self.config.captioner, model=self.config.caption_model)
        caption(self.store, request)

    def train(self, job: SubjectJob) -> Run:
        """The subject's training run made with these settings, training (or resuming) it if there is none."""
        key = self.config.train_key()
        for run in reversed(self.store.list_runs(job.name)):
            if (
                run.status == "done"
                and run.params.get("bench") == key
                and run.weights_file is not None
                and run.weights_file.is_file()
            ):
                return run
        request = TrainRequest(
            job.name,
            steps=self.config.train_steps,
            batch_size=self.config.batch_size,
            lr=self.config.lr,
            seed=self.config.seed,
            subject_model=self.config.subject_model,
            device=self.device,
            precision=self.config.precision,
            extra_params={"bench": key},
            resume=self._can_resume(job.name, key),
            models_root=self.config.models_root,
        )
        try:
            result = train(self.store, request)
        except FieldError as error:
            raise error.renamed(TRAIN_FIELDS) from None
        assert result.run is not None
        return result.run

    def _can_resume(self, name: str, key: dict[str, Any]) -> bool:
        """Whether an interrupted run of these settings left a checkpoint to continue from."""
        try:
            return resumable_run(self.store, name).params.get("bench") == key
        except StencilError:
            return False

    def generate(self, job: SubjectJob, todo: list[tuple[int, int]], on_item: Callable[[], None]) -> None:
        """Render the missing items (drafts kept from an earlier attempt are reused); one row per image."""
        items = [
            Item(
                job.prompts[prompt_index],
                self.config.seed + image_index,
                stem=_stem(prompt_index, image_index),
                meta={"bench": {"prompt_index": prompt_index, "image_index": image_index}},
            )
            for prompt_index, image_index in todo
        ]
        plan = plan_generation(
            self.store,
            self.config.generate_request(job.name),
            NamedItems(items, folder=BENCH_BATCH, reuse_drafts=True),
            models_root=self.config.models_root,
        )
        with contextlib.closing(generate(self.store, plan)) as saving:
            for saved in saving:
                if isinstance(saved, SavedImage):
                    on_item()

    def eval_models(self) -> Any:
        """The DINO and CLIP models (loaded on first use, kept for the next subjects)."""
        if self._eval_models is None:
            refs = models.EvalModelRefs(self.config.eval_dino, self.config.eval_clip)
            device = models.resolve_device(self.device)
            root = self.config.models_root or self.store.root
            self._eval_models = models.load_eval_models(refs, device, store_root=root)
        return self._eval_models

    def score(self, job: SubjectJob, rows: list[Generation]) -> None:
        """Score the rows that have no scores from these eval models yet (stored with the generations)."""
        wanted = {"dino": self.config.eval_dino, "clip": self.config.eval_clip}
        unscored = [row for row in rows if not row.scores or row.scores.get("eval_models") != wanted]
        if unscored:
            score_generations(
                self.store,
                self.store.get_subject(job.name),
                unscored,
                self.eval_models(),
                on_missing=lambda row: self.progress(
                    events.Warning(f"generation {row.id}: image file missing")
                ),
            )

    # -- the whole subject ------------------------------------------------------------------------------

    def bench_rows(self, name: str) -> dict[tuple[int, int], Generation]:
        """The subject's benchmark generations by (prompt index, image index) (newest wins)."""
        rows: dict[tuple[int, int], Generation] = {}
        if self.store.find_subject(name) is None:
            return rows
        for row in self.store.list_generations(name):
            key = row.params.get("bench")
            if isinstance(key, dict) and row.image_file is not None and row.image_file.is_file():
                rows[(int(key["prompt_index"]), int(key["image_index"]))] = row
        return rows

    def run_subject(self, job: SubjectJob) -> dict[str, Any]:
        """Run one subject end to end (skipping what is already done) and write its result.json."""
        result_path = self.subject_folder(job.name) / RESULT_FILE
        planned = [list(item) for item in job.items]
        if result_path.is_file():
            try:
                done = json.loads(result_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                done = {}
            if done.get("items") == planned and done.get("settings") == self.config.fingerprint():
                return done
        total = len(job.items)
        self.progress(SubjectStatus(job.name, "photos and captions", 0, total))
        self.add(job)
        self.caption(job)
        rows = self.bench_rows(job.name)
        todo = [item for item in job.items if item not in rows]
        made = total - len(todo)
        if todo:
            self.progress(SubjectStatus(job.name, "training", made, total))
            self.train(job)
            self.progress(SubjectStatus(job.name, "generating", made, total))

            def one_more() -> None:
                nonlocal made
                made += 1
                self.progress(SubjectStatus(job.name, "generating", made, total))

            self.generate(job, todo, one_more)
            rows = self.bench_rows(job.name)
        self.progress(SubjectStatus(job.name, "scoring", total, total))
        chosen = [rows[item] for item in job.items]
        self.score(job, chosen)
        by_id = {row.id: row for row in self.store.list_generations(job.name)}
        chosen = [by_id[row.id] for row in chosen]
        result = self.summarise(job, chosen)
        atomic_write_bytes(result_path, (json.dumps(result, indent=2) + "\n").encode())
        self.write_contact_sheet(job, chosen)
        self.progress(SubjectStatus(job.name, "done", total, total))
        return result

    def summarise(self, job: SubjectJob, rows: list[Generation]) -> dict[str, Any]:
        """The subject's result: per-prompt and per-image scores, means, GPU seconds."""
        from stencil_cli.core import evaluation

        run_ids = sorted({row.run_id for row in rows if row.run_id is not None})
        train_s = 0.0
        for run_id in run_ids:
            train_s += float(self.store.get_run(job.name, run_id).duration_s or 0.0)
        generate_s = sum(sum(float(v) for v in (row.params.get("timings_s") or {}).values()) for row in rows)
        prompts = []
        for index, prompt in enumerate(job.prompts):
            mine = [row for row in rows if row.params["bench"]["prompt_index"] == index]
            if not mine:
                continue
            images = [
                {
                    "image_index": row.params["bench"]["image_index"],
                    "seed": row.seed,
                    "generation_id": row.id,
                    "file": str(row.image_file),
                    "scores": {key: (row.scores or {})[key] for key in evaluation.SCORE_KEYS},
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

    def write_contact_sheet(self, job: SubjectJob, rows: list[Generation]) -> None:
        """A grid: the reference photos, then one row per prompt (its text above it) with its images."""
        subject = self.store.get_subject(job.name)
        columns = max(1, self.config.images_per_prompt)
        photos = [load_rgb(Path(image["file"])) for image in subject.images[: max(columns, 4)]]
        sheet = draw_sheet(contact_sheet_rows(job.name, photos, job.prompts, rows), SHEET_CELL)
        path = self.subject_folder(job.name) / CONTACT_SHEET_NAME
        buffer = BytesIO()
        sheet.save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())


def contact_sheet_rows(
    name: str, photos: list[Image.Image], prompts: list[str], rows: list[Generation]
) -> list[SheetRow]:
    """The bench contact sheet's rows: the reference photos, then each prompt's images under its text
    (the subject prompt the images were made with), each labelled with its seed and DINO score."""
    sheet_rows = [
        SheetRow(
            [
                Panel([Picture(center_crop_resize(photo, SHEET_CELL), f"photo {i + 1}")])
                for i, photo in enumerate(photos)
            ],
            heading=f"{name}: reference photos",
        )
    ]
    for index, prompt in enumerate(prompts):
        mine = [row for row in rows if row.params["bench"]["prompt_index"] == index]
        cells = []
        for row in mine:
            assert row.image_file is not None and row.scores is not None
            with Image.open(row.image_file) as opened:
                label = f"seed {row.seed} · DINO {row.scores['dino']:.2f}"
                cells.append(Panel([Picture(opened.convert("RGB"), label)]))
        if cells:
            sheet_rows.append(SheetRow(cells, heading=f"p{index}: {mine[0].prompt or prompt}"))
    return sheet_rows


# -- results --------------------------------------------------------------------------------------------


def merge_results(config: BenchConfig, subjects: list[str]) -> dict[str, Any]:
    """Read every subject's result.json and compute the overall row (mean over all images)."""
    from stencil_cli.core import evaluation

    paths = {name: config.out / "subjects" / name / RESULT_FILE for name in subjects}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        raise StencilError(
            f"{len(missing)} of {len(subjects)} subject(s) have no result in {config.out / 'subjects'} "
            f"({', '.join(missing)}); run the benchmark again to finish them"
        )
    rows = [json.loads(path.read_text(encoding="utf-8")) for path in paths.values()]
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
        "comparable_with_paper": comparable_with_paper(config.fingerprint()),
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


def comparable_with_paper(settings: dict[str, Any]) -> bool:
    """Whether a table can stand beside the paper's: captions (and descriptions) from a vision model."""
    return settings.get("captioner") == "openai"


NOT_COMPARABLE = (
    "**Not comparable with the paper**: captioned with templates (no subject descriptions; drafts "
    "rendered from the class word alone). The paper's protocol captions with a vision model "
    "(captioner `openai`).\n\n"
)


def markdown_report(results: dict[str, Any]) -> str:
    """results.md: every setting, our table, the paper's table (template captions are marked)."""
    s = results["settings"]
    captions = (
        f"captions by `{s.get('caption_model')}`" if s.get("captioner") == "openai" else "template captions"
    )
    listed = ", ".join(f"{key} `{value}`" for key, value in s.items())
    return (
        "# DreamBench results\n\n"
        + ("" if comparable_with_paper(s) else NOT_COMPARABLE)
        + f"Captioner `{s.get('captioner')}` ({captions}). "
        f"Subject model `{s['subject_model']}`, context model `{s['context_model']}`, "
        f"{s['train_steps']} training steps, {s['steps']} DDIM steps, "
        f"{s['inner_steps']} null-text iterations ({s['inversion']}), "
        f"tau {s['tau']:g}; {results['prompts_per_subject'] or 25} prompt(s) x "
        f"{results['images_per_prompt']} image(s) per subject; eval models `{s['eval_dino']}`, "
        f"`{s['eval_clip']}`. Overall = mean over all images; GPU s = mean per subject (training + drafts + "
        "inversion + denoising).\n\n"
        f"All settings: {listed}.\n\n"
        + markdown_table(results)
        + "\nThe paper (SD1.5 base), for reference:\n\n"
        + paper_table()
    )


def plot_scores(results: dict[str, Any]) -> bytes:
    """A bar chart (PNG bytes): DINO, CLIP-T and CLIP-I per subject and overall, values on the bars, the
    paper's lines dashed."""
    from stencil_cli.verbs.charts import figure_png, scores_figure  # matplotlib: not at start-up

    groups = [(row["subject"], row) for row in results["subjects"]] + [("overall", results["overall"])]
    return figure_png(scores_figure(groups))


def write_results(config: BenchConfig, results: dict[str, Any]) -> dict[str, Path]:
    """Write results.json, results.md and the plot into ``--out``; return their paths."""
    paths = {
        "json": config.out / RESULTS_JSON,
        "markdown": config.out / RESULTS_MD,
        "plot": config.out / PLOT_FILE,
    }
    atomic_write_bytes(paths["json"], (json.dumps(results, indent=2) + "\n").encode())
    atomic_write_bytes(paths["markdown"], markdown_report(results).encode())
    atomic_write_bytes(paths["plot"], plot_scores(results))
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


def locate_models(config: BenchConfig) -> None:
    """Find every model the benchmark needs (subject, context, DINO, CLIP) before training the first subject:
    a missing eval model must not surface only after a subject's training and generation."""
    root = config.models_root or None
    models.inspect_ref(config.subject_model, models.SUBJECT, store_root=root)
    models.inspect_ref(config.context_model, models.CONTEXT, store_root=root)
    for kind, ref in (("dino", config.eval_dino), ("clip", config.eval_clip)):
        models.locate_eval(models.resolve_ref(ref, models.EVAL, store_root=root), kind)


def run_benchmark(
    config: BenchConfig, shard: Shard | None = None, progress: Progress = no_progress
) -> dict[str, Any] | None:
    """Run this process's share of the benchmark; the main process merges and returns the results."""
    from stencil_cli.core import evaluation

    config.validate()
    shard = shard or Shard()
    bench = evaluation.load_dreambench(config.dataset)
    jobs = plan(config, bench)
    locate_models(config)
    if shard.is_main:
        check_out_folder(config)
        # create the store (WAL mode, migrations) before the others open it: two processes switching a new
        # database to WAL at once fail with "database is locked"
        Store(config.out / "store").close()
    shard.wait()
    device = shard_device(shard, config.device)
    store = Store(config.out / "store")
    runner = Runner(config, store, device, shard, progress)
    mine = [job for job in jobs if job.name in shard.mine(config.subjects)]
    if shard.world > 1:
        progress(
            Note(
                f"process {shard.rank + 1}/{shard.world} on {device}: "
                f"{', '.join(job.name for job in mine) or 'nothing'}"
            )
        )
    try:
        for job in mine:
            runner.run_subject(job)
    finally:
        store.close()
        # every process reaches the barrier, even after an error: the others would wait for it forever
        shard.wait()
    if not shard.is_main:
        return None
    results = merge_results(config, config.subjects)
    write_results(config, results)
    return results
