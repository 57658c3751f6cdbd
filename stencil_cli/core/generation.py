"""Context Guidance (METHOD.md section 3): draft -> null-text inversion -> guided denoise; plain generation.

Pipeline style: the loops are written out, pipelines and schedulers are passed in. This module never touches
the store and never prints; callers pass a progress hook that gets `base.events` values (`Step` per stage).

Stages, each over a batch of seeds (a single image is a batch of one):

1. ``render_drafts``: the context model renders the draft prompt at the subject model's resolution.
2. ``invert_images``: VAE-encode the drafts with the subject pipeline, DDIM-invert them under the prompt and
   optimise the null embeddings (``inversion.py``), in float32.
3. ``guided_images`` (``denoise``): from the inverted latents, the optimised null embeddings for the first
   ``injected_steps(tau)`` steps, then plain classifier-free guidance with the empty-prompt embedding.

``iter_context_guidance`` runs 2 and 3 over batches of drafts and yields each sample as its batch finishes.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image

from stencil_cli.base.errors import StencilError
from stencil_cli.base.events import Progress, Step, no_progress
from stencil_cli.base.images import center_crop_resize
from stencil_cli.core.inversion import (
    InversionResult,
    NullTextSettings,
    ddim_step,
    encode_prompt,
    guided_noise,
    invert,
)
from stencil_cli.models import native_resolution

TRAIN_TIMESTEPS = 1000
# -- settings and results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings:
    """Knobs of one generation (defaults: METHOD.md section 3)."""

    steps: int = 50
    guidance: float = 7.5
    inversion: Literal["nti", "npi"] = "nti"
    null_text: NullTextSettings = field(default_factory=NullTextSettings)
    draft_steps: int = 50
    draft_guidance: float = 7.5
    # replaces the empty uncond embedding after the injected steps (and in plain generation); "" = none
    negative: str = ""

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= TRAIN_TIMESTEPS:
            raise ValueError(f"steps must be in [1, {TRAIN_TIMESTEPS}] (got {self.steps})")
        if self.inversion not in ("nti", "npi"):
            raise ValueError(f"inversion must be nti or npi (got {self.inversion!r})")


def injected_steps(tau: float, steps: int, train_timesteps: int = TRAIN_TIMESTEPS) -> int:
    """How many of the first denoising steps use the optimised null embeddings.

    Paper eq. 5: inject while ``tau > T - t``, with ``t`` the step's start on the training grid
    (``T - i * stride`` for step ``i``). So step ``i`` is injected when ``tau > i * stride``: tau 60 with 50
    steps (stride 20) gives the first 3 steps, tau 0 none, tau 1000 all of them.
    """
    if not 0 <= tau <= train_timesteps:
        raise ValueError(f"tau must be in [0, {train_timesteps}] (got {tau})")
    stride = train_timesteps // steps  # DDIMScheduler's integer stride (leading spacing)
    return min(steps, math.ceil(tau / stride)) if tau > 0 else 0


def tau_groups(taus: list[float], steps: int) -> list[tuple[int, list[float]]]:
    """The taus that inject the same number of steps at `steps` (so they render the same image), as
    (injected steps, [taus in the given order]) for every count shared by two or more distinct taus.

    E.g. tau 20 and 60 at 10 steps (stride 100) both inject the first step: ``[(1, [20.0, 60.0])]``.
    """
    by_count: dict[int, list[float]] = {}
    for tau in taus:
        values = by_count.setdefault(injected_steps(tau, steps), [])
        if float(tau) not in values:
            values.append(float(tau))
    return [(count, values) for count, values in by_count.items() if len(values) > 1]


def null_text_steps(taus: Sequence[float], steps: int) -> int:
    """K: how many steps (from the noisiest) null-text optimisation must run so that every tau in `taus` finds
    its injected embeddings: the largest ``injected_steps(tau, steps)`` (0 for no taus or only tau 0).

    Step i's embedding depends only on steps 0..i, so optimising the first K steps gives exactly the same
    embeddings for them as optimising all `steps`."""
    return max((injected_steps(tau, steps) for tau in taus), default=0)


def chunks(items: Sequence[Any], size: int | None) -> list[list[Any]]:
    """`items` in consecutive batches of at most `size` (None or 0: one batch of everything)."""
    if size is not None and size < 0:
        raise ValueError(f"batch size must be at least 1 (got {size})")
    items = list(items)
    size = size or max(1, len(items))
    return [items[k : k + size] for k in range(0, len(items), size)]


# -- the subject pipeline's pieces ---------------------------------------------------------------------


def ddim_scheduler(pipe: Any, steps: int) -> Any:
    """The pipeline's scheduler as a DDIMScheduler (same config), with `steps` timesteps set."""
    from diffusers import DDIMScheduler  # here: planning a generation imports this module, not diffusers

    scheduler = pipe.scheduler
    if not isinstance(scheduler, DDIMScheduler):
        scheduler = DDIMScheduler.from_config(scheduler.config)
        pipe.scheduler = scheduler
    scheduler.set_timesteps(steps)
    return scheduler


def pipe_device(pipe: Any) -> torch.device:
    """The device the pipeline's UNet (or transformer) lives on."""
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    return next(model.parameters()).device


@torch.no_grad()
def encode_image(pipe: Any, image: Image.Image, resolution: int) -> torch.Tensor:
    """VAE-encode `image` (centre-cropped to `resolution`) to a float32 latent (posterior mean, scaled)."""
    image = center_crop_resize(image.convert("RGB"), resolution)
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(image, height=resolution, width=resolution)
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    latent = vae.encode(pixels).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latent - shift) * vae.config.scaling_factor).float()


@torch.no_grad()
def decode_latent(pipe: Any, latent: torch.Tensor) -> Image.Image:
    """Decode a latent with the pipeline's VAE into a PIL image; a non-finite latent is refused (it would
    decode to a black or noise image that looks like a result)."""
    if not bool(torch.isfinite(latent).all()):
        raise StencilError(
            "rendering produced non-finite values (NaN or infinity), so no image was saved",
            hint="the inversion or the fine-tuned weights diverged: try a lower {null_lr}, "
            "{inversion=npi}, or train again",
            fields=("null_lr", "inversion"),
        )
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    pixels = vae.decode((latent / vae.config.scaling_factor + shift).to(vae.dtype)).sample
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")[0]


@contextmanager
def float32_unet(unet: Any) -> Iterator[Any]:
    """Run the UNet in float32 inside the block (null-text optimisation), then restore its dtype.

    On CUDA, float32 matmuls may use TF32 tensor cores inside the block (cuDNN convolutions already do by
    PyTorch's default): storage, the optimised embedding, the latents and the loss stay float32.
    """
    dtype = unet.dtype
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    if dtype != torch.float32:
        unet.to(torch.float32)
    if unet.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield unet
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        if dtype != torch.float32:
            unet.to(dtype)


# -- the three stages -----------------------------------------------------------------------------------


def render_drafts(
    context_pipe: Any,
    prompt: str,
    *,
    resolution: int,
    seeds: Sequence[int],
    steps: int = 50,
    guidance: float = 7.5,
    batch_size: int | None = None,
    progress: Progress = no_progress,
    negative: str = "",
) -> list[Image.Image]:
    """Render one draft per seed with the context model (any diffusers text-to-image pipeline) at
    `resolution`, as batches of at most `batch_size` (None: all) in one pipeline call each.

    Each sample draws its starting noise from its own CPU generator seeded with its seed, so a draft is the
    one a batch of that seed alone gives (within float tolerance of the batched model call). The progress
    hook gets each denoising step once per batch, as a `Step` whose `samples` is the batch's size."""
    images: list[Image.Image] = []
    if hasattr(context_pipe, "set_progress_bar_config"):
        context_pipe.set_progress_bar_config(disable=True)
    takes_callback = "callback_on_step_end" in inspect.signature(context_pipe.__call__).parameters
    for batch in chunks(seeds, batch_size):
        kwargs: dict[str, Any] = {
            "prompt": prompt,
            "height": resolution,
            "width": resolution,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "generator": [torch.Generator("cpu").manual_seed(seed) for seed in batch],
            "num_images_per_prompt": len(batch),
            "output_type": "pil",
        }
        if negative:
            kwargs["negative_prompt"] = negative
        if takes_callback:

            def on_step(
                pipe: Any, i: int, t: Any, tensors: dict[str, Any], samples: int = len(batch)
            ) -> dict[str, Any]:
                progress(Step("draft", i + 1, steps, samples=samples))
                return tensors

            kwargs["callback_on_step_end"] = on_step
        with torch.inference_mode():  # no autograd bookkeeping at all (the pipeline itself only uses no_grad)
            rendered = context_pipe(**kwargs).images
        for image in rendered:
            if image.size != (resolution, resolution):
                image = center_crop_resize(image, resolution)
            images.append(image.convert("RGB"))
    return images


def invert_images(
    pipe: Any,
    images: Sequence[Image.Image],
    prompt: str,
    settings: GenerationSettings = GenerationSettings(),
    *,
    resolution: int | None = None,
    taus: Sequence[float] | None = None,
    progress: Progress = no_progress,
) -> list[InversionResult]:
    """VAE-encode `images` and invert them with the subject model (nti or npi) as one batch, in float32
    (each its own null embeddings and early stop); one result per image.

    With `taus`, null-text optimisation runs only for the first ``null_text_steps(taus, steps)`` steps (the
    ones those taus inject; none for tau 0); without, for every step. The DDIM inversion always runs fully."""
    resolution = resolution or native_resolution(pipe)
    scheduler = ddim_scheduler(pipe, settings.steps)
    latents = torch.cat([encode_image(pipe, image, resolution) for image in images])
    device = pipe_device(pipe)
    cond = encode_prompt(pipe, prompt, device).float()
    empty = encode_prompt(pipe, "", device).float()
    null_text = NullTextSettings(
        guidance=settings.guidance,
        inner_steps=settings.null_text.inner_steps,
        lr=settings.null_text.lr,
        early_stop=settings.null_text.early_stop,
        early_stop_slope=settings.null_text.early_stop_slope,
    )
    optimize = None if taus is None else null_text_steps(taus, settings.steps)
    with float32_unet(pipe.unet) as unet:
        return invert(
            unet,
            scheduler,
            latents,
            cond,
            empty,
            method=settings.inversion,
            settings=null_text,
            optimize_steps=optimize,
            progress=progress,
        )


@torch.inference_mode()  # its latents only go to the VAE decoder, never into autograd
def denoise(
    unet: Any,
    scheduler: Any,
    latent: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    guidance: float = 7.5,
    null_embeddings: list[torch.Tensor] | None = None,
    inject: int = 0,
    progress: Progress = no_progress,
) -> torch.Tensor:
    """DDIM-denoise `latent` with CFG; the first `inject` steps use `null_embeddings[i]` as the uncond."""
    timesteps = [int(t) for t in scheduler.timesteps]
    if inject and (null_embeddings is None or len(null_embeddings) < inject):
        raise ValueError("need a null embedding for every injected step")
    latent = latent.float()
    for i, t in enumerate(timesteps):
        negative = null_embeddings[i] if i < inject and null_embeddings is not None else uncond
        noise = guided_noise(unet, latent, t, cond, negative, guidance)
        latent = ddim_step(scheduler, noise, t, latent)
        progress(Step("denoise", i + 1, len(timesteps), samples=latent.shape[0]))
    return latent


def guided_images(
    pipe: Any,
    inversions: Sequence[InversionResult],
    prompt: str,
    taus: Sequence[float],
    settings: GenerationSettings = GenerationSettings(),
    *,
    progress: Progress = no_progress,
) -> list[list[Image.Image]]:
    """Denoise N inverted latents together, once per tau, each with its own null embeddings (the draft and
    inversion are shared by the taus).

    Returns, per inversion, one image per tau. Raises ValueError when a tau injects more steps than an
    inversion has null embeddings for (its null-text optimisation was truncated for smaller taus)."""
    scheduler = ddim_scheduler(pipe, settings.steps)
    device = pipe_device(pipe)
    n = len(inversions)
    cond = encode_prompt(pipe, prompt, device)
    empty = encode_prompt(pipe, settings.negative, device)  # the optimised null embeddings win while injected
    if n > 1:
        cond, empty = cond.expand(n, *cond.shape[1:]), empty.expand(n, *empty.shape[1:])
    latents = torch.cat([inv.latent for inv in inversions]).to(device)
    images: list[list[Image.Image]] = [[] for _ in inversions]
    for tau in taus:
        inject = injected_steps(tau, settings.steps)
        available = min(len(inv.null_embeddings) for inv in inversions)
        if inject > available:
            raise ValueError(
                f"tau {tau:g} injects {inject} steps but the inversion has null embeddings for {available}: "
                "invert with this tau among its taus"
            )
        nulls = [torch.cat([inv.null_embeddings[i] for inv in inversions]).to(device) for i in range(inject)]
        latent = denoise(
            pipe.unet,
            scheduler,
            latents,
            cond,
            empty,
            guidance=settings.guidance,
            null_embeddings=nulls,
            inject=inject,
            progress=progress,
        )
        for row in range(n):
            images[row].append(decode_latent(pipe, latent[row : row + 1]))
    return images


@dataclass
class GuidedSample:
    """One draft's Context Guidance result: an image per tau, its inversion, and its share of the time."""

    images: list[Image.Image]
    inversion: InversionResult
    # seconds, this sample's share of its batch: inversion (DDIM + null-text), denoise (per image)
    timings: dict[str, float]
    batch: int  # how many drafts were inverted and denoised together with this one


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def iter_context_guidance(
    pipe: Any,
    drafts: Sequence[Image.Image],
    prompt: str,
    taus: Sequence[float],
    settings: GenerationSettings = GenerationSettings(),
    *,
    resolution: int | None = None,
    batch_size: int | None = None,
    progress: Progress = no_progress,
) -> Iterator[tuple[int, GuidedSample]]:
    """Invert and denoise `drafts` in batches of at most `batch_size` (None: all at once); yields
    ``(index into drafts, GuidedSample)`` as each batch finishes, so a caller can save images as they come.

    Null-text optimisation runs only for the steps the taus inject (``null_text_steps``)."""
    device = pipe_device(pipe)
    start = 0
    for batch in chunks(drafts, batch_size):
        started = _clock(device)
        inverted = invert_images(
            pipe, batch, prompt, settings, resolution=resolution, taus=taus, progress=progress
        )
        middle = _clock(device)
        images = guided_images(pipe, inverted, prompt, taus, settings, progress=progress)
        finished = _clock(device)
        n = len(batch)
        timings = {
            "inversion": (middle - started) / n,
            "denoise": (finished - middle) / (n * max(1, len(taus))),
        }
        for row in range(n):
            yield start + row, GuidedSample(images[row], inverted[row], dict(timings), n)
        start += n


def initial_noise(pipe: Any, seed: int, resolution: int | None = None) -> torch.Tensor:
    """Seeded starting noise for plain generation (drawn on the CPU, then moved to the pipeline's device)."""
    resolution = resolution or native_resolution(pipe)
    size = resolution // int(pipe.vae_scale_factor)
    shape = (1, int(pipe.unet.config.in_channels), size, size)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    return noise.to(pipe_device(pipe))


def plain_generate(
    pipe: Any,
    prompt: str,
    seed: int,
    settings: GenerationSettings = GenerationSettings(),
    *,
    resolution: int | None = None,
    progress: Progress = no_progress,
) -> Image.Image:
    """Plain text-to-image with the fine-tuned subject model (no draft, no inversion)."""
    scheduler = ddim_scheduler(pipe, settings.steps)
    device = pipe_device(pipe)
    latent = initial_noise(pipe, seed, resolution) * scheduler.init_noise_sigma
    latent = denoise(
        pipe.unet,
        scheduler,
        latent,
        encode_prompt(pipe, prompt, device),
        encode_prompt(pipe, settings.negative, device),
        guidance=settings.guidance,
        progress=progress,
    )
    return decode_latent(pipe, latent)


# -- plain generation, one image at a time (the verb saves each as it arrives) -----------------------


def plain_images(
    pipe: Any,
    wanted: list[tuple[Any, str, int]],
    settings: GenerationSettings = GenerationSettings(),
    *,
    resolution: int,
    progress: Progress = no_progress,
) -> Iterator[tuple[Any, Image.Image, float]]:
    """Plain generation of each (key, prompt, seed): yields (key, image, seconds) as each is done."""
    device = pipe_device(pipe)
    for key, prompt, seed in wanted:
        started = _clock(device)
        image = plain_generate(pipe, prompt, seed, settings, resolution=resolution, progress=progress)
        yield key, image, _clock(device) - started
