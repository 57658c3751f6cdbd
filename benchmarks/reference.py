"""The reference: the Stencil method computed the way the authors' published code does it, choice by choice.

This is the baseline `benchmarks/run.py` measures stencil against, and `tests/test_performance.py` checks
stencil's fast paths against. It follows the authors' repository (github.com/GordonChen19/STENCIL, the files
named below; docs/performance.md lists every choice with its line) in how the work is done, and computes what
stencil computes (METHOD.md: the noised latent for the mask pass, all of the phrase's tokens, maps combined at
latent/4, nearest upsampling of the binary mask, the same random-number protocol), so that the two compare:

* attention: only the UNet's cross-attention (`attn2`) layers are replaced by an eager processor, for every
  stage (models/base_model.py 184-187: set once, at import); self-attention keeps diffusers' default (SDPA);
* everything in float32 on the subject model (models/base_model.py 13), the context model in float16 on
  CUDA (models/support_model.py 17-19; float32 on the CPU, where float16 is not a compute type);
* the mask pass (helper.py 91-127): per photo, the VAE encodes it and the text encoder its caption
  (`encode_img`, `encode_txt`), then `get_mask` encodes the caption again with the empty prompt
  (`pipe.encode_prompt(..., do_classifier_free_guidance=True)`) and runs one UNet pass on the guidance batch
  [empty, caption] (helper.py 56-66): two samples per photo;
* training (models/base_model.py 23-77): latents and caption embeddings come from the mask pass (precomputed);
  only `up_blocks` require gradients; Adam with its defaults over two groups, the decoder at 2e-5 and the
  caption embeddings at 1e-5 (which get no gradient: the batch is sliced under `no_grad`, lines 49-56);
  `loss.backward(); optimizer.step(); optimizer.zero_grad()`;
* null-text inversion (null_text_inversion.py): the UNet frozen (models/base_model.py 76), DDIM inversion
  under the prompt plus the VAE decode of the reconstruction (133-137), then for every one of the 50 steps
  a fresh Adam, the conditional prediction without gradients, at most 10 inner iterations with the early stop
  ``loss < 1e-5 + i * 2e-5`` (139-171);
* denoising (helper.py 150-180): at every step `pipe.encode_prompt` (once with the optimised null embedding
  given, twice otherwise: 97 text-encoder calls at 50 steps and 3 injected), one UNet pass on the guidance
  batch, the scheduler's own `step`, then the VAE decode and diffusers' postprocessing.

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

# -- eager attention on attn2 only (models/base_model.py 84-169, 184-187) ------------------------------------


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
        """Run the eager attention; its probabilities go to the sink when one is set."""
        if self.sink is None:
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
def authors_attention(unet: Any, sink: Any = None) -> Iterator[Any]:
    """The authors' processors inside the block: `attn2` eager (recording into `sink` if given), every other
    attention layer left as it is (diffusers' SDPA)."""
    original = dict(unet.attn_processors)
    processors: dict[str, Any] = dict(original)
    for key in original:
        if key.endswith("attn2.processor"):
            processors[key] = RecordingAttnProcessor(key.removesuffix(".processor"), sink)
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


# -- 1. the mask pass (helper.py 91-127, get_mask 47-88) --------------------------------------------------


def _grid(pixels: int, height: int, width: int) -> tuple[int, int]:
    factor = round((height * width / pixels) ** 0.5)
    return -(-height // factor), -(-width // factor)


@dataclass
class ReferenceData:
    """What the authors' `prepare_img` returns (latents, caption embeddings, masks), and the maps."""

    latents: torch.Tensor  # (n, c, h, w)
    embeddings: torch.Tensor  # (n, seq, d)
    masks: torch.Tensor  # (n, 1, h, w) in {0, 1}
    maps: torch.Tensor  # (n, hc, wc) normalised


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
    both_halves: bool = False,
) -> ReferenceData:
    """The authors' mask pass, one photo at a time: encode the photo and the caption, encode the caption again
    with the empty prompt, one UNet pass on the guidance batch [empty, caption], combine the maps.

    The maps of the caption half are used (stencil's default, the paper's "conditioned on C"); with
    `both_halves` both halves are averaged, as the authors' processor does (models/base_model.py 139-140).
    """
    unet = pipe.unet
    device = unet.device
    side = resolution // pipe.vae_scale_factor
    shape = (len(images), unet.config.in_channels, side, side)
    noise_all = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))  # stencil's protocol
    latents, embeddings, masks, maps = [], [], [], []
    with authors_attention(unet):
        for k, (caption, image) in enumerate(zip(captions, images, strict=True)):
            latent = encode_pixels(pipe, image_to_pixels(image, resolution))  # encode_img (helper.py 101)
            embeds = encode_text(pipe, [caption])  # encode_txt (helper.py 105)
            latents.append(latent)
            embeddings.append(embeds)
            tokens = phrase_positions(pipe.tokenizer, caption, phrase)
            recorded: dict[str, torch.Tensor] = {}

            def sink(
                name: str,
                probs: torch.Tensor,
                heads: int,
                tokens: list[int] = tokens,
                recorded: dict[str, torch.Tensor] = recorded,
            ) -> None:
                per_head = probs.float().view(-1, heads, *probs.shape[1:])  # (2, heads, px, tokens)
                chosen = per_head if both_halves else per_head[1:]
                recorded[name] = chosen.mean((0, 1))[:, tokens].mean(-1)  # (pixels,)

            h, w = latent.shape[-2:]
            t = torch.tensor([timestep], device=device)
            noise = noise_all[k : k + 1].to(device)
            noisy = pipe.scheduler.add_noise(
                latent, noise, t
            )  # the noised latent (theirs feeds the clean one)
            cond, uncond = pipe.encode_prompt(caption, device, 1, True)  # helper.py 56-57
            for processor in unet.attn_processors.values():
                if isinstance(processor, RecordingAttnProcessor):
                    processor.sink = sink
            try:
                unet(torch.cat([noisy] * 2), t, encoder_hidden_states=torch.cat([uncond, cond]))
            finally:
                for processor in unet.attn_processors.values():
                    if isinstance(processor, RecordingAttnProcessor):
                        processor.sink = None
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
    return ReferenceData(torch.cat(latents), torch.cat(embeddings), torch.cat(masks), torch.cat(maps))


# -- 2. training (models/base_model.py 23-77) ---------------------------------------------------------------


@dataclass
class ReferenceTrainResult:
    """The loss per step and the names of the optimised parameters."""

    losses: list[float]
    names: list[str]


def reference_train(
    pipe: Any,
    data: ReferenceData,
    *,
    steps: int = 100,
    batch_size: int = 6,
    lr: float = 2e-5,
    embedding_lr: float = 1e-5,
    seed: int = 0,
) -> ReferenceTrainResult:
    """Fine-tune `pipe.unet`'s decoder with the masked loss on the precomputed latents and embeddings.

    Random-number protocol (shared with stencil so the results compare; theirs draws from torch's global
    generator): one CPU generator; per step the photo indices (a permutation's first `batch_size` when there
    are enough photos, else draws with replacement, lines 50-53), then the noise, then the timesteps uniform
    in [0, T).
    """
    unet, scheduler = pipe.unet, pipe.scheduler
    device = unet.device
    latent, latent_mask = data.latents.to(device), data.masks.to(device)
    emb = data.embeddings.to(device).clone().requires_grad_(True)  # line 29
    unet.zero_grad(set_to_none=True)  # their process starts without gradients; a benchmark's may not
    unet.requires_grad_(True)  # lines 28-36: then only up_blocks keep requires_grad
    for name, param in unet.named_parameters():
        param.requires_grad = "up_blocks" in name
    names = [n for n, _ in unet.named_parameters() if "up_blocks" in n]
    optimizer = torch.optim.Adam(  # lines 38-42: Adam's defaults, two groups
        [
            {"params": [p for n, p in unet.named_parameters() if "up_blocks" in n], "lr": lr},
            {"params": [emb], "lr": embedding_lr},
        ]
    )
    generator = torch.Generator("cpu").manual_seed(seed)
    n = latent.shape[0]
    losses = []
    unet.train()  # line 44
    try:
        with authors_attention(unet):
            for _ in range(steps):
                with torch.no_grad():  # lines 49-61
                    if n >= batch_size:
                        index = torch.randperm(n, generator=generator)[:batch_size]
                    else:
                        index = torch.randint(0, n, (batch_size,), generator=generator)
                    latent_batch = latent[index.to(device)]
                    latent_mask_batch = latent_mask[index.to(device)]
                    emb_batch = emb[index.to(device)]
                    noise = torch.randn(latent_batch.shape, generator=generator).to(device)
                    timesteps = torch.randint(
                        0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator
                    ).to(device)
                    noisy_latents = scheduler.add_noise(latent_batch, noise, timesteps)
                pred_noise = unet(noisy_latents, timesteps, emb_batch).sample  # line 63
                loss = (((pred_noise - noise) * latent_mask_batch) ** 2).mean()  # lines 65-67
                losses.append(loss.item())  # line 69 (the progress bar's loss)
                loss.backward()  # lines 70-72
                optimizer.step()
                optimizer.zero_grad()
    finally:
        unet.eval()  # lines 74-76
        unet.zero_grad(set_to_none=True)
        unet.requires_grad_(False)
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


# -- 4. null-text inversion (null_text_inversion.py, Mokady et al.'s code) ------------------------------


@dataclass
class ReferenceInversion:
    """The DDIM trajectory (clean first) and one optimised null embedding per denoising step."""

    trajectory: list[torch.Tensor]
    null_embeddings: list[torch.Tensor]
    inner_iterations: list[int]

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
    early_stop: bool = True,
    epsilon: float = 1e-5,
) -> ReferenceInversion:
    """DDIM inversion under the prompt, then null-text optimisation of every step (null_text_inversion.py).

    The UNet is frozen (models/base_model.py 76: no weight gradients); the VAE decodes the reconstruction as
    `ddim_inversion` does (line 135, unused afterwards); each step stops early when its loss is below
    ``epsilon + i * 2e-5`` (line 162) unless `early_stop` is off.
    """
    unet = pipe.unet
    unet.requires_grad_(False)
    scheduler = reference_scheduler(pipe, steps)
    latent = encode_pixels(pipe, image_to_pixels(image, resolution), mode=False)  # image2latent: the mean
    uncond = encode_text(pipe, [""])  # init_prompt (lines 99-113)
    cond = encode_text(pipe, [prompt])
    with authors_attention(unet):
        with torch.no_grad():
            pipe.vae.decode(latent / pipe.vae.config.scaling_factor)  # latent2image (line 135)
            trajectory = [latent]
            for t in reversed([int(t) for t in scheduler.timesteps]):  # ddim_loop (lines 117-126)
                latent = _next_step(scheduler, unet(latent, t, encoder_hidden_states=cond).sample, t, latent)
                trajectory.append(latent)
        nulls, iterations = [], []
        latent = trajectory[-1]
        for i, t in enumerate(int(t) for t in scheduler.timesteps):  # null_optimization (lines 139-171)
            uncond = uncond.clone().detach().requires_grad_(True)
            optimizer = torch.optim.Adam([uncond], lr=lr * (1.0 - i / max(100, steps)))
            target = trajectory[len(trajectory) - i - 2]
            with torch.no_grad():
                noise_cond = unet(latent, t, encoder_hidden_states=cond).sample
            done = 0
            for _ in range(inner_steps):
                noise_uncond = unet(latent, t, encoder_hidden_states=uncond).sample
                noise = noise_uncond + guidance * (noise_cond - noise_uncond)
                loss = F.mse_loss(_prev_step(scheduler, noise, t, latent), target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                done += 1
                if early_stop and loss.item() < epsilon + i * 2e-5:
                    break
            iterations.append(done)
            nulls.append(uncond[:1].detach())
            with torch.no_grad():
                both = unet(
                    torch.cat([latent] * 2), t, encoder_hidden_states=torch.cat([uncond.detach(), cond])
                ).sample
                noise_u, noise_c = both.chunk(2)
                latent = _prev_step(scheduler, noise_u + guidance * (noise_c - noise_u), t, latent)
    return ReferenceInversion(trajectory, nulls, iterations)


# -- 5. denoise (helper.py 129-180) --------------------------------------------------------------------------


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

    As `inference` (helper.py 150-173): `pipe.encode_prompt` at every step (the prompt alone while a null
    embedding is given, the prompt and the empty prompt afterwards), one UNet pass on the guidance batch, the
    scheduler's `step` (helper.py 129-148).
    """
    unet = pipe.unet
    device = unet.device
    scheduler = reference_scheduler(pipe, steps)
    with authors_attention(unet):
        for i, t in enumerate(scheduler.timesteps):
            if i < inject:
                cond, uncond = pipe.encode_prompt(
                    prompt, device, 1, True, negative_prompt_embeds=null_embeddings[i]
                )
            else:
                cond, uncond = pipe.encode_prompt(prompt, device, 1, True)
            both = unet(torch.cat([latent] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            noise_u, noise_c = both.chunk(2)
            latent = scheduler.step(noise_u + guidance * (noise_c - noise_u), t, latent, eta=0.0).prev_sample
    return latent


@torch.no_grad()
def reference_decode(pipe: Any, latent: torch.Tensor) -> Image.Image:
    """Decode a latent with the VAE into a PIL image (diffusers' postprocessing, helper.py 177-180)."""
    pixels = pipe.vae.decode(latent / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels, output_type="pil")[0]


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
