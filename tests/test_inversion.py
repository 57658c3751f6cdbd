"""DDIM inversion and null-text optimisation (stencil_cli.core.inversion) on the tiny preset."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler

from stencil_cli.core import inversion as inv
from stencil_cli.core.families import Conditioning, optimisable
from stencil_cli.core.generation import (
    GenerationSettings,
    ddim_scheduler,
    denoise,
    invert_images,
    render_drafts,
)
from stencil_cli.models import SD15_DDIM_SETTINGS

PROMPT = "a toy on a beach"
# On random tiny weights the reference lr (1e-2, 10 iterations) barely moves the null embedding, so
# the reconstruction property is shown with a larger lr and more iterations.
VISIBLE = inv.NullTextSettings(lr=2e-1, inner_steps=20)
STEPS = 10
# how much better the visible-settings NTI reconstructs than plain CFG / the reference lr, per family: the
# random tiny SDXL reads the text through its pooled embedding too, so its 10-step reconstruction gains less
NTI_GAIN = {"sd15": (50, 10), "sdxl": (10, 5)}


def sd15_scheduler(steps: int) -> DDIMScheduler:
    """The SD1.5 DDIM scheduler of METHOD.md with `steps` timesteps."""
    scheduler = DDIMScheduler(**SD15_DDIM_SETTINGS)
    scheduler.set_timesteps(steps)
    return scheduler


class ConstantNoiseUNet(torch.nn.Module):
    """A stand-in UNet whose noise prediction depends only on the timestep (so inversion is exact)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, latent: torch.Tensor, t: int, encoder_hidden_states: torch.Tensor) -> Any:
        noise = torch.sin(torch.arange(latent[0].numel(), dtype=torch.float32) * 0.37 + int(t) * 0.01)
        return SimpleNamespace(sample=noise.reshape(latent[0].shape).expand_as(latent) * self.weight)


# -- DDIM arithmetic --------------------------------------------------------------------------------------


def test_ddim_step_matches_the_diffusers_scheduler_step() -> None:
    scheduler = sd15_scheduler(50)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 8, 8, generator=generator)
    noise = torch.randn(1, 4, 8, 8, generator=generator)
    for t in (int(scheduler.timesteps[0]), int(scheduler.timesteps[25]), int(scheduler.timesteps[-1])):
        expected = scheduler.step(noise, t, latent, eta=0.0).prev_sample
        assert torch.allclose(inv.ddim_step(scheduler, noise, t, latent), expected, atol=1e-6)


def test_inverse_step_undoes_the_denoising_step_with_the_same_noise() -> None:
    scheduler = sd15_scheduler(50)
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 4, 8, 8, generator=generator)
    noise = torch.randn(1, 4, 8, 8, generator=generator)
    t = int(scheduler.timesteps[10])
    up = inv.ddim_inverse_step(scheduler, noise, t, latent)
    assert not torch.allclose(up, latent)
    assert torch.allclose(inv.ddim_step(scheduler, noise, t, up), latent, atol=1e-5)


def test_inversion_walks_the_same_timesteps_backwards_and_denoising_retraces_it() -> None:
    scheduler = sd15_scheduler(20)
    unet = ConstantNoiseUNet()
    seen: list[int] = []

    def spy(latent: torch.Tensor, t: int, encoder_hidden_states: torch.Tensor) -> Any:
        seen.append(int(t))
        return ConstantNoiseUNet.forward(unet, latent, t, encoder_hidden_states)

    unet.forward = spy  # type: ignore[method-assign]
    clean = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    embeds = torch.zeros(1, 3, 4)
    trajectory = inv.ddim_inversion(unet, scheduler, clean, embeds)
    assert len(trajectory) == 21
    assert seen == sorted(int(t) for t in scheduler.timesteps)  # least noisy first, same grid
    # denoising (guidance 1, noise independent of the latent) lands exactly back on the clean latent
    back = denoise(unet, scheduler, trajectory[-1], embeds, embeds, guidance=1.0)
    assert torch.allclose(back, clean, atol=1e-4)
    assert not torch.allclose(trajectory[-1], clean, atol=1e-2)


# -- null-text optimisation on the tiny subject model ------------------------------------------------------


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def inverted(request: pytest.FixtureRequest, tiny_context_pipe: Any) -> dict[str, Any]:
    """Per subject-model family: one draft, its NTI inversion with visible settings, and the prompt
    embeddings (computed once per family)."""
    pipe = request.getfixturevalue("tiny_subject_pipe" if request.param == "sd15" else "tiny_sdxl_pipe")
    (draft,) = render_drafts(tiny_context_pipe, "a red toy on a beach", resolution=64, seeds=[0], steps=3)
    settings = GenerationSettings(steps=STEPS, null_text=VISIBLE)
    (result,) = invert_images(pipe, [draft], PROMPT, settings)
    return {
        "draft": draft,
        "result": result,
        "cond": inv.encode_prompt(pipe, PROMPT),
        "empty": inv.encode_unconditional(pipe, ""),
        "settings": settings,
        "pipe": pipe,
        "family": request.param,
    }


def _text_parts(embedding: Any) -> list[torch.Tensor]:
    """Every part of a null embedding that comes from text (named here, not taken from the code tested)."""
    if isinstance(embedding, Conditioning):
        return [embedding.hidden, embedding.pooled]
    return [embedding]


def _reconstruction_error(
    pipe: Any, inverted: dict[str, Any], result: inv.InversionResult, inject: int
) -> float:
    scheduler = ddim_scheduler(pipe, STEPS)
    latent = denoise(
        pipe.unet,
        scheduler,
        result.latent,
        inverted["cond"],
        inverted["empty"],
        guidance=7.5,
        null_embeddings=result.null_embeddings,
        inject=inject,
    )
    return float((latent - result.trajectory[0]).pow(2).mean())


def test_null_text_reconstructs_far_better_than_ddim_inversion_with_cfg(inverted: dict[str, Any]) -> None:
    pipe = inverted["pipe"]
    result = inverted["result"]
    assert result.method == "nti"
    assert len(result.trajectory) == STEPS + 1 and len(result.null_embeddings) == STEPS
    nti_error = _reconstruction_error(pipe, inverted, result, inject=STEPS)
    cfg_error = _reconstruction_error(pipe, inverted, result, inject=0)
    assert cfg_error > NTI_GAIN[inverted["family"]][0] * nti_error, (cfg_error, nti_error)
    # the optimisation moved every step's null embedding away from the empty prompt's
    for null in result.null_embeddings:  # SDXL: the hidden states and the pooled embedding both moved
        for part, start in zip(_text_parts(null), _text_parts(inverted["empty"]), strict=True):
            assert part.dtype == torch.float32
            assert not torch.allclose(part, start.float())


def test_reference_learning_rate_barely_helps_on_random_weights(inverted: dict[str, Any]) -> None:
    pipe = inverted["pipe"]
    settings = GenerationSettings(steps=STEPS)  # reference: lr 1e-2, 10 inner iterations
    (reference,) = invert_images(pipe, [inverted["draft"]], PROMPT, settings)
    reference_error = _reconstruction_error(pipe, inverted, reference, inject=STEPS)
    visible_error = _reconstruction_error(pipe, inverted, inverted["result"], inject=STEPS)
    cfg_error = _reconstruction_error(pipe, inverted, reference, inject=0)
    assert visible_error * NTI_GAIN[inverted["family"]][1] < reference_error < cfg_error
    assert reference.inner_iterations == [10] * STEPS  # no early stop at these losses


def test_negative_prompt_inversion_uses_the_prompt_as_null_and_needs_no_optimisation(
    inverted: dict[str, Any],
) -> None:
    pipe = inverted["pipe"]
    settings = GenerationSettings(steps=STEPS, inversion="npi")
    (result,) = invert_images(pipe, [inverted["draft"]], PROMPT, settings)
    assert result.method == "npi" and result.inner_iterations == [0] * STEPS
    for null in result.null_embeddings:
        for part, prompt in zip(optimisable(null), optimisable(inverted["cond"]), strict=True):
            assert torch.equal(part, prompt.float())
    npi_error = _reconstruction_error(pipe, inverted, result, inject=STEPS)
    cfg_error = _reconstruction_error(pipe, inverted, result, inject=0)
    assert npi_error < cfg_error
    # same trajectory as the NTI run (both start with the same DDIM inversion)
    assert torch.allclose(result.latent, inverted["result"].latent, atol=1e-5)


def test_optimisation_schedule_fresh_adam_decaying_lr_early_stop_and_warm_start(
    inverted: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = inverted["pipe"]
    pipe = pipe
    scheduler = ddim_scheduler(pipe, 4)
    latent = inverted["result"].trajectory[0]
    trajectory = inv.ddim_inversion(pipe.unet, scheduler, latent, inverted["cond"])
    made: list[tuple[float, torch.Tensor]] = []
    real_adam = torch.optim.Adam

    def recording_adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
        made.append((lr, params[0].detach().clone()))
        return real_adam(params, lr=lr)

    monkeypatch.setattr(inv.torch.optim, "Adam", recording_adam)
    # a huge early-stop threshold: every step stops after its first iteration
    settings = inv.NullTextSettings(lr=0.5, inner_steps=7, early_stop=1e9)
    (result,) = inv.null_text_optimization(
        pipe.unet, scheduler, trajectory, inverted["cond"], inverted["empty"], settings
    )
    assert result.inner_iterations == [1, 1, 1, 1]
    assert [lr for lr, _ in made] == pytest.approx([0.5 * (1 - i / 100) for i in range(4)])
    start = optimisable(inverted["empty"])[0].float()
    assert torch.equal(made[0][1], start)  # starts from the empty prompt's embedding
    for i in range(1, 4):  # warm start: each step begins where the previous one ended
        assert torch.equal(made[i][1], optimisable(result.null_embeddings[i - 1])[0])
    # without early stop, every step runs all iterations
    made.clear()
    (full,) = inv.null_text_optimization(
        pipe.unet,
        scheduler,
        trajectory,
        inverted["cond"],
        inverted["empty"],
        inv.NullTextSettings(inner_steps=3),
    )
    assert full.inner_iterations == [3, 3, 3, 3]


def test_optimisation_leaves_the_unet_untouched(inverted: dict[str, Any]) -> None:
    pipe = inverted["pipe"]
    unet = pipe.unet
    before = {name: p.detach().clone() for name, p in unet.named_parameters() if "up_blocks" in name}
    flags = [p.requires_grad for p in unet.parameters()]
    scheduler = ddim_scheduler(pipe, 2)
    trajectory = inv.ddim_inversion(unet, scheduler, inverted["result"].trajectory[0], inverted["cond"])
    inv.null_text_optimization(
        unet, scheduler, trajectory, inverted["cond"], inverted["empty"], inv.NullTextSettings(inner_steps=2)
    )
    assert [p.requires_grad for p in unet.parameters()] == flags
    for name, p in unet.named_parameters():
        if name in before:
            assert torch.equal(p, before[name])
            assert p.grad is None


def test_inversion_runs_in_float32_even_for_a_half_precision_unet(inverted: dict[str, Any]) -> None:
    pipe = inverted["pipe"]
    # a private copy: the session pipe is shared and must not be rounded through bf16 (nor rebuilt through the
    # pipeline constructor, which rewrites the shared scheduler's steps_offset)
    pipe = copy.deepcopy(pipe)
    pipe.unet.to(torch.bfloat16)
    seen: list[torch.dtype] = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(module.dtype))
    try:
        settings = GenerationSettings(steps=2, null_text=inv.NullTextSettings(inner_steps=1))
        (result,) = invert_images(pipe, [inverted["draft"]], PROMPT, settings)
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.float32}  # every UNet call of the inversion ran in float32
    assert pipe.unet.dtype == torch.bfloat16  # restored afterwards
    assert all(part.dtype == torch.float32 for null in result.null_embeddings for part in optimisable(null))
    assert all(z.dtype == torch.float32 and torch.isfinite(z).all() for z in result.trajectory)


def test_invert_rejects_unknown_methods_and_bad_trajectories(tiny_subject_pipe: Any) -> None:
    scheduler = sd15_scheduler(3)
    unet = ConstantNoiseUNet()
    latent = torch.zeros(1, 4, 8, 8)
    embeds = torch.zeros(1, 3, 4)
    with pytest.raises(ValueError, match="unknown inversion method"):
        inv.invert(unet, scheduler, latent, embeds, embeds, method="magic")
    with pytest.raises(ValueError, match="trajectory has 2 latents"):
        inv.null_text_optimization(unet, scheduler, [latent, latent], embeds, embeds)
