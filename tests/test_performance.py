"""Stencil's fast paths compute what the reference (benchmarks/reference.py, the authors' code) computes.

The reference works as the authors' published code does (eager cross-attention, float32, a guidance batch of
2 per photo in the mask pass, Adam's defaults with a caption-embedding group, every null-text step optimised,
the prompt re-encoded at every denoising step); stencil batches, skips the work tau never uses and picks its
kernels. On the tiny preset the results must agree.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import reference as ref  # noqa: E402
import run as bench  # noqa: E402

from stencil_cli.core import generation, inversion, training  # noqa: E402
from stencil_cli.models import quiet_libraries  # noqa: E402

RESOLUTION = 64
PHRASE = bench.PHRASE


@pytest.fixture
def pipe(tiny_subject_pipe: Any) -> Any:
    """The session's tiny pipeline with a private copy of its UNet (training changes it)."""
    parts = {k: v for k, v in tiny_subject_pipe.components.items() if k != "unet"}
    parts.update(unet=copy.deepcopy(tiny_subject_pipe.unet), requires_safety_checker=False)
    with quiet_libraries():
        clone = StableDiffusionPipeline(**parts)
    clone.set_progress_bar_config(disable=True)
    return clone


@pytest.fixture(scope="module")
def photos() -> tuple[list[Any], list[str]]:
    """Three synthetic photos at the tiny resolution and their captions (with the phrase)."""
    return bench.synthetic_photos(3, RESOLUTION), list(bench.CAPTIONS[:3])


def test_mask_pass_equals_the_authors_guidance_batch_reference(pipe: Any, photos: Any) -> None:
    images, captions = photos
    config = training.TrainConfig(resolution=RESOLUTION)
    data = training.prepare_training_data(pipe, images, captions, PHRASE, config)
    theirs = ref.reference_masks(pipe, images, captions, PHRASE, resolution=RESOLUTION)
    masks, maps = theirs.masks, theirs.maps
    torch.testing.assert_close(data.latents, theirs.latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(data.embeddings, theirs.embeddings, atol=1e-5, rtol=0)
    assert data.masks.shape == masks.shape == (3, 1, 8, 8)
    assert 0 < masks.mean() < 1  # a real mask, not all or nothing
    torch.testing.assert_close(data.maps, maps, atol=1e-4, rtol=0)
    intersection = (data.masks * masks).sum()
    union = ((data.masks + masks) > 0).float().sum()
    assert float(intersection / union) == pytest.approx(1.0, abs=1e-6)


def test_training_steps_equal_the_reference_loop(pipe: Any, photos: Any) -> None:
    images, captions = photos
    initial = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    config = training.TrainConfig(steps=3, batch_size=4, lr=1e-3, resolution=RESOLUTION)
    data = training.prepare_training_data(pipe, images, captions, PHRASE, config)
    fast = training.train_unet(pipe.unet, pipe.scheduler, data, config)
    fast_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}

    pipe.unet.load_state_dict(initial)
    # the same inputs (the mask pass agrees to rounding, test above; Adam's first step turns a rounding-level
    # gradient into a whole step of lr, so the loop is compared on identical latents)
    same = ref.ReferenceData(data.latents, data.embeddings, data.masks, data.maps)
    slow = ref.reference_train(pipe, same, steps=3, batch_size=4, lr=1e-3)
    slow_state = pipe.unet.state_dict()

    assert sorted(slow.names) == sorted(fast.names)
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(slow.losses), rtol=1e-4, atol=1e-6)
    change, disagreement = 0.0, 0.0
    for name, before in initial.items():
        if name.startswith("up_blocks."):
            change += float((fast_state[name] - before).pow(2).sum())
            disagreement += float((fast_state[name] - slow_state[name]).pow(2).sum())
        else:
            assert torch.equal(fast_state[name], before) and torch.equal(slow_state[name], before), name
    # Adam moves every weight by about lr per step, whatever its gradient's size, so a weight whose gradient
    # is at rounding level may move either way: compare the whole update, not each weight
    assert change > 1e-3
    assert (disagreement / change) ** 0.5 < 1e-2


def test_null_text_inversion_and_denoise_equal_the_reference(pipe: Any, photos: Any) -> None:
    image, prompt, steps, inner, lr = photos[0][1], "a toy robot on a beach", 5, 3, 3e-2
    # early stopping is what the reference does not do; switched off here so both run every iteration
    no_stop = inversion.NullTextSettings(inner_steps=inner, lr=lr, early_stop=0.0, early_stop_slope=0.0)
    settings = generation.GenerationSettings(steps=steps, null_text=no_stop)
    (fast,) = generation.invert_images(pipe, [image], prompt, settings, resolution=RESOLUTION)
    slow = ref.reference_invert(
        pipe, image, prompt, resolution=RESOLUTION, steps=steps, inner_steps=inner, lr=lr, early_stop=False
    )

    assert fast.inner_iterations == [inner] * steps
    assert len(fast.trajectory) == len(slow.trajectory) == steps + 1
    for mine, theirs in zip(fast.trajectory, slow.trajectory, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-4)
    empty = ref.encode_text(pipe, [""])
    for mine, theirs in zip(fast.null_embeddings, slow.null_embeddings, strict=True):
        # Adam moves every element by about lr whatever its gradient's size, so an element whose gradient is
        # at rounding level may go either way: most agree closely, and the whole update agrees
        assert float((mine - empty).norm()) > 0.1  # it optimised
        assert float(((mine - theirs).abs() < 1e-3).float().mean()) > 0.9
        assert float((mine - theirs).norm() / (mine - empty).norm()) < 5e-2

    inject = generation.injected_steps(600, steps)  # tau 600 of 1000 with 5 steps: the first 3
    assert inject == 3
    scheduler = generation.ddim_scheduler(pipe, steps)
    latent = generation.denoise(
        pipe.unet,
        scheduler,
        fast.latent,
        inversion.encode_prompt(pipe, prompt),
        inversion.encode_prompt(pipe, ""),
        null_embeddings=fast.null_embeddings,
        inject=inject,
    )
    reference_latent = ref.reference_denoise_latent(
        pipe, slow.latent, prompt, slow.null_embeddings, inject=inject, steps=steps
    )
    torch.testing.assert_close(latent, reference_latent, rtol=0, atol=1e-2)  # off by one step: ~0.4
    image_fast = generation.guided_images(pipe, [fast], prompt, [600], settings)[0][0]
    image_slow = ref.reference_denoise(pipe, slow, prompt, tau=600, steps=steps)
    diff = torch.tensor(bench.np.asarray(image_fast), dtype=torch.int16) - torch.tensor(
        bench.np.asarray(image_slow), dtype=torch.int16
    )
    assert int(diff.abs().max()) <= 2


def test_run_prints_one_json_object_with_every_stage(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--preset", "tiny", "--steps", "2", "--ddim-steps", "2", "--inner-steps", "1"]
    bench.main([*args, "--draft-steps", "2", "--photos", "2", "--batch-size", "2", "--no-warmup", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert set(report["stages"]) == {*bench.STAGES, "total"}
    for stage in bench.STAGES:
        row = report["stages"][stage]
        assert row["stencil_s"] > 0 and row["reference_s"] > 0
        assert row["ratio"] == pytest.approx(row["reference_s"] / row["stencil_s"], rel=1e-2)
        assert row["stencil_peak_mb"] > 0 and row["reference_peak_mb"] > 0
    assert report["settings"]["steps"] == 2 and report["device"] == "cpu"


def test_run_counts_model_passes_per_stage_with_hooks_and_the_authors_upper_bound(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--preset", "tiny", "--steps", "2", "--ddim-steps", "4", "--inner-steps", "2", "--json"]
    bench.main([*args, "--draft-steps", "2", "--photos", "2", "--batch-size", "2", "--no-warmup"])
    stages = json.loads(capsys.readouterr().out)["stages"]

    def work(stage: str, path: str) -> tuple[int, int, int]:
        row = stages[stage][path]
        assert row["unet_pass_equivalents"] == row["unet_forward"] + 2 * row["unet_backward"]
        return row["unet_forward"], row["unet_backward"], row["context_forward"]

    # tau 60 with 4 DDIM steps (stride 250) injects one step: stencil optimises one null embedding
    # (4 inversion steps, then 1 conditional + 2 inner forwards and 2 backwards), the reference all four
    assert work("inversion", "stencil") == (4 + 1 + 2, 2, 0)
    assert work("inversion", "reference") == (4 + 4 * (1 + 2 + 2), 4 * 2, 0)
    # the authors' figure is computed; the reference runs the same null-text inversion (guided step as a batch
    # of 2 included), so the hooks on the reference must find exactly the computed figure
    assert work("inversion", "authors") == work("inversion", "reference")
    for path in ("stencil", "reference", "authors"):
        assert work("train", path) == (2 * 2, 2 * 2, 0)  # 2 steps of batch 2
        assert work("draft", path) == (0, 0, 2 * 2)  # guidance batch of 2 per draft step
        assert work("denoise", path) == (2 * 4, 0, 0)
    assert work("mask", "stencil") == (2, 0, 0)
    # their mask pass is a guidance batch of 2 per photo, and the reference runs it so
    assert work("mask", "reference") == work("mask", "authors") == (4, 0, 0)
    assert stages["total"]["stencil"]["unet_backward"] == 2 + 4
