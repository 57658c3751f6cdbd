"""DDIM inversion and null-text optimisation (Mokady et al., CVPR 2023), diffusers-pipeline style.

The loops are written out step by step. The UNet and the DDIM scheduler are passed in; nothing here builds a
model, touches the store or prints. METHOD.md section 3 is the algorithm; the reference settings are the
defaults of `NullTextSettings`.

Conventions used throughout:

* ``scheduler.set_timesteps(steps)`` gives the denoising timesteps, noisiest first: ``t_0 > t_1 > ...``.
  A denoising step at ``t`` goes from noise level ``t`` to ``t - stride`` (``stride = T // steps``, the same
  formula as ``DDIMScheduler.step``; below 0 it lands on ``final_alpha_cumprod``).
* DDIM inversion walks the same timesteps backwards, each inverse step going from ``t - stride`` to ``t``,
  so that inversion and denoising use exactly the same pairs of noise levels (the alignment pitfall).
* A trajectory is a list ``[z_clean, z_1, ..., z_steps]``: ``trajectory[k]`` is the latent after ``k`` inverse
  steps, so denoising step ``i`` (from the noisiest) goes from ``trajectory[steps - i]`` towards
  ``trajectory[steps - i - 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from stencil_cli.base.errors import StencilError
from stencil_cli.base.events import NullTextIteration, Progress, Step, no_progress
from stencil_cli.core.families import Embedding, cat, family_of, optimisable, rows, unet_inputs
from stencil_cli.models import native_resolution

# null-text optimisation (the paper), negative-prompt inversion, or plain DDIM inversion (uncond as is)
InversionMethod = Literal["nti", "npi", "ddim"]


@dataclass(frozen=True)
class NullTextSettings:
    """Null-text optimisation settings; the defaults are the reference settings (METHOD.md section 3)."""

    guidance: float = 7.5
    inner_steps: int = 10
    lr: float = 1e-2
    early_stop: float = 1e-5  # step i stops once its loss < early_stop + i * early_stop_slope
    early_stop_slope: float = 2e-5


@dataclass
class InversionResult:
    """What inverting one latent produced."""

    trajectory: list[torch.Tensor]  # [z_clean, ..., z_noisiest], float32
    null_embeddings: list[Embedding]  # one per usable injected step, noisiest first, float32
    method: InversionMethod
    inner_iterations: list[int] = field(default_factory=list)  # per optimised step (nti)
    losses: list[float] = field(default_factory=list)  # last loss per optimised step (nti)
    optimized_steps: int = 0  # K: how many steps (from the noisiest) null-text optimisation ran (nti)

    @property
    def latent(self) -> torch.Tensor:
        """The inverted (noisiest) latent that denoising starts from."""
        return self.trajectory[-1]


# -- prompt embeddings ------------------------------------------------------------------------------


def encode_prompt(
    pipe: Any, prompt: str, device: torch.device | str | None = None, resolution: int | None = None
) -> Embedding:
    """The subject model's conditioning of `prompt` (batch 1): SD1.5 hidden states, or SDXL's `Conditioning`
    (at `resolution`, default the native one)."""
    device = torch.device(device) if device is not None else pipe.unet.device
    family = family_of(pipe)
    return family.encode_prompt(pipe, prompt, device, resolution or native_resolution(pipe))


def encode_unconditional(
    pipe: Any, negative: str, device: torch.device | str | None = None, resolution: int | None = None
) -> Embedding:
    """The unconditional embedding (the null text, or a negative prompt) of the subject model (batch 1)."""
    device = torch.device(device) if device is not None else pipe.unet.device
    family = family_of(pipe)
    return family.unconditional(pipe, negative, device, resolution or native_resolution(pipe))


# -- DDIM arithmetic ----------------------------------------------------------------------------------


def stride_of(scheduler: Any) -> int:
    """Training timesteps between two inference steps (``T // steps``), as DDIMScheduler.step uses."""
    return scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def _alpha(scheduler: Any, timestep: int) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod
    return alphas[timestep] if timestep >= 0 else scheduler.final_alpha_cumprod


def _move(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.to(device=like.device, dtype=like.dtype)


def _check_epsilon(scheduler: Any) -> None:
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind != "epsilon":
        raise ValueError(f"only epsilon-prediction subject models are supported (got {kind!r})")


def ddim_step(scheduler: Any, noise: torch.Tensor, timestep: int, latent: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM denoising step (eta 0) from level `timestep` to `timestep - stride`."""
    t = int(timestep)
    alpha_t = _move(_alpha(scheduler, t), latent)
    alpha_prev = _move(_alpha(scheduler, t - stride_of(scheduler)), latent)
    clean = (latent - (1 - alpha_t).sqrt() * noise) / alpha_t.sqrt()
    return alpha_prev.sqrt() * clean + (1 - alpha_prev).sqrt() * noise


def ddim_inverse_step(
    scheduler: Any, noise: torch.Tensor, timestep: int, latent: torch.Tensor
) -> torch.Tensor:
    """One DDIM inversion step from level `timestep - stride` up to `timestep` (the exact inverse pairing)."""
    t = int(timestep)
    alpha_t = _move(_alpha(scheduler, t), latent)
    alpha_prev = _move(_alpha(scheduler, t - stride_of(scheduler)), latent)
    clean = (latent - (1 - alpha_prev).sqrt() * noise) / alpha_prev.sqrt()
    return alpha_t.sqrt() * clean + (1 - alpha_t).sqrt() * noise


def _unet(unet: Any, latent: torch.Tensor, timestep: int, embeds: Embedding) -> torch.Tensor:
    # not `unet.dtype`: diffusers computes that by walking every submodule, ~1 ms per call on the tiny UNet
    dtype = next(unet.parameters()).dtype
    out = unet(latent.to(dtype), timestep, **unet_inputs(embeds, dtype)).sample
    return out.to(latent.dtype)


def guided_noise(
    unet: Any,
    latent: torch.Tensor,
    timestep: int,
    cond: Embedding,
    uncond: Embedding,
    guidance: float,
) -> torch.Tensor:
    """Classifier-free guided noise prediction (one batched UNet call for uncond + cond)."""
    if guidance == 1.0:
        return _unet(unet, latent, timestep, cond)
    both = _unet(unet, torch.cat([latent, latent]), timestep, cat([uncond, cond]))
    noise_uncond, noise_cond = both.chunk(2)
    return noise_uncond + guidance * (noise_cond - noise_uncond)


# -- inversion ----------------------------------------------------------------------------------------


@torch.no_grad()
def ddim_inversion(
    unet: Any,
    scheduler: Any,
    latent: torch.Tensor,
    cond: Embedding,
    *,
    progress: Progress = no_progress,
) -> list[torch.Tensor]:
    """DDIM-invert a clean latent under the conditional prompt only (guidance 1); returns the trajectory.

    `scheduler.set_timesteps(steps)` must have been called; the result has ``steps + 1`` float32 latents.
    A batch of latents ``[N, ...]`` inverts together (`cond` then has batch N).
    """
    _check_epsilon(scheduler)
    latent = latent.float()
    trajectory = [latent]
    timesteps = [int(t) for t in scheduler.timesteps.flip(0)]  # least noisy first
    for k, t in enumerate(timesteps):
        noise = _unet(unet, latent, t, cond)
        latent = ddim_inverse_step(scheduler, noise, t, latent)
        trajectory.append(latent)
        progress(Step("inversion", k + 1, len(timesteps), samples=latent.shape[0]))
    return trajectory


def _rows(embedding: Embedding, n: int) -> Embedding:
    """`embedding` with batch `n` (a batch of one is repeated; a batch of `n` is kept)."""
    return rows(embedding, n)


def null_text_optimization(
    unet: Any,
    scheduler: Any,
    trajectory: list[torch.Tensor],
    cond: Embedding,
    uncond: Embedding,
    settings: NullTextSettings = NullTextSettings(),
    *,
    optimize_steps: int | None = None,
    progress: Progress = no_progress,
) -> list[InversionResult]:
    """Optimise one unconditional embedding per step so guided DDIM steps retrace `trajectory`.

    Reference settings: per step ``i`` from the noisiest a fresh Adam at ``lr * (1 - i / 100)``, at most
    `inner_steps` iterations, early stop once the loss is below ``early_stop + i * early_stop_slope``, warm
    start from the previous step's result, the conditional prediction computed once per step without
    gradients, all in float32 (the UNet must run in float32; `generation` upcasts it for the inversion).

    Only the first `optimize_steps` steps (K, from the noisiest; default all) are optimised: step i's
    embedding depends only on steps 0..i, so the first K embeddings are exactly those of the full
    optimisation, and denoising injects no more than `injected_steps(tau)` of them.

    A batch of N latents runs at once, each with its own null embeddings: `trajectory` holds batched latents
    ``[N, ...]``; `cond` and `uncond` have batch 1 or N. The per-sample loss drives the per-sample gradient
    (the batch loss is their sum, so each sample's gradient is the one it would get alone), and each sample
    stops early on its own: a finished sample leaves the UNet batch and its embedding is frozen (restored
    after every later Adam step, so the optimiser's momentum cannot move it). Results equal one-at-a-time
    runs within float tolerance. Returns one InversionResult per sample.
    """
    _check_epsilon(scheduler)
    timesteps = [int(t) for t in scheduler.timesteps]
    steps = len(timesteps)
    if len(trajectory) != steps + 1:
        raise ValueError(f"trajectory has {len(trajectory)} latents, expected {steps + 1}")
    optimize = steps if optimize_steps is None else int(optimize_steps)
    if not 0 <= optimize <= steps:
        raise ValueError(f"optimize_steps must be in [0, {steps}] (got {optimize_steps})")
    latent = trajectory[-1].detach().float()
    n = latent.shape[0]
    cond = _rows(cond.detach().float(), n)
    current_uncond = _rows(uncond.detach().float(), n).clone()
    null_embeddings: list[Embedding] = []  # batched, one per optimised step
    iterations: list[list[int]] = []  # per step, per sample
    losses: list[list[float]] = []
    # the reference decays over 100 steps; with more steps decay over all of them (lr stays positive)
    decay_over = max(100, steps)
    was_training = unet.training
    unet.eval()
    grad_flags = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(False)
    try:
        for i, t in enumerate(timesteps[:optimize]):
            target = trajectory[steps - i - 1].detach().float()
            null = current_uncond.clone().requires_grad_(True)
            optimizer = torch.optim.Adam(optimisable(null), lr=settings.lr * (1.0 - i / decay_over))
            with torch.no_grad():
                noise_cond = _unet(unet, latent, t, cond)
            threshold = settings.early_stop + i * settings.early_stop_slope
            active = torch.ones(n, dtype=torch.bool)
            kept = null.detach().clone()  # a finished sample's embedding, restored after every later step
            done = [0] * n
            loss_values = [float("nan")] * n
            for inner in range(1, settings.inner_steps + 1):
                rows = active.nonzero().squeeze(1)
                everyone = len(rows) == n
                with torch.enable_grad():
                    if everyone:
                        lat, emb, noise_c, goal = latent, null, noise_cond, target
                    else:  # finished samples leave the batch (their rows get no gradient)
                        lat, emb, noise_c, goal = latent[rows], null[rows], noise_cond[rows], target[rows]
                    noise_uncond = _unet(unet, lat, t, emb)
                    noise = noise_uncond + settings.guidance * (noise_c - noise_uncond)
                    predicted = ddim_step(scheduler, noise, t, lat)
                    if len(rows) == 1:
                        loss = F.mse_loss(predicted, goal)
                        per_sample = loss.detach().reshape(1)
                    else:
                        per_sample = F.mse_loss(predicted, goal, reduction="none").flatten(1).mean(1)
                        loss = per_sample.sum()  # each sample's gradient is that of its own loss
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                with torch.no_grad():
                    if not everyone:  # freeze finished samples: Adam's momentum moved them
                        frozen = ~active
                        null[frozen] = kept[frozen]
                finished = []
                for row, value in zip(rows.tolist(), per_sample.tolist(), strict=True):
                    done[row] += 1
                    loss_values[row] = value
                    if value < threshold:
                        finished.append(row)
                progress(NullTextIteration(i + 1, optimize, inner, max(per_sample.tolist()), samples=n))
                if finished:
                    with torch.no_grad():
                        kept[finished] = null[finished]
                    active[finished] = False
                    if not active.any():
                        break
            current_uncond = null.detach()
            if not all(bool(torch.isfinite(part).all()) for part in optimisable(current_uncond)):
                raise StencilError(
                    f"null-text inversion diverged at step {i + 1} (non-finite embeddings)",
                    hint="try a lower {null_lr}, or {inversion=npi}",
                    fields=("null_lr", "inversion"),
                )
            null_embeddings.append(current_uncond)
            iterations.append(done)
            losses.append(loss_values)
            if i + 1 < optimize:  # the next optimised step starts from this step's guided result
                with torch.no_grad():  # the step's conditional prediction is already known: one UNet call
                    noise_uncond = _unet(unet, latent, t, current_uncond)
                    noise = noise_uncond + settings.guidance * (noise_cond - noise_uncond)
                    latent = ddim_step(scheduler, noise, t, latent)
            progress(Step("null-text", i + 1, optimize, samples=n, loss=max(loss_values), inner=sum(done)))
    finally:
        for parameter, flag in zip(unet.parameters(), grad_flags, strict=True):
            parameter.requires_grad_(flag)
        unet.train(was_training)
    trajectory = [z.detach().float() for z in trajectory]
    return [
        InversionResult(
            trajectory=[z[r : r + 1] for z in trajectory],
            null_embeddings=[e[r : r + 1] for e in null_embeddings],
            method="nti",
            inner_iterations=[step[r] for step in iterations],
            losses=[step[r] for step in losses],
            optimized_steps=optimize,
        )
        for r in range(n)
    ]


def negative_prompt_inversion(trajectory: list[torch.Tensor], cond: Embedding) -> InversionResult:
    """Negative-prompt inversion (Miyake et al.): every step's null embedding is the prompt embedding."""
    steps = len(trajectory) - 1
    null = cond.detach().float()
    return InversionResult(
        trajectory=[z.detach().float() for z in trajectory],
        null_embeddings=[null] * steps,
        method="npi",
        inner_iterations=[0] * steps,
    )


def invert(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    cond: Embedding,
    uncond: Embedding,
    *,
    method: InversionMethod = "nti",
    settings: NullTextSettings = NullTextSettings(),
    optimize_steps: int | None = None,
    progress: Progress = no_progress,
) -> list[InversionResult]:
    """DDIM-invert `latents`, then null-text optimisation ("nti", of the first `optimize_steps` steps, default
    all; 0: none at all), negative-prompt inversion ("npi") or nothing ("ddim": the null embeddings are
    `uncond` at every step).

    N latents ``[N, ...]`` invert at once (`cond`/`uncond`: batch 1 or N); one result per latent. The DDIM
    inversion always runs to the noisiest latent."""
    if method not in ("nti", "npi", "ddim"):
        raise ValueError(f"unknown inversion method {method!r} (nti, npi or ddim)")
    n = latents.shape[0]
    trajectory = ddim_inversion(unet, scheduler, latents, _rows(cond, n), progress=progress)
    if method == "nti":
        return null_text_optimization(
            unet,
            scheduler,
            trajectory,
            cond,
            uncond,
            settings,
            optimize_steps=optimize_steps,
            progress=progress,
        )
    steps = len(trajectory) - 1
    results = []
    for r in range(n):
        rows = [z[r : r + 1] for z in trajectory]
        if method == "npi":
            results.append(negative_prompt_inversion(rows, _rows(cond, n)[r : r + 1]))
        else:
            null = _rows(uncond, n)[r : r + 1].detach().float()
            results.append(InversionResult(rows, [null] * steps, "ddim", [0] * steps))
    return results
