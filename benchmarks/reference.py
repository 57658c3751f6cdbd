"""The plain reference: the Stencil method computed the way the paper's code does it (slow on purpose).

This is the baseline `benchmarks/run.py` measures stencil against, and `tests/test_performance.py` checks
stencil's fast paths against. It computes the same thing as stencil (METHOD.md, with stencil's numerical
choices: noised latent for the mask pass, all of the phrase's tokens, maps combined at latent/4, nearest
upsampling of the binary mask, the same random-number protocol), in the straightforward way of the paper's
reference code and the null-text inversion code it builds on (Mokady et al.):

* every attention layer of the UNet is eager (diffusers' ``AttnProcessor``: the pixels x pixels self-attention
  maps are materialised), not only the recorded cross-attention;
* everything in float32, no autocast, no TF32;
* the mask pass encodes each photo and caption on its own, one UNet pass per photo;
* training runs the VAE and the text encoder inside every step (nothing is precomputed), the whole UNet keeps
  ``requires_grad`` (gradients are computed for all of it, only ``up_blocks`` are optimised), plain Adam (no
  fused or foreach kernels);
* null-text inversion without early stopping, with the UNet's parameters left requiring gradients (as the
  reference notebook does), eager attention;
* denoising recomputes the prompt embeddings at every step and uses the scheduler's own ``step``.

It deliberately imports nothing from ``stencil_cli``: it is an independent implementation built from diffusers
components, so that agreement between the two is evidence that both are right.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor
from PIL import Image

# -- eager attention everywhere -----------------------------------------------------------------------------


class RecordingAttnProcessor(AttnProcessor):
    """diffusers' eager AttnProcessor that hands each cross-attention probability tensor to `sink`."""

    def __init__(self, name: str, sink: Any) -> None:
        self.name = name
        self.sink = sink

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Run the eager attention; probabilities of cross-attention go to the sink."""
        if encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        original = attn.get_attention_scores

        def scores(query: torch.Tensor, key: torch.Tensor, mask: Any = None) -> torch.Tensor:
            probs = original(query, key, mask)
            self.sink(self.name, probs, attn.heads)
            return probs

        attn.get_attention_scores = scores  # an instance attribute shadows the method for this call
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        finally:
            del attn.get_attention_scores


@contextmanager
def eager_attention(unet: Any, sink: Any = None) -> Iterator[Any]:
    """Every attention layer of `unet` eager inside the block (recording attn2 into `sink` if given)."""
    original = dict(unet.attn_processors)
    processors: dict[str, Any] = {}
    for key in original:
        if sink is not None and key.endswith("attn2.processor"):
            processors[key] = RecordingAttnProcessor(key.removesuffix(".processor"), sink)
        else:
            processors[key] = AttnProcessor()
    unet.set_attn_processor(processors)
    try:
        yield unet
    finally:
        unet.set_attn_processor(dict(original))


# -- inputs -------------------------------------------------------------------------------------------------


def image_to_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """Shorter side to `resolution` (bicubic), centre crop, scaled to [-1, 1]: (1, 3, R, R) float32."""
    image = image.convert("RGB")
    if image.size != (resolution, resolution):
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def text_ids(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length."""
    return tokenizer(
        list(texts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def encode_text(pipe: Any, texts: Sequence[str]) -> torch.Tensor:
    """Text-encoder hidden states of `texts`, float32."""
    device = pipe.text_encoder.device
    return pipe.text_encoder(text_ids(pipe.tokenizer, texts).to(device))[0].float()


@torch.no_grad()
def encode_pixels(pipe: Any, pixels: torch.Tensor, *, mode: bool = True) -> torch.Tensor:
    """VAE latents (the posterior's mode/mean) times the scaling factor, float32."""
    dist = pipe.vae.encode(pixels.to(pipe.vae.device, pipe.vae.dtype)).latent_dist
    return (dist.mode() if mode else dist.mean).float() * pipe.vae.config.scaling_factor


def phrase_positions(tokenizer: Any, caption: str, phrase: str) -> list[int]:
    """Positions of every occurrence of the phrase's tokens (all of them) in the padded caption."""
    ids = text_ids(tokenizer, [caption])[0].tolist()
    wanted = tokenizer(phrase, add_special_tokens=False).input_ids
    found = [
        i
        for s in range(len(ids) - len(wanted) + 1)
        if ids[s : s + len(wanted)] == wanted
        for i in range(s, s + len(wanted))
    ]
    if not found:
        raise ValueError(f"{phrase!r} is not in {caption!r}")
    return sorted(set(found))


# -- 1. the mask pass ---------------------------------------------------------------------------------------


def _grid(pixels: int, height: int, width: int) -> tuple[int, int]:
    factor = round((height * width / pixels) ** 0.5)
    return -(-height // factor), -(-width // factor)


@torch.no_grad()
def reference_masks(
    pipe: Any,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    phrase: str,
    *,
    resolution: int,
    threshold: float = 0.2,
    timestep: int = 50,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Subject masks, one photo at a time: encode, noise to `timestep`, one eager UNet pass, combine.

    Returns (masks (n, 1, h, w) in {0, 1}, normalised maps (n, hc, wc)).
    """
    unet = pipe.unet
    device = unet.device
    latents = torch.cat([encode_pixels(pipe, image_to_pixels(im, resolution)) for im in images])
    h, w = latents.shape[-2:]
    noise = torch.randn(latents.shape, generator=torch.Generator("cpu").manual_seed(seed))
    masks, maps = [], []
    for k, (caption, latent) in enumerate(zip(captions, latents, strict=True)):
        tokens = phrase_positions(pipe.tokenizer, caption, phrase)
        recorded: dict[str, torch.Tensor] = {}

        def sink(
            name: str,
            probs: torch.Tensor,
            heads: int,
            tokens: list[int] = tokens,
            recorded: dict[str, torch.Tensor] = recorded,
        ) -> None:
            per_head = probs.float().view(-1, heads, *probs.shape[1:])[0]  # one photo: (heads, px, tokens)
            recorded[name] = per_head.mean(0)[:, tokens].mean(-1)  # (pixels,)

        t = torch.tensor([timestep], device=device)
        noisy = pipe.scheduler.add_noise(latent[None], noise[k : k + 1].to(device), t)
        embeds = encode_text(pipe, [caption])
        with eager_attention(unet, sink):
            unet(noisy, t, encoder_hidden_states=embeds)
        grids = [m.view(1, 1, *_grid(m.numel(), h, w)) for m in recorded.values()]
        smallest = min(grids, key=lambda g: g.numel()).shape[-2:]
        common = (max(h // 4, smallest[0], 1), max(w // 4, smallest[1], 1))
        resized = [
            g
            if g.shape[-2:] == common
            else F.interpolate(
                g,
                size=common,
                mode="bilinear",
                align_corners=False,
                antialias=g.shape[-2] > common[0] or g.shape[-1] > common[1],
            )
            for g in grids
        ]
        combined = torch.stack(resized).mean(0)
        normalised = (combined - combined.min()) / (combined.max() - combined.min()).clamp_min(1e-12)
        masks.append(F.interpolate((normalised >= threshold).float(), size=(h, w), mode="nearest"))
        maps.append(normalised[:, 0])
    return torch.cat(masks), torch.cat(maps)


# -- 2. training --------------------------------------------------------------------------------------------


@dataclass
class ReferenceTrainResult:
    """The loss per step and the names of the optimised parameters."""

    losses: list[float]
    names: list[str]


def reference_train(
    pipe: Any,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    masks: torch.Tensor,
    *,
    steps: int = 100,
    batch_size: int = 6,
    lr: float = 2e-5,
    seed: int = 0,
    resolution: int = 512,
) -> ReferenceTrainResult:
    """Fine-tune `pipe.unet`'s decoder with the masked loss, VAE and text encoder run inside every step.

    Random-number protocol (shared with stencil so the results compare): one CPU generator; per step the
    photo indices (a permutation's first `batch_size` when there are enough photos, else draws with
    replacement), then the noise, then the timesteps uniform in [0, T).
    """
    unet, scheduler = pipe.unet, pipe.scheduler
    device = unet.device
    pixels = torch.cat([image_to_pixels(im, resolution) for im in images])
    ids = text_ids(pipe.tokenizer, captions)
    names = [n for n, _ in unet.named_parameters() if n.startswith("up_blocks.")]
    unet.requires_grad_(True)  # the whole UNet, as in the paper's code; only up_blocks are optimised
    optimizer = torch.optim.Adam(
        [p for n, p in unet.named_parameters() if n.startswith("up_blocks.")],
        lr=lr,
        weight_decay=0.0,
        foreach=False,
        fused=False,
    )
    generator = torch.Generator("cpu").manual_seed(seed)
    n = len(images)
    latent_shape = (
        pipe.unet.config.in_channels,
        resolution // pipe.vae_scale_factor,
        resolution // pipe.vae_scale_factor,
    )
    losses = []
    unet.train()
    try:
        with eager_attention(unet):
            for _ in range(steps):
                if n >= batch_size:
                    index = torch.randperm(n, generator=generator)[:batch_size]
                else:
                    index = torch.randint(0, n, (batch_size,), generator=generator)
                noise = torch.randn((batch_size, *latent_shape), generator=generator).to(device)
                timesteps = torch.randint(
                    0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator
                ).to(device)
                with torch.no_grad():  # frozen VAE and text encoder, run every step
                    latents = encode_pixels(pipe, pixels[index])
                    embeds = pipe.text_encoder(ids[index].to(device))[0]
                noisy = scheduler.add_noise(latents, noise, timesteps)
                prediction = unet(noisy, timesteps, encoder_hidden_states=embeds).sample
                loss = ((masks[index].to(device) * (noise - prediction)) ** 2).mean()
                unet.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
    finally:
        unet.zero_grad(set_to_none=True)
        unet.requires_grad_(False)
        unet.eval()
    return ReferenceTrainResult(losses, names)


# -- 3. draft -----------------------------------------------------------------------------------------------


def reference_draft(
    context_pipe: Any, prompt: str, *, resolution: int, seed: int, steps: int = 50, guidance: float = 7.5
) -> Image.Image:
    """The context model's draft: the diffusers pipeline called as it comes."""
    return context_pipe(
        prompt=prompt,
        height=resolution,
        width=resolution,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]


# -- 4. null-text inversion (Mokady et al.'s code, without early stopping) -----------------------------------


@dataclass
class ReferenceInversion:
    """The DDIM trajectory (clean first) and one optimised null embedding per denoising step."""

    trajectory: list[torch.Tensor]
    null_embeddings: list[torch.Tensor]

    @property
    def latent(self) -> torch.Tensor:
        """The noisiest latent, where denoising starts."""
        return self.trajectory[-1]


def _alphas(scheduler: Any, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev = t - stride
    alpha_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    return scheduler.alphas_cumprod[t], alpha_prev


def _prev_step(scheduler: Any, noise: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
    alpha_t, alpha_prev = _alphas(scheduler, t)
    x0 = (sample - (1 - alpha_t) ** 0.5 * noise) / alpha_t**0.5
    return alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * noise


def _next_step(scheduler: Any, noise: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
    alpha_next, alpha_t = _alphas(scheduler, t)  # from level t - stride up to level t
    x0 = (sample - (1 - alpha_t) ** 0.5 * noise) / alpha_t**0.5
    return alpha_next**0.5 * x0 + (1 - alpha_next) ** 0.5 * noise


def reference_scheduler(pipe: Any, steps: int) -> DDIMScheduler:
    """A DDIM scheduler with the pipeline's config and `steps` timesteps."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


def reference_invert(
    pipe: Any,
    image: Image.Image,
    prompt: str,
    *,
    resolution: int,
    steps: int = 50,
    guidance: float = 7.5,
    inner_steps: int = 10,
    lr: float = 1e-2,
) -> ReferenceInversion:
    """DDIM inversion under the prompt, then null-text optimisation: every inner step runs (no early stop)."""
    unet = pipe.unet
    scheduler = reference_scheduler(pipe, steps)
    latent = encode_pixels(pipe, image_to_pixels(image, resolution), mode=False)
    cond = encode_text(pipe, [prompt])
    uncond = encode_text(pipe, [""])
    unet.requires_grad_(True)  # the reference never freezes the UNet: backward fills its .grad too
    try:
        with eager_attention(unet):
            trajectory = [latent]
            with torch.no_grad():
                for t in reversed([int(t) for t in scheduler.timesteps]):
                    latent = _next_step(
                        scheduler, unet(latent, t, encoder_hidden_states=cond).sample, t, latent
                    )
                    trajectory.append(latent)
            nulls = []
            latent = trajectory[-1]
            for i, t in enumerate(int(t) for t in scheduler.timesteps):
                uncond = uncond.clone().detach().requires_grad_(True)
                optimizer = torch.optim.Adam([uncond], lr=lr * (1.0 - i / max(100, steps)))
                target = trajectory[len(trajectory) - i - 2]
                with torch.no_grad():
                    noise_cond = unet(latent, t, encoder_hidden_states=cond).sample
                for _ in range(inner_steps):
                    noise_uncond = unet(latent, t, encoder_hidden_states=uncond).sample
                    noise = noise_uncond + guidance * (noise_cond - noise_uncond)
                    loss = F.mse_loss(_prev_step(scheduler, noise, t, latent), target)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                nulls.append(uncond.detach())
                with torch.no_grad():
                    both = unet(
                        torch.cat([latent] * 2), t, encoder_hidden_states=torch.cat([uncond.detach(), cond])
                    ).sample
                    noise_u, noise_c = both.chunk(2)
                    latent = _prev_step(scheduler, noise_u + guidance * (noise_c - noise_u), t, latent)
    finally:
        unet.zero_grad(set_to_none=True)
        unet.requires_grad_(False)
    return ReferenceInversion(trajectory, nulls)


# -- 5. denoise ---------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_denoise_latent(
    pipe: Any,
    latent: torch.Tensor,
    prompt: str,
    null_embeddings: Sequence[torch.Tensor],
    *,
    inject: int,
    steps: int = 50,
    guidance: float = 7.5,
) -> torch.Tensor:
    """CFG DDIM from the inverted latent; the first `inject` steps use the optimised null embeddings.

    The prompt embeddings are recomputed at every step, as a per-image script calling the pipeline does.
    """
    unet = pipe.unet
    scheduler = reference_scheduler(pipe, steps)
    with eager_attention(unet):
        for i, t in enumerate(scheduler.timesteps):
            cond = encode_text(pipe, [prompt])
            uncond = null_embeddings[i] if i < inject else encode_text(pipe, [""])
            both = unet(torch.cat([latent] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            noise_u, noise_c = both.chunk(2)
            latent = scheduler.step(noise_u + guidance * (noise_c - noise_u), t, latent, eta=0.0).prev_sample
    return latent


@torch.no_grad()
def reference_decode(pipe: Any, latent: torch.Tensor) -> Image.Image:
    """Decode a latent with the VAE into a PIL image."""
    pixels = pipe.vae.decode(latent / pipe.vae.config.scaling_factor).sample
    array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def reference_denoise(
    pipe: Any,
    inversion: ReferenceInversion,
    prompt: str,
    *,
    tau: float = 60,
    steps: int = 50,
    guidance: float = 7.5,
) -> Image.Image:
    """The final image: inject the null embeddings while tau > T - t (the first steps), decode."""
    stride = pipe.scheduler.config.num_train_timesteps // steps
    inject = sum(1 for i in range(steps) if tau > i * stride)
    latent = reference_denoise_latent(
        pipe,
        inversion.latent,
        prompt,
        inversion.null_embeddings,
        inject=inject,
        steps=steps,
        guidance=guidance,
    )
    return reference_decode(pipe, latent)
