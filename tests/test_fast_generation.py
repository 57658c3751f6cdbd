"""Less work for the same images: truncated null-text optimisation and batched seeds (tiny preset, CPU)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from stencil_cli.base.events import Event, NullTextIteration, Step
from stencil_cli.core import generation
from stencil_cli.core.generation import GenerationSettings
from stencil_cli.core.inversion import NullTextSettings, encode_prompt

PROMPT = "a toy on a beach"
# a visible learning rate (random tiny weights barely move at the reference 1e-2) and few iterations
VISIBLE = NullTextSettings(lr=2e-1, inner_steps=3)


@pytest.fixture(scope="module")
def drafts(tiny_context_pipe: Any) -> list[Any]:
    """Three drafts, one per seed, rendered one at a time (a batch of one each)."""
    return [
        generation.render_drafts(
            tiny_context_pipe, "a red toy on a beach", resolution=64, seeds=[seed], steps=3
        )[0]
        for seed in (0, 1, 2)
    ]


@pytest.fixture(scope="module")
def full_runs(tiny_subject_pipe: Any, drafts: list[Any]) -> dict[int, Any]:
    """The full optimisation (every step) of the first draft, per step count, computed once."""
    cache: dict[int, Any] = {}

    def get(steps: int) -> Any:
        if steps not in cache:
            settings = GenerationSettings(steps=steps, null_text=VISIBLE)
            (cache[steps],) = generation.invert_images(tiny_subject_pipe, drafts[:1], PROMPT, settings)
        return cache[steps]

    return get  # type: ignore[return-value]


def _pixels(image: Any) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_null_text_steps_is_the_largest_injected_count_over_the_taus() -> None:
    assert generation.null_text_steps([60], 50) == 3
    assert generation.null_text_steps([0, 60, 200], 50) == 10
    assert generation.null_text_steps([0], 50) == 0
    assert generation.null_text_steps([], 50) == 0
    assert generation.null_text_steps([1000, 60], 50) == 50


@pytest.mark.parametrize(
    ("steps", "taus"),
    [(10, [60]), (10, [250]), (7, [0, 300]), (5, [1000]), (6, [0]), (8, [130, 20])],
)
def test_truncated_null_text_gives_bit_identical_embeddings_and_images(
    tiny_subject_pipe: Any, drafts: list[Any], full_runs: Any, steps: int, taus: list[float]
) -> None:
    pipe = tiny_subject_pipe
    settings = GenerationSettings(steps=steps, null_text=VISIBLE)
    full = full_runs(steps)
    k = generation.null_text_steps(taus, steps)
    calls: list[Step | NullTextIteration] = []
    forwards: list[int] = []

    def hook(event: Event) -> None:
        if isinstance(event, NullTextIteration) or (isinstance(event, Step) and event.stage == "null-text"):
            calls.append(event)

    handle = pipe.unet.register_forward_hook(lambda module, args, out: forwards.append(1))
    try:
        (short,) = generation.invert_images(pipe, drafts[:1], PROMPT, settings, taus=taus, progress=hook)
    finally:
        handle.remove()

    assert short.optimized_steps == k and full.optimized_steps == steps
    assert len(short.null_embeddings) == len(short.inner_iterations) == k
    # the DDIM inversion still runs to the noisiest latent
    assert len(short.trajectory) == steps + 1
    assert all(torch.equal(a, b) for a, b in zip(short.trajectory, full.trajectory, strict=True))
    for i in range(k):
        assert torch.equal(short.null_embeddings[i], full.null_embeddings[i]), i
    # the work really stopped after K steps: DDIM inversion, then per optimised step one conditional
    # prediction and the inner iterations, plus the step to the next optimised step's latent
    inner = VISIBLE.inner_steps
    assert len(forwards) == steps + k * (1 + inner) + max(0, k - 1)
    # the progress bar's null-text total is K, one finished step each
    assert all(event.total == k for event in calls)
    assert sum(1 for event in calls if isinstance(event, Step)) == k

    (short_images,) = generation.guided_images(pipe, [short], PROMPT, taus, settings)
    (full_images,) = generation.guided_images(pipe, [full], PROMPT, taus, settings)
    for a, b in zip(short_images, full_images, strict=True):
        assert np.array_equal(_pixels(a), _pixels(b))


def test_a_tau_beyond_the_optimised_steps_is_refused(tiny_subject_pipe: Any, drafts: list[Any]) -> None:
    settings = GenerationSettings(steps=5, null_text=NullTextSettings(inner_steps=1))
    (short,) = generation.invert_images(tiny_subject_pipe, drafts[:1], PROMPT, settings, taus=[200])
    assert short.optimized_steps == 1
    with pytest.raises(ValueError, match="null embeddings for 1"):
        generation.guided_images(tiny_subject_pipe, [short], PROMPT, [600], settings)


def test_drafts_rendered_as_one_batch_equal_one_at_a_time(tiny_context_pipe: Any, drafts: list[Any]) -> None:
    seen: list[int] = []
    batched = generation.render_drafts(
        tiny_context_pipe,
        "a red toy on a beach",
        resolution=64,
        seeds=[0, 1, 2],
        steps=3,
        progress=lambda event: seen.append(event.samples) if isinstance(event, Step) else None,
    )
    assert seen == [3, 3, 3]  # one pipeline call for the three seeds
    for one, many in zip(drafts, batched, strict=True):
        assert int(np.abs(_pixels(one) - _pixels(many)).max()) <= 2
    assert int(np.abs(_pixels(batched[0]) - _pixels(batched[1])).max()) > 20  # seeds still differ


def test_batched_inversion_and_denoise_equal_one_at_a_time_with_per_sample_early_stop(
    tiny_subject_pipe: Any, drafts: list[Any]
) -> None:
    pipe = tiny_subject_pipe
    # a threshold the samples reach after different numbers of iterations at the first step: a finished
    # sample must stay where it stopped while the others go on
    stop = NullTextSettings(lr=2e-1, inner_steps=8, early_stop=4.2e-2, early_stop_slope=0.0)
    settings = GenerationSettings(steps=10, null_text=stop)
    taus = [0, 300]
    single = []
    for draft in drafts:
        (inverted,) = generation.invert_images(pipe, [draft], PROMPT, settings, taus=taus)
        single.append((inverted, generation.guided_images(pipe, [inverted], PROMPT, taus, settings)[0]))
    batched = [sample for _, sample in generation.iter_context_guidance(pipe, drafts, PROMPT, taus, settings)]

    first_steps = {inverted.inner_iterations[0] for inverted, _ in single}
    assert len(first_steps) > 1 and max(first_steps) < 8, first_steps  # the early stop differs per sample
    empty = encode_prompt(pipe, "")
    for (inverted, images), sample in zip(single, batched, strict=True):
        assert sample.batch == 3
        assert sample.inversion.inner_iterations == inverted.inner_iterations
        assert sample.inversion.optimized_steps == inverted.optimized_steps == 3
        for mine, theirs in zip(inverted.trajectory, sample.inversion.trajectory, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-4)
        for mine, theirs in zip(inverted.null_embeddings, sample.inversion.null_embeddings, strict=True):
            # Adam turns rounding-level gradient differences into whole steps on a few elements: compare the
            # update as a whole (a finished sample left to Adam's momentum is off by 0.3 and more)
            assert float((mine - theirs).norm() / (mine - empty).norm()) < 5e-2
        for one, many in zip(images, sample.images, strict=True):
            assert int(np.abs(_pixels(one) - _pixels(many)).max()) <= 2


def test_batch_size_caps_how_many_drafts_go_together(tiny_subject_pipe: Any, drafts: list[Any]) -> None:
    settings = GenerationSettings(steps=4, null_text=NullTextSettings(inner_steps=1))
    order = []
    sizes = []
    for index, sample in generation.iter_context_guidance(
        tiny_subject_pipe, drafts, PROMPT, [500], settings, batch_size=2
    ):
        order.append(index)
        sizes.append(sample.batch)
        assert len(sample.images) == 1 and sample.inversion.optimized_steps == 2
        assert set(sample.timings) == {"inversion", "denoise"}
    assert order == [0, 1, 2] and sizes == [2, 2, 1]
    assert generation.chunks([1, 2, 3], None) == [[1, 2, 3]]
    assert generation.chunks([1, 2, 3], 2) == [[1, 2], [3]]
