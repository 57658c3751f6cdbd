"""Context Guidance (METHOD.md section 3): draft -> null-text inversion -> guided denoise; plain generation.

Pipeline style: the loops are written out, pipelines and schedulers are passed in. This module never touches
the store and never prints; callers pass a progress hook ``(stage, step, total, extra)``.

Stages:

1. ``render_draft``: the context model renders the draft prompt at the subject model's resolution.
2. ``invert_image``: VAE-encode the draft with the subject pipeline, DDIM-invert it under the prompt and
   optimise the null embeddings (``inversion.py``), in float32.
3. ``denoise``: from the inverted latent, the optimised null embeddings for the first ``injected_steps(tau)``
   steps, then plain classifier-free guidance with the empty-prompt embedding.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from stencil_cli.images import center_crop_resize
from stencil_cli.inversion import (
    InversionResult,
    NullTextSettings,
    ProgressHook,
    ddim_step,
    encode_prompt,
    guided_noise,
    invert,
    no_progress,
)
from stencil_cli.models import native_resolution

TRAIN_TIMESTEPS = 1000
PLACEHOLDERS = ("{subject}", "{}")
ARTICLES = ("a", "an", "the")
# words after which a description's own article is dropped ("another {}" -> "another corgi")
DETERMINER_BEFORE = re.compile(
    r"\b(?:another|my|your|his|her|its|our|their|this|that|these|those|each|every|one|no|some)\s+$",
    re.IGNORECASE,
)


# -- prompts ------------------------------------------------------------------------------------------


def _article(words: str) -> str:
    return "an" if words[:1].lower() in "aeiou" and words[:1] else "a"


def _with_article(words: str) -> str:
    """`words` with an indefinite article in front unless it already starts with an article."""
    first = words.split(maxsplit=1)[0].lower() if words.split() else ""
    return words if first in ARTICLES else f"{_article(words)} {words}"


def _substitute(text: str, pattern: str, replacement: str) -> str:
    """Replace `pattern` (regex) in `text`, absorbing a preceding article when `replacement` has its own."""
    has_article = replacement.split(maxsplit=1)[0].lower() in ARTICLES if replacement.split() else False

    def repl(match: re.Match[str]) -> str:
        article = match.group("article")
        if article and has_article:
            return replacement
        if not article and has_article and DETERMINER_BEFORE.search(match.string[: match.start()]):
            return replacement.split(maxsplit=1)[1] if len(replacement.split()) > 1 else replacement
        if article:
            fixed = _article(replacement) if article.lower() in ("a", "an") else article
            if article[:1].isupper():
                fixed = fixed.capitalize()
            return f"{fixed}{match.group('space')}{replacement}"
        return replacement

    regex = re.compile(rf"(?:(?P<article>\b(?:a|an|the|A|An|The))(?P<space>\s+))?{pattern}")
    return regex.sub(repl, text)


@dataclass(frozen=True)
class Prompts:
    """The subject prompt (for the fine-tuned model) and the draft prompt (for the context model)."""

    prompt: str
    draft_prompt: str


def build_prompts(user_prompt: str, phrase: str, description: str | None = None) -> Prompts:
    """Apply the prompt rules: placeholders, or the subject phrase, or prefix "a {phrase}".

    ``{}`` / ``{subject}`` become the phrase (draft: the description); a prompt that already names the phrase
    is kept (draft: the phrase replaced by the description); otherwise the prompt becomes
    ``"a {phrase} {prompt}"``. Raises ValueError for an empty prompt or phrase.
    """
    text = " ".join(user_prompt.split())
    phrase = " ".join((phrase or "").split())
    if not text:
        raise ValueError("the prompt is empty")
    if not phrase:
        raise ValueError("the subject phrase is empty")
    description = " ".join((description or "").split()) or phrase
    placeholder = "|".join(re.escape(p) for p in PLACEHOLDERS)
    if re.search(placeholder, text):
        return Prompts(
            prompt=_substitute(text, f"(?:{placeholder})", phrase),
            draft_prompt=_substitute(text, f"(?:{placeholder})", description),
        )
    phrase_pattern = rf"\b{re.escape(phrase)}\b"
    if re.search(phrase_pattern, text, flags=re.IGNORECASE):
        return Prompts(
            prompt=text,
            draft_prompt=_substitute(text, f"(?i:{phrase_pattern})", description),
        )
    return Prompts(
        prompt=f"{_with_article(phrase)} {text}", draft_prompt=f"{_with_article(description)} {text}"
    )


# -- settings and results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings:
    """Knobs of one generation (defaults: METHOD.md section 3)."""

    steps: int = 50
    guidance: float = 7.5
    inversion: str = "nti"  # nti | npi
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


# -- the subject pipeline's pieces ---------------------------------------------------------------------


def ddim_scheduler(pipe: Any, steps: int) -> Any:
    """The pipeline's scheduler as a DDIMScheduler (same config), with `steps` timesteps set."""
    from diffusers import DDIMScheduler

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
    """Decode a latent with the pipeline's VAE into a PIL image."""
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


def render_draft(
    context_pipe: Any,
    prompt: str,
    *,
    resolution: int,
    seed: int,
    steps: int = 50,
    guidance: float = 7.5,
    progress: ProgressHook = no_progress,
    negative: str = "",
) -> Image.Image:
    """Render the draft with the context model (any diffusers text-to-image pipeline) at `resolution`."""
    generator = torch.Generator("cpu").manual_seed(seed)
    kwargs: dict[str, Any] = {
        "prompt": prompt,
        "height": resolution,
        "width": resolution,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "generator": generator,
        "output_type": "pil",
    }
    if negative:
        kwargs["negative_prompt"] = negative
    if "callback_on_step_end" in inspect.signature(context_pipe.__call__).parameters:

        def on_step(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            progress("draft", i + 1, steps, {})
            return tensors

        kwargs["callback_on_step_end"] = on_step
    if hasattr(context_pipe, "set_progress_bar_config"):
        context_pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():  # no autograd bookkeeping at all (the pipeline itself only uses no_grad)
        image = context_pipe(**kwargs).images[0]
    if image.size != (resolution, resolution):
        image = center_crop_resize(image, resolution)
    return image.convert("RGB")


def invert_image(
    pipe: Any,
    image: Image.Image,
    prompt: str,
    settings: GenerationSettings = GenerationSettings(),
    *,
    resolution: int | None = None,
    progress: ProgressHook = no_progress,
) -> InversionResult:
    """VAE-encode `image` and invert it with the subject model (nti or npi), in float32."""
    resolution = resolution or native_resolution(pipe)
    scheduler = ddim_scheduler(pipe, settings.steps)
    latent = encode_image(pipe, image, resolution)
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
    with float32_unet(pipe.unet) as unet:
        return invert(
            unet,
            scheduler,
            latent,
            cond,
            empty,
            method=settings.inversion,
            settings=null_text,
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
    progress: ProgressHook = no_progress,
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
        progress("denoise", i + 1, len(timesteps), {"injected": i < inject})
    return latent


def guided_images(
    pipe: Any,
    inversion: InversionResult,
    prompt: str,
    taus: list[float],
    settings: GenerationSettings = GenerationSettings(),
    *,
    progress: ProgressHook = no_progress,
) -> list[Image.Image]:
    """Denoise one inverted latent once per tau (the draft and inversion are shared); one image each."""
    scheduler = ddim_scheduler(pipe, settings.steps)
    device = pipe_device(pipe)
    cond = encode_prompt(pipe, prompt, device)
    empty = encode_prompt(pipe, settings.negative, device)  # the optimised null embeddings win while injected
    images = []
    for tau in taus:
        inject = injected_steps(tau, settings.steps)
        latent = denoise(
            pipe.unet,
            scheduler,
            inversion.latent.to(device),
            cond,
            empty,
            guidance=settings.guidance,
            null_embeddings=[n.to(device) for n in inversion.null_embeddings],
            inject=inject,
            progress=progress,
        )
        images.append(decode_latent(pipe, latent))
    return images


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
    progress: ProgressHook = no_progress,
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


# -- contact sheet ----------------------------------------------------------------------------------------


def contact_sheet(rows: list[list[tuple[str, Image.Image]]], cell: int | None = None) -> Image.Image:
    """A grid image: one row per list of (label, image), labels drawn under each cell."""
    from PIL import ImageDraw

    cell = cell or max(128, *(image.width for row in rows for _, image in row))
    label_h = 14
    columns = max(len(row) for row in rows)
    sheet = Image.new("RGB", (columns * cell, len(rows) * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        for c, (label, image) in enumerate(row):
            x, y = c * cell, r * (cell + label_h)
            resample = Image.Resampling.NEAREST if image.width < cell else Image.Resampling.LANCZOS
            sheet.paste(image.convert("RGB").resize((cell, cell), resample), (x, y))
            draw.text((x + 2, y + cell + 1), label, fill="black")
    return sheet


# -- whole stages, one result at a time (the verb saves each as it arrives) ------------------------------


def _clock(device: Any) -> float:
    """`time.perf_counter()` after the device's queued work is done (CUDA runs asynchronously)."""
    import time

    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


@dataclass
class Draft:
    """One rendered draft: the caller's key, the picture and how long it took."""

    key: Any
    image: Image.Image
    seconds: float


def render_drafts(
    context_pipe: Any,
    wanted: list[tuple[Any, str, int]],
    *,
    resolution: int,
    steps: int = 50,
    guidance: float = 7.5,
    progress: ProgressHook = no_progress,
    negative: str = "",
) -> Iterator[Draft]:
    """Render each (key, draft prompt, seed) with the context model, yielding every draft when it is done.

    The progress hook gets every draft step, also from a pipeline without step callbacks.
    """
    device = pipe_device(context_pipe)
    for key, prompt, seed in wanted:
        reported = 0

        def counting(stage: str, step: int, total: int | None, extra: dict[str, Any]) -> None:
            nonlocal reported
            reported += 1
            progress(stage, step, total, extra)

        started = _clock(device)
        image = render_draft(
            context_pipe,
            prompt,
            resolution=resolution,
            seed=seed,
            steps=steps,
            guidance=guidance,
            progress=counting,
            negative=negative,
        )
        seconds = _clock(device) - started
        if reported < steps:  # a pipeline without step callbacks
            progress("draft", steps, steps, {"advance": steps - reported})
        yield Draft(key, image, seconds)


@dataclass
class GuidedImage:
    """One image of Context Guidance: the caller's key, its tau, the picture and how it was made."""

    key: Any
    tau: float
    image: Image.Image
    inversion: InversionResult
    timings: dict[str, float]  # inversion (per draft, shared by its taus) and denoise (per image)


def context_guidance(
    pipe: Any,
    drafts: list[tuple[Any, Image.Image, str]],
    taus: list[float],
    settings: GenerationSettings = GenerationSettings(),
    *,
    resolution: int,
    progress: ProgressHook = no_progress,
) -> Iterator[GuidedImage]:
    """For each (key, draft, subject prompt): invert the draft (nti or npi), denoise it once per tau.

    Yields each image as soon as it is decoded.
    """
    device = pipe_device(pipe)
    for key, draft, prompt in drafts:
        started = _clock(device)
        inverted = invert_image(pipe, draft, prompt, settings, resolution=resolution, progress=progress)
        inversion_s = _clock(device) - started
        if settings.inversion == "npi":  # no null-text steps to report
            progress("null-text", settings.steps, settings.steps, {"advance": settings.steps})
        for tau in taus:
            began = _clock(device)
            (image,) = guided_images(pipe, inverted, prompt, [tau], settings, progress=progress)
            timings = {"inversion": inversion_s, "denoise": _clock(device) - began}
            yield GuidedImage(key, tau, image, inverted, timings)


def plain_images(
    pipe: Any,
    wanted: list[tuple[Any, str, int]],
    settings: GenerationSettings = GenerationSettings(),
    *,
    resolution: int,
    progress: ProgressHook = no_progress,
) -> Iterator[tuple[Any, Image.Image, float]]:
    """Plain generation of each (key, prompt, seed): yields (key, image, seconds) as each is done."""
    device = pipe_device(pipe)
    for key, prompt, seed in wanted:
        started = _clock(device)
        image = plain_generate(pipe, prompt, seed, settings, resolution=resolution, progress=progress)
        yield key, image, _clock(device) - started
