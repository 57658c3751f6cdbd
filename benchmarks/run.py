"""Stencil against the plain reference (benchmarks/reference.py), stage by stage, in one invocation.

    python benchmarks/run.py --preset tiny                          # tiny models, CPU (seconds)
    python benchmarks/run.py --preset tiny --repeat 5 --json        # medians of 5, one JSON object
    python benchmarks/run.py --preset full --device cuda --json     # SD1.5 + SD3 Medium architectures

Stages: the mask pass (encode the photos and captions, one frozen UNet pass per photo), N training steps
(100 by default, batch 6), the context model's draft, the null-text inversion and the guided denoise of one
image. Each stage runs stencil's path and the reference's on the same models, the same inputs and the same
machine, after an untimed warm-up, CUDA-synchronised, by wall clock; `--repeat N` alternates the two N times
and reports the medians. Peak memory per stage: on CUDA `torch.cuda.max_memory_allocated` (everything
resident, reset before each stage); on the CPU the growth of the resident set over the stage (the kernel's
high-water mark, reset through /proc/self/clear_refs, or a psutil sampler elsewhere).

Beside the seconds, every stage reports the work as model passes, counted by forward hooks on the subject UNet
and the context model's transformer while the timed call runs (`unet_forward`, `unet_backward`,
`context_forward`; a call on a batch of B samples counts B, a backward through a call's output counts B
backward passes), for stencil and the reference, and for the authors' published pipeline computed from its
settings (`authors`, see `authors_counts`: without its early stop, an upper bound). `unet_pass_equivalents`
counts a backward as two forwards; `per_image` sums the draft, inversion and denoise of one image.

`--preset full` builds the full-size SD1.5 and SD3 Medium architectures with random weights (nothing is
downloaded; speed and memory do not depend on the weights). Stencil runs as `stencil train` / `stencil gen`
do on that device: on CUDA training with bf16 autocast over fp32 master weights, the pipelines in bf16 and
the null-text inversion in fp32; the reference runs in fp32 throughout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_generate  # noqa: E402
import plain  # noqa: E402
import reference as ref  # noqa: E402

from stencil_cli import models  # noqa: E402
from stencil_cli.core import generation, training  # noqa: E402
from stencil_cli.core.inversion import NullTextSettings  # noqa: E402

STAGES = ("mask", "train", "draft", "inversion", "denoise")
PHRASE = "toy robot"
CAPTIONS = (
    "a photo of a toy robot on a wooden table",
    "a toy robot standing on grass in the sun",
    "a close-up photo of a toy robot in front of a blue wall",
    "a red toy robot on a white shelf",
)
PROMPT = bench_generate.PROMPT  # the same prompts as bench_generate.py
DRAFT_PROMPT = bench_generate.DRAFT_PROMPT


# -- measuring -----------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets the peak resident set size (Linux >= 4.0)
        _hwm_bytes()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def cpu_peak() -> Iterator[dict[str, int]]:
    """Measure the resident-set high-water mark inside the block: {'start', 'peak'} in bytes."""
    out: dict[str, int] = {}
    gc.collect()
    if _reset_hwm():
        out["start"] = _rss_bytes()
        yield out
        out["peak"] = max(_hwm_bytes(), out["start"])
        return
    import psutil  # fallback (macOS, no /proc): sample every 2 ms

    process = psutil.Process()
    out["start"] = out["peak"] = process.memory_info().rss
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            out["peak"] = max(out["peak"], process.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak"] = max(out["peak"], process.memory_info().rss)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


COUNT_KEYS = ("unet_forward", "unet_backward", "context_forward")


class PassCounter:
    """Counts model passes with forward hooks: a call on a batch of B samples is B forward passes, and a
    backward through that call's output is B backward passes (a tensor hook on the output)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.handles: list[Any] = []

    def attach(self, module: torch.nn.Module, name: str) -> None:
        """Count `module`'s passes as `{name}_forward` / `{name}_backward`."""

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            sample = kwargs.get("sample", kwargs.get("hidden_states"))
            if sample is None:
                sample = args[0]
            batch = int(sample.shape[0])
            self.counts[f"{name}_forward"] += batch
            out = output[0] if isinstance(output, tuple) else output.sample
            if out.requires_grad:

                def backward(grad: torch.Tensor) -> None:
                    self.counts[f"{name}_backward"] += batch

                out.register_hook(backward)

        self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def reset(self) -> None:
        """Start counting from zero."""
        self.counts.clear()

    def snapshot(self) -> dict[str, int]:
        """The counts so far, every key present."""
        return {key: int(self.counts[key]) for key in COUNT_KEYS}


def pass_equivalents(counts: dict[str, int]) -> int:
    """Subject-UNet work in forward passes: a backward counts as two forwards."""
    return counts["unet_forward"] + 2 * counts["unet_backward"]


@dataclass
class Run:
    """One timed call: wall seconds, process CPU seconds, peak memory (bytes, absolute) and its growth."""

    seconds: float
    cpu: float
    peak: int
    extra: int
    counts: dict[str, int] = field(default_factory=dict)


def timed(fn: Callable[[], Any], device: torch.device, counter: PassCounter | None = None) -> tuple[Run, Any]:
    """Call `fn` once: synchronised wall clock and peak memory on `device` (and its model passes)."""
    counter = counter or PassCounter()
    counter.reset()
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start_mem = torch.cuda.memory_allocated(device)
        start, cpu = time.perf_counter(), time.process_time()
        result = fn()
        sync(device)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        peak = torch.cuda.max_memory_allocated(device)
        return Run(seconds, cpu, peak, peak - start_mem, counter.snapshot()), result
    with cpu_peak() as memory:
        start, cpu = time.perf_counter(), time.process_time()
        result = fn()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return Run(seconds, cpu, memory["peak"], memory["peak"] - memory["start"], counter.snapshot()), result


@dataclass
class StageResult:
    """All timed runs of one stage, both paths."""

    stencil: list[Run] = field(default_factory=list)
    reference: list[Run] = field(default_factory=list)
    plain: list[Run] = field(default_factory=list)  # training only: a plain PyTorch loop on the same data
    authors: dict[str, int] = field(default_factory=dict)  # computed, not run (authors_counts)

    @staticmethod
    def _median(runs: list[Run], attr: str) -> float:
        return float(statistics.median(getattr(run, attr) for run in runs))

    def summary(self) -> dict[str, Any]:
        """Medians, the ratio reference/stencil, peak memory in MiB and the raw seconds."""
        s, r = self._median(self.stencil, "seconds"), self._median(self.reference, "seconds")
        mib = 2**20
        plain = {}
        if self.plain:
            p = self._median(self.plain, "seconds")
            plain = {
                "plain_s": round(p, 4),
                "plain_ratio": round(p / s, 3) if s > 0 else None,
                "plain_peak_mb": round(max(x.peak for x in self.plain) / mib, 1),
                "plain_cpu_s": round(self._median(self.plain, "cpu"), 4),
                "plain_runs_s": [round(x.seconds, 4) for x in self.plain],
            }
        return {
            **plain,
            "stencil_s": round(s, 4),
            "reference_s": round(r, 4),
            "ratio": round(r / s, 3) if s > 0 else None,
            "stencil_peak_mb": round(max(x.peak for x in self.stencil) / mib, 1),
            "reference_peak_mb": round(max(x.peak for x in self.reference) / mib, 1),
            "stencil_extra_mb": round(max(x.extra for x in self.stencil) / mib, 1),
            "reference_extra_mb": round(max(x.extra for x in self.reference) / mib, 1),
            "stencil_cpu_s": round(self._median(self.stencil, "cpu"), 4),
            "reference_cpu_s": round(self._median(self.reference, "cpu"), 4),
            "stencil_runs_s": [round(x.seconds, 4) for x in self.stencil],
            "reference_runs_s": [round(x.seconds, 4) for x in self.reference],
            "stencil": with_equivalents(self.stencil[-1].counts),
            "reference": with_equivalents(self.reference[-1].counts),
            "authors": with_equivalents(self.authors),
        }


def with_equivalents(counts: dict[str, int]) -> dict[str, int]:
    """The pass counts plus `unet_pass_equivalents` (a backward counts as two forwards)."""
    return {**counts, "unet_pass_equivalents": pass_equivalents(counts)}


def authors_counts(stage: str, s: Settings, photos: int) -> dict[str, int]:
    """Model passes of the authors' published pipeline for `stage` at the run's sizes, computed (not run).

    Their settings: 50 DDIM steps, 10 null-text iterations per step, tau 60; their code runs the null-text
    inversion of Mokady et al. (per step one conditional forward, then per iteration one forward and one
    backward, then one classifier-free-guided step as a batch of 2) for every one of the steps, and its mask
    pass as a guidance batch [empty prompt, caption]. Counted without the early stop (every iteration
    runs), so the null-text figure is an upper bound: with early stopping they run at most this many.
    """
    counts = dict.fromkeys(COUNT_KEYS, 0)
    if stage == "mask":
        counts["unet_forward"] = 2 * photos
    elif stage == "train":
        counts["unet_forward"] = counts["unet_backward"] = s.steps * s.batch_size
    elif stage == "draft":
        counts["context_forward"] = 2 * s.draft_steps  # classifier-free guidance: a batch of 2 per step
    elif stage == "inversion":
        # DDIM inversion (one conditional pass per step), then every step's null-text optimisation
        counts["unet_forward"] = s.ddim_steps + s.ddim_steps * (1 + s.inner_steps + 2)
        counts["unet_backward"] = s.ddim_steps * s.inner_steps
    elif stage == "denoise":
        counts["unet_forward"] = 2 * s.ddim_steps
    return counts


# -- the workload --------------------------------------------------------------------------------------


def synthetic_photos(count: int, resolution: int) -> list[Image.Image]:
    """Square photos at `resolution` (so cropping is the identity for both paths): a shape on a gradient."""
    photos = []
    for k in range(count):
        x = np.linspace(0, 1, resolution, dtype=np.float32)
        base = np.stack(np.meshgrid(x, x), -1)
        rgb = np.concatenate([base, np.full_like(base[..., :1], 0.3 + 0.1 * k)], -1)
        image = Image.fromarray((rgb * 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        a, b = resolution // 4 + k * resolution // 16, resolution // 2 + k * resolution // 16
        draw.ellipse([a, a, b + resolution // 8, b + resolution // 8], fill=(220, 40 + 40 * k, 30))
        photos.append(image)
    return photos


@dataclass
class Workload:
    """Models and inputs shared by both paths."""

    device: torch.device
    subject: Any  # SD1.5-shaped pipeline, fp32
    context: Any  # SD3-shaped pipeline, fp32
    unet_state: dict[str, torch.Tensor]  # the UNet's initial weights (CPU copy), restored before each run
    photos: list[Image.Image]
    captions: list[str]
    resolution: int
    draft_dtype: torch.dtype  # the dtype `stencil gen` loads the context (draft) model in on this device
    subject_dtype: torch.dtype  # the dtype `stencil gen` runs the subject model in on this device
    train_precision: str  # the autocast `stencil train` uses on this device


def context_width(pipe: Any) -> int | None:
    """The context pipeline's transformer width, as `stencil gen` reads it from the same config."""
    transformer = getattr(pipe, "transformer", None)
    return models.transformer_width(transformer.config) if transformer is not None else None


def build_workload(
    preset: str,
    device: torch.device,
    photos: int,
    no_t5: bool,
    *,
    resolution: int | None = None,
    folders: tuple[str, str] | None = None,
    with_context: bool = True,
) -> Workload:
    """Tiny (in memory) or full-size random-weight pipelines on `device`, fp32 (bench_generate's builders, or
    saved model `folders` (subject, context) loaded as stencil loads them), and synthetic photos at
    `resolution` (default: the subject model's native size). Without `with_context` (no image stage is
    run) the context model is not loaded."""
    torch.manual_seed(0)
    with models.quiet_libraries():
        if folders is not None:
            subject = models.load_subject_pipeline(folders[0], device=str(device), precision="fp32")
            context = (
                models.load_context_pipeline(folders[1], device=str(device), precision="fp32", no_t5=no_t5)
                if with_context
                else None
            )
        else:
            subject = bench_generate.build_subject(preset, device, torch.float32)
            context = (
                bench_generate.build_context(preset, device, torch.float32, no_t5) if with_context else None
            )
    resolution = resolution or models.native_resolution(subject)
    autocast = models.resolve_dtype("auto", device)
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(autocast, "fp32")
    state = {k: v.detach().to("cpu", copy=True) for k, v in subject.unet.state_dict().items()}
    return Workload(
        device=device,
        subject=subject,
        context=context,
        unet_state=state,
        photos=synthetic_photos(photos, resolution),
        captions=[CAPTIONS[k % len(CAPTIONS)] for k in range(photos)],
        resolution=resolution,
        draft_dtype=models.context_dtype("auto", device, width=context_width(context)),
        subject_dtype=models.subject_dtype("auto", device),
        train_precision=precision,
    )


def to_dtype(pipe: Any, dtype: torch.dtype) -> None:
    """Cast a pipeline's modules to `dtype` (quietly; nothing to do when they already are)."""
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    if any(p.dtype != dtype for m in modules for p in m.parameters()):
        with models.quiet_libraries():
            pipe.to(dtype=dtype)


def restore(work: Workload, dtype: torch.dtype = torch.float32) -> None:
    """Put the subject pipeline back to its initial weights, in `dtype`."""
    to_dtype(work.subject, torch.float32)
    work.subject.unet.load_state_dict(work.unet_state)
    work.subject.unet.requires_grad_(False)
    work.subject.unet.eval()
    to_dtype(work.subject, dtype)


@dataclass
class Settings:
    """Sizes of the run."""

    steps: int = 100
    batch_size: int = 6
    ddim_steps: int = 50
    inner_steps: int = 10
    draft_steps: int = 50
    tau: float = 60.0
    seed: int = 0


@dataclass
class Shared:
    """Outputs one stage hands to the next (so every stage has real inputs)."""

    data: Any = None  # stencil's TrainingData
    reference_data: Any = None  # the reference's latents, embeddings and masks
    draft: Image.Image | None = None
    inversion: Any = None
    reference_inversion: Any = None


def stage_calls(
    stage: str, work: Workload, s: Settings, shared: Shared, *, warmup: bool
) -> dict[str, Callable[[], Any]]:
    """Each path's call for `stage` (stencil, the reference; for training also the plain PyTorch loop);
    `warmup` shrinks them to a few steps."""
    res, pipe = work.resolution, work.subject
    steps = 2 if warmup else s.steps
    ddim = 2 if warmup else s.ddim_steps
    inner = 2 if warmup else s.inner_steps
    draft_steps = 2 if warmup else s.draft_steps
    gen_settings = generation.GenerationSettings(
        steps=ddim, draft_steps=draft_steps, null_text=NullTextSettings(inner_steps=inner)
    )

    if stage == "mask":
        config = training.TrainConfig(resolution=res, seed=s.seed)

        def stencil() -> Any:
            shared.data = training.prepare_training_data(pipe, work.photos, work.captions, PHRASE, config)

        def reference() -> Any:
            shared.reference_data = ref.reference_masks(
                pipe, work.photos, work.captions, PHRASE, resolution=res, seed=s.seed
            )

    elif stage == "train":
        config = training.TrainConfig(
            steps=steps,
            batch_size=s.batch_size,
            resolution=res,
            seed=s.seed,
            precision=work.train_precision,
        )

        def stencil() -> Any:
            return training.train_unet(pipe.unet, pipe.scheduler, shared.data, config)

        def reference() -> Any:
            return ref.reference_train(
                pipe, shared.reference_data, steps=steps, batch_size=s.batch_size, seed=s.seed
            )

        def plain_loop() -> Any:
            data = shared.data
            return plain.plain_train(
                pipe.unet,
                pipe.scheduler,
                data.latents,
                data.embeddings,
                data.masks,
                steps=steps,
                batch_size=s.batch_size,
                seed=s.seed,
            )

        return {"stencil": stencil, "reference": reference, "plain": plain_loop}

    elif stage == "draft":

        def stencil() -> Any:
            (shared.draft,) = generation.render_drafts(
                work.context, DRAFT_PROMPT, resolution=res, seeds=[s.seed], steps=draft_steps
            )

        def reference() -> Any:
            return ref.reference_draft(
                work.context, DRAFT_PROMPT, resolution=res, seed=s.seed, steps=draft_steps
            )

    elif stage == "inversion":

        def stencil() -> Any:
            (shared.inversion,) = generation.invert_images(
                pipe, [shared.draft], PROMPT, gen_settings, resolution=res, taus=[s.tau]
            )

        def reference() -> Any:
            shared.reference_inversion = ref.reference_invert(
                pipe, shared.draft, PROMPT, resolution=res, steps=ddim, inner_steps=inner
            )

    elif stage == "denoise":

        def stencil() -> Any:
            return generation.guided_images(pipe, [shared.inversion], PROMPT, [s.tau], gen_settings)[0][0]

        def reference() -> Any:
            return ref.reference_denoise(pipe, shared.reference_inversion, PROMPT, tau=s.tau, steps=ddim)

    else:
        raise ValueError(f"unknown stage {stage!r}")
    return {"stencil": stencil, "reference": reference}


def prepare(stage: str, path: str, work: Workload) -> None:
    """Untimed set-up before a call: only the stage's pipeline on the device, weights and dtype as
    `stencil train` / `stencil gen` (or the reference) would have them."""
    if work.device.type != "cpu" and work.context is not None:
        (work.subject if stage == "draft" else work.context).to("cpu")
        gc.collect()
        torch.cuda.empty_cache()
        (work.context if stage == "draft" else work.subject).to(work.device)
    if stage == "draft":  # the authors' context model is float16 on CUDA (models/support_model.py 17-19)
        reference_dtype = torch.float16 if work.device.type == "cuda" else torch.float32
        # Casting back and forth rounds the context weights to the draft dtype's precision after stencil's
        # first draft: the same shapes and the same work for the reference (its speed is what is measured).
        to_dtype(work.context, work.draft_dtype if path == "stencil" else reference_dtype)
    elif stage in ("inversion", "denoise"):
        restore(work, work.subject_dtype if path == "stencil" else torch.float32)
    else:  # mask pass and training: fp32 weights (training autocasts on CUDA)
        restore(work)


DEPENDS = {"train": ("mask",), "inversion": ("draft",), "denoise": ("draft", "inversion")}


def run_benchmark(
    work: Workload, s: Settings, stages: list[str], repeat: int, warmup: bool
) -> dict[str, Any]:
    """Warm up, then time every stage `repeat` times, alternating which path goes first.

    Stages a chosen stage depends on (training needs the masks, denoising the inversion) run untimed.
    """
    shared = Shared()
    results = {stage: StageResult(authors=authors_counts(stage, s, len(work.photos))) for stage in stages}
    counter = PassCounter()
    counter.attach(work.subject.unet, "unet")
    if work.context is not None:
        counter.attach(work.context.transformer, "context")
    wanted = set(stages) | {d for stage in stages for d in DEPENDS.get(stage, ())}
    needed = [stage for stage in STAGES if stage in wanted]
    if warmup:
        for stage in needed:
            for path, call in stage_calls(stage, work, s, shared, warmup=True).items():
                prepare(stage, path, work)
                call()
    for r in range(repeat):
        for stage in needed:
            calls = stage_calls(stage, work, s, shared, warmup=False)
            if stage not in stages:
                if r == 0:
                    for path in ("stencil", "reference"):
                        prepare(stage, path, work)
                        calls[path]()
                continue
            paths = list(calls)
            for path in paths if r % 2 == 0 else paths[::-1]:
                prepare(stage, path, work)
                run, _ = timed(calls[path], work.device, counter)
                getattr(results[stage], path).append(run)
    return {stage: results[stage].summary() for stage in stages}


# -- reporting -----------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """A short name for the device (GPU model, or CPU model and core count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


LABELS = {
    "mask": "mask pass",
    "train": "{steps} training steps",
    "draft": "draft",
    "inversion": "inversion",
    "denoise": "denoise",
    "total": "end to end",
    "per_image": "one image (draft + inversion + denoise)",
}


def with_total(stages: dict[str, Any]) -> dict[str, Any]:
    """Add the end-to-end row (sums of the medians; the largest peak)."""
    if len(stages) < 2:
        return stages
    s = sum(v["stencil_s"] for v in stages.values())
    r = sum(v["reference_s"] for v in stages.values())
    total = {
        "stencil_s": round(s, 4),
        "reference_s": round(r, 4),
        "ratio": round(r / s, 3) if s > 0 else None,
    }
    for key in ("stencil_cpu_s", "reference_cpu_s"):
        total[key] = round(sum(v[key] for v in stages.values()), 4)
    for key in ("stencil_peak_mb", "reference_peak_mb", "stencil_extra_mb", "reference_extra_mb"):
        total[key] = max(v[key] for v in stages.values())
    total.update(summed_counts(list(stages.values())))
    return {**stages, "total": total}


def summed_counts(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """The pass counts of `rows` added up, per path."""
    return {
        path: {key: sum(row[path][key] for row in rows) for key in (*COUNT_KEYS, "unet_pass_equivalents")}
        for path in ("stencil", "reference", "authors")
    }


IMAGE_STAGES = ("draft", "inversion", "denoise")


def per_image(stages: dict[str, Any]) -> dict[str, Any] | None:
    """One context-guided image (draft + inversion + denoise): seconds, the speed-up over the reference (its
    median of per-run sums), pass counts and the subject-UNet work of the authors' pipeline over stencil's."""
    if not all(stage in stages for stage in IMAGE_STAGES):
        return None
    rows = [stages[stage] for stage in IMAGE_STAGES]
    runs = {
        path: [sum(values) for values in zip(*(row[f"{path}_runs_s"] for row in rows), strict=True)]
        for path in ("stencil", "reference")
    }
    s, r = (float(statistics.median(runs[path])) for path in ("stencil", "reference"))
    counts = summed_counts(rows)
    mine = counts["stencil"]["unet_pass_equivalents"]
    return {
        "stencil_s": round(s, 4),
        "reference_s": round(r, 4),
        "ratio": round(r / s, 3) if s > 0 else None,
        "stencil_runs_s": [round(x, 4) for x in runs["stencil"]],
        "reference_runs_s": [round(x, 4) for x in runs["reference"]],
        **counts,
        "unet_work_authors_over_stencil": round(counts["authors"]["unet_pass_equivalents"] / mine, 2)
        if mine
        else None,
        "unet_work_reference_over_stencil": round(counts["reference"]["unet_pass_equivalents"] / mine, 2)
        if mine
        else None,
    }


def seconds(value: float) -> str:
    """Seconds with three significant digits at least (0.0237, 2.47, 13.8)."""
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def table(report: dict[str, Any]) -> str:
    """A Markdown table of the report."""
    cuda = report["device"].startswith("cuda")
    memory = "peak GPU memory" if cuda else "peak RSS (growth)"
    key = "peak_mb"
    lines = [
        f"| stage | stencil s | reference s | ratio (ref/stencil) | stencil {memory} | reference {memory} "
        "| UNet fwd / bwd: stencil | reference | authors "
        "| UNet pass-equivalents: stencil / reference / authors "
        "| context fwd: stencil / reference / authors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = dict(report["stages"])
    if report.get("per_image"):
        rows["per_image"] = report["per_image"]
    for stage, row in rows.items():
        label = LABELS[stage].format(steps=report["settings"]["steps"])
        paths = ("stencil", "reference", "authors")
        work = " | ".join(f"{row[p]['unet_forward']} / {row[p]['unet_backward']}" for p in paths)
        equivalents = " / ".join(str(row[p]["unet_pass_equivalents"]) for p in paths)
        context = " / ".join(str(row[p]["context_forward"]) for p in paths)
        memory_cells = (
            " | ".join(
                f"{row[p + '_' + key]:.0f} MiB" + ("" if cuda else f" (+{row[p + '_extra_mb']:.0f})")
                for p in ("stencil", "reference")
            )
            if "stencil_" + key in row
            else "n/a | n/a"
        )
        lines.append(
            f"| {label} | {seconds(row['stencil_s'])} | {seconds(row['reference_s'])} | {row['ratio']:.2f}x "
            f"| {memory_cells} | {work} | {equivalents} | {context} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse options, run, print the table (or the JSON object); returns the report."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default: cpu)")
    parser.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--photos", type=int, default=4)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--inner-steps", type=int, default=10, help="null-text iterations per step")
    parser.add_argument("--draft-steps", type=int, default=50)
    parser.add_argument("--stages", default=",".join(STAGES), help="comma list of " + ", ".join(STAGES))
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per path; medians are reported")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up calls")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-t5", action="store_true", help="full preset: SD3 without its T5 encoder")
    parser.add_argument("--resolution", type=int, default=None, help="image size (default: the model's)")
    parser.add_argument(
        "--models",
        nargs=2,
        metavar=("SUBJECT", "CONTEXT"),
        default=None,
        help="load the two models from saved folders instead of building them (e.g. /work/fullsize/sd15 "
        "/work/fullsize/sd3-medium-no-t5)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)

    stages = [x.strip() for x in args.stages.split(",") if x.strip()]
    unknown = [x for x in stages if x not in STAGES]
    if unknown or not stages:
        parser.error(f"unknown stage(s) {unknown}: use {', '.join(STAGES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = models.resolve_device(args.device)
    settings = Settings(
        steps=args.steps,
        batch_size=args.batch_size,
        ddim_steps=args.ddim_steps,
        inner_steps=args.inner_steps,
        draft_steps=args.draft_steps,
    )
    started = time.perf_counter()
    if args.resolution is not None and (args.resolution < 64 or args.resolution % 64):
        parser.error(f"--resolution must be a multiple of 64, at least 64 (got {args.resolution})")
    work = build_workload(
        args.preset,
        device,
        args.photos,
        args.no_t5,
        resolution=args.resolution,
        folders=tuple(args.models) if args.models else None,
        with_context=bool({"draft", "inversion", "denoise"} & set(stages)),
    )
    load = ""
    with contextlib.suppress(OSError):
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results = run_benchmark(work, settings, stages, max(1, args.repeat), not args.no_warmup)
    report = {
        "preset": args.preset,
        "device": str(device),
        "machine": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "repeat": max(1, args.repeat),
        "load_average_at_start": load,
        "load_average_at_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "settings": {
            **settings.__dict__,
            "photos": args.photos,
            "resolution": work.resolution,
            "stencil_train_precision": work.train_precision,
            "stencil_draft_dtype": str(work.draft_dtype),
            "stencil_subject_dtype": str(work.subject_dtype),
        },
        "stages": with_total(results),
        "per_image": per_image(results),
        "counting": (
            "model passes counted by forward hooks during the timed call (a batch of B counts B; a backward "
            "through a call's output counts B); authors: computed from their settings without early stop "
            "(an upper bound); unet_pass_equivalents = forward + 2 x backward"
        ),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"# {args.preset} preset on {report['machine']} ({report['date']}, torch {torch.__version__}, "
            f"median of {report['repeat']}, load {load})"
        )
        print(table(report))
        train = report["stages"].get("train", {})
        if "plain_s" in train:
            print(
                f"\nplain PyTorch training loop: {seconds(train['plain_s'])} s, peak "
                f"{train['plain_peak_mb']:.0f} MiB; stencil is {train['plain_ratio']:.2f}x its speed"
            )
        if report["per_image"]:
            image = report["per_image"]
            print(
                f"\nper image: {image['ratio']:.2f}x faster than the reference; subject-UNet work "
                f"{image['unet_work_authors_over_stencil']}x less than the authors' pipeline (upper bound), "
                f"{image['unet_work_reference_over_stencil']}x less than the reference"
            )
    return report


if __name__ == "__main__":
    main()
