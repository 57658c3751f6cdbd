"""Method properties that a wrong implementation breaks: the mask pass, the masked loss, injection, inversion.

Each test pins one property of METHOD.md directly (which latent the mask pass sees, which axes the recorder
averages, which steps get the optimised null embeddings, which prompt the DDIM inversion uses), with stand-in
models where the tiny preset cannot tell right from wrong.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from stencil_cli.core.attention import (
    AttentionRecorder,
    combine_maps,
    compute_masks,
    record_cross_attention,
    recorded_layer_maps,
    token_weights,
)
from stencil_cli.core.families import Embedding, family_of, rows, unet_inputs
from stencil_cli.core.generation import denoise, injected_steps, tau_groups
from stencil_cli.core.inversion import ddim_inverse_step, invert
from stencil_cli.core.training import TrainConfig, TrainingData, train_unet
from stencil_cli.models import native_resolution, sd15_ddim_scheduler

CAPTIONS = ["a toy robot on a wooden table", "the toy robot in tall green grass"]
PHRASE = "toy robot"
SUBJECT_PROMPT = "a toy robot on the moon"


def _embed(pipe: Any, texts: list[str]) -> Embedding:
    """The family's caption embeddings (SD1.5: hidden states; SDXL: with pooled and time ids)."""
    return family_of(pipe).encode(pipe, texts, native_resolution(pipe))


def _latents(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


# -- the mask pass --------------------------------------------------------------------------------------


def test_the_mask_pass_sees_the_latent_noised_to_the_mask_timestep(family_pipe) -> None:
    """The UNet gets add_noise(latent, seeded noise, t=50), not the clean latent (the authors' slip)."""
    pipe = family_pipe
    latents = _latents(2)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args: seen.append((args[0].detach().clone(), torch.as_tensor(args[1]).clone()))
    )
    try:
        compute_masks(
            pipe.unet, pipe.scheduler, latents, _embed(pipe, CAPTIONS),
            token_weights(pipe.tokenizer, CAPTIONS, PHRASE), seed=7, timestep=50, batch_size=2,
        )  # fmt: skip
    finally:
        hook.remove()
    noise = torch.randn(latents.shape, generator=torch.Generator("cpu").manual_seed(7))
    expected = pipe.scheduler.add_noise(latents, noise, torch.tensor([50, 50]))
    assert len(seen) == 1
    sample, timestep = seen[0]
    assert torch.equal(timestep.flatten(), torch.tensor([50, 50]))
    assert torch.allclose(sample, expected, atol=1e-6)
    assert not torch.allclose(sample, latents, atol=1e-2)


def test_a_batch_of_photos_gives_each_photo_its_own_map(family_pipe) -> None:
    """Recording with batch 2 and several heads, at two resolutions, gives each photo exactly the map it
    gets alone: batch and head axes are not mixed up (both families)."""
    pipe = family_pipe
    heads = {m.heads for n, m in pipe.unet.named_modules() if n.endswith("attn2")}
    assert heads and min(heads) > 1
    latents = _latents(2)
    embeddings = _embed(pipe, CAPTIONS)
    weights = token_weights(pipe.tokenizer, CAPTIONS, PHRASE)
    recorder = AttentionRecorder(weights)
    with record_cross_attention(pipe.unet, recorder), torch.no_grad():
        pipe.unet(latents, 50, **unet_inputs(embeddings))
    sizes = {m[0].shape[-1] for m in recorder.maps.values()}
    assert len(sizes) == 2  # two resolutions are combined (SD1.5: 8x8 and 4x4; tiny SDXL: 4x4 and 2x2)
    together = compute_masks(pipe.unet, pipe.scheduler, latents, embeddings, weights, batch_size=2)
    alone = compute_masks(pipe.unet, pipe.scheduler, latents, embeddings, weights, batch_size=1)
    assert torch.allclose(together.maps, alone.maps, atol=1e-5)
    # and the per-photo map is the head average of that photo's probabilities
    for layer, (batched,) in recorder.maps.items():
        single = AttentionRecorder(weights[1:])
        with record_cross_attention(pipe.unet, single), torch.no_grad():
            pipe.unet(latents[1:], 50, **unet_inputs(embeddings[1:]))
        assert torch.allclose(batched[1:], single.maps[layer][0], atol=1e-5)
        break


def test_mask_from_both_averages_the_empty_and_caption_halves(family_pipe) -> None:
    """mask_from='both' is the authors' [empty, caption] batch, maps averaged over both halves."""
    pipe = family_pipe
    latents = _latents(2)
    embeddings = _embed(pipe, CAPTIONS)
    empty = _embed(pipe, [""])
    weights = token_weights(pipe.tokenizer, CAPTIONS, PHRASE)
    args = (pipe.unet, pipe.scheduler, latents, embeddings, weights)
    both = compute_masks(*args, seed=4, mask_from="both", empty_embedding=empty)
    caption = compute_masks(pipe.unet, pipe.scheduler, latents, embeddings, weights, seed=4)
    # by hand: the same noised latent once with the empty prompt and once with the caption
    noise = torch.randn(latents.shape, generator=torch.Generator("cpu").manual_seed(4))
    noisy = pipe.scheduler.add_noise(latents, noise, torch.tensor([50, 50]))
    halves = []
    for context in (rows(empty, 2), embeddings):
        recorder = AttentionRecorder(weights)
        with record_cross_attention(pipe.unet, recorder), torch.no_grad():
            pipe.unet(noisy, torch.tensor([50, 50]), **unet_inputs(context))
        halves.append(recorded_layer_maps(recorder, (8, 8)))
    averaged = [(a + b) / 2 for a, b in zip(*halves, strict=True)]
    masks, maps = combine_maps(averaged, (8, 8))
    assert torch.allclose(both.maps, maps, atol=1e-5)
    assert torch.equal(both.masks, masks)
    assert not torch.allclose(both.maps, caption.maps, atol=1e-3)  # the option changes the masks
    with pytest.raises(ValueError):
        compute_masks(pipe.unet, pipe.scheduler, latents, embeddings, weights, mask_from="both")
    with pytest.raises(Exception, match="mask_from"):
        TrainConfig(mask_from="empty").validate()


def test_training_prepares_masks_from_both_halves_when_asked(family_pipe) -> None:
    from PIL import Image

    from stencil_cli.core.training import prepare_training_data

    photos = [Image.new("RGB", (64, 64), (40 * i, 90, 200)) for i in range(2)]
    config = TrainConfig(resolution=64, batch_size=2)
    caption = prepare_training_data(family_pipe, photos, CAPTIONS, PHRASE, config)
    config.mask_from = "both"
    both = prepare_training_data(family_pipe, photos, CAPTIONS, PHRASE, config)
    assert caption.maps is not None and both.maps is not None
    assert not torch.allclose(caption.maps, both.maps, atol=1e-3)


# -- the loss --------------------------------------------------------------------------------------------


def test_training_with_an_empty_mask_learns_nothing(family_pipe) -> None:
    """The loop minimises the masked loss: with a mask of zeros every loss is 0 and no weight moves
    (plain MSE would move the decoder)."""
    unet = copy.deepcopy(family_pipe.unet)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    data = TrainingData(
        latents=_latents(2),
        embeddings=_embed(family_pipe, CAPTIONS),
        masks=torch.zeros(2, 1, 8, 8),
        maps=None,
    )
    result = train_unet(unet, family_pipe.scheduler, data, TrainConfig(steps=2, batch_size=2, lr=1e-2))
    assert result.losses == [0.0, 0.0]
    assert all(torch.equal(before[n], p) for n, p in unet.named_parameters())
    # and a half mask trains exactly like the loss on those pixels alone
    half = torch.zeros(2, 1, 8, 8)
    half[..., :4] = 1.0
    data.masks = half
    result = train_unet(unet, family_pipe.scheduler, data, TrainConfig(steps=1, batch_size=2, lr=1e-2))
    assert result.losses[0] > 0
    assert any(not torch.equal(before[n], p) for n, p in unet.named_parameters())


# -- generation: which steps get the optimised null embeddings -------------------------------------------


class TextUNet(torch.nn.Module):
    """A stand-in UNet whose noise prediction depends on the text; it records every call's embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.1))
        self.calls: list[torch.Tensor] = []

    def forward(self, latent: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor) -> Any:
        self.calls.append(encoder_hidden_states.detach().clone())
        text = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=self.scale * latent + text)


def _filled(value: float) -> torch.Tensor:
    return torch.full((1, 3, 2), value)


def test_the_optimised_null_embeddings_go_into_exactly_the_first_k_steps() -> None:
    steps, inject = 10, 3
    scheduler = sd15_ddim_scheduler()
    scheduler.set_timesteps(steps)
    unet = TextUNet()
    nulls = [_filled(100.0 + i) for i in range(steps)]
    denoise(unet, scheduler, _latents(1), _filled(1.0), _filled(0.0), null_embeddings=nulls, inject=inject)
    assert len(unet.calls) == steps
    negatives = [call[0, 0, 0].item() for call in unet.calls]  # the batch is [negative, cond]
    assert negatives == [100.0, 101.0, 102.0] + [0.0] * (steps - inject)
    assert all(call[1, 0, 0].item() == 1.0 for call in unet.calls)


def test_tau_groups_name_the_taus_that_inject_the_same_steps() -> None:
    assert injected_steps(20, 10) == injected_steps(60, 10) == 1
    assert tau_groups([20, 60, 200], 10) == [(1, [20.0, 60.0])]
    assert tau_groups([20, 60, 200], 50) == []
    assert tau_groups([0, 60, 100, 60.5], 10) == [(1, [60.0, 100.0, 60.5])]


# -- inversion: the conditional prompt -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ddim", "nti"])
def test_ddim_inversion_runs_under_the_conditional_prompt(method: str) -> None:
    steps = 4
    scheduler = sd15_ddim_scheduler()
    scheduler.set_timesteps(steps)
    unet = TextUNet()
    cond, empty = _filled(1.0), _filled(-2.0)
    latent = _latents(1)
    from stencil_cli.core.inversion import NullTextSettings

    (result,) = invert(
        unet, scheduler, latent, cond, empty, method=method, settings=NullTextSettings(inner_steps=1)
    )
    inversion_calls = unet.calls[:steps]
    assert all(torch.equal(call, cond) for call in inversion_calls)
    # the trajectory is the conditional one (the empty prompt's differs, as this UNet reads the text)
    z = latent.float()
    for t in [int(t) for t in scheduler.timesteps.flip(0)]:
        z = ddim_inverse_step(scheduler, unet.scale.detach() * z + 1.0, t, z)
    assert torch.allclose(result.latent, z, atol=1e-5)
    z_empty = latent.float()
    for t in [int(t) for t in scheduler.timesteps.flip(0)]:
        z_empty = ddim_inverse_step(scheduler, unet.scale.detach() * z_empty - 2.0, t, z_empty)
    assert not torch.allclose(result.latent, z_empty, atol=1e-2)


# -- null-text early stopping ------------------------------------------------------------------------------


def test_null_text_settings_default_to_the_reference_settings() -> None:
    from stencil_cli.core.inversion import NullTextSettings

    assert NullTextSettings() == NullTextSettings(
        guidance=7.5, inner_steps=10, lr=1e-2, early_stop=1e-5, early_stop_slope=2e-5
    )


def test_null_text_early_stop_uses_its_slope(family_pipe) -> None:
    """Step i stops once its loss is below early_stop + i * slope: with early_stop 0 and a huge slope the
    first step (threshold 0) runs every inner iteration and every later step stops after one."""
    from stencil_cli.core.inversion import (
        NullTextSettings,
        ddim_inversion,
        encode_prompt,
        encode_unconditional,
    )
    from stencil_cli.core.inversion import null_text_optimization as optimise

    pipe = family_pipe
    scheduler = sd15_ddim_scheduler()
    scheduler.set_timesteps(4)
    cond, empty = encode_prompt(pipe, "a toy robot", "cpu"), encode_unconditional(pipe, "", "cpu")
    trajectory = ddim_inversion(pipe.unet, scheduler, _latents(1), cond)
    settings = NullTextSettings(inner_steps=3, early_stop=0.0, early_stop_slope=1e9)
    (result,) = optimise(pipe.unet, scheduler, trajectory, cond, empty, settings)
    assert result.inner_iterations == [3, 1, 1, 1]
    (flat,) = optimise(
        pipe.unet,
        scheduler,
        trajectory,
        cond,
        empty,
        NullTextSettings(inner_steps=3, early_stop=0.0, early_stop_slope=0.0),
    )
    assert flat.inner_iterations == [3, 3, 3, 3]  # without the slope nothing stops early


def test_a_batch_of_drafts_inverts_and_denoises_as_each_one_alone(family_pipe) -> None:
    """Batched null-text optimisation (each sample its own nulls and early stop) and the batched denoise give
    each draft what it gets alone, for both families (SDXL's pooled embeddings and time ids included)."""
    from PIL import Image

    from stencil_cli.core.families import optimisable
    from stencil_cli.core.generation import GenerationSettings, guided_images, invert_images
    from stencil_cli.core.inversion import NullTextSettings

    drafts = [Image.new("RGB", (64, 64), (30 + 90 * i, 120, 200 - 60 * i)) for i in range(2)]
    settings = GenerationSettings(steps=3, null_text=NullTextSettings(lr=0.1, inner_steps=3, early_stop=1e-3))
    together = invert_images(family_pipe, drafts, SUBJECT_PROMPT, settings)
    alone = [invert_images(family_pipe, [d], SUBJECT_PROMPT, settings)[0] for d in drafts]
    for batched, single in zip(together, alone, strict=True):
        assert torch.allclose(batched.latent, single.latent, atol=1e-4)
        assert batched.inner_iterations == single.inner_iterations
        for a, b in zip(batched.null_embeddings, single.null_embeddings, strict=True):
            for part_a, part_b in zip(optimisable(a), optimisable(b), strict=True):
                assert torch.allclose(part_a, part_b, atol=2e-3)  # Adam magnifies float noise
    images = guided_images(family_pipe, together, SUBJECT_PROMPT, [60.0], settings)
    singles = [guided_images(family_pipe, [inv], SUBJECT_PROMPT, [60.0], settings)[0] for inv in alone]
    import numpy as np

    for row, single in zip(images, singles, strict=True):
        diff = np.abs(np.asarray(row[0], dtype=np.int16) - np.asarray(single[0], dtype=np.int16))
        assert diff.max() <= 2
