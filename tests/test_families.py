"""The subject-model family interface: which family a pipeline is, and what each encodes."""

from __future__ import annotations

import json
from importlib import resources

import torch

from stencil_cli.core.families import Conditioning, family_of, rows, unet_inputs
from stencil_cli.core.inversion import encode_prompt, encode_unconditional


def test_each_tiny_pipeline_is_its_family(tiny_subject_pipe, tiny_sdxl_pipe) -> None:
    assert family_of(tiny_subject_pipe).name == "sd15" and family_of(tiny_sdxl_pipe).name == "sdxl"
    assert isinstance(encode_prompt(tiny_subject_pipe, "a toy robot", "cpu"), torch.Tensor)


def test_sdxl_conditioning_has_both_encoders_the_pooled_embedding_and_the_time_ids(tiny_sdxl_pipe) -> None:
    pipe = tiny_sdxl_pipe
    cond = encode_prompt(pipe, "a toy robot", "cpu", resolution=64)
    assert isinstance(cond, Conditioning)
    widths = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert cond.hidden.shape == (1, 77, widths) == (1, 77, pipe.unet.config.cross_attention_dim)
    assert cond.pooled.shape == (1, pipe.text_encoder_2.config.projection_dim)
    assert cond.time_ids.tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]
    inputs = unet_inputs(rows(cond, 3))
    assert inputs["encoder_hidden_states"].shape[0] == 3 and inputs["added_cond_kwargs"][
        "time_ids"
    ].shape == (3, 6)
    empty = encode_unconditional(pipe, "", "cpu")  # SDXL's pipeline: zeros for the empty negative prompt
    assert not empty.hidden.any() and not empty.pooled.any()
    negative = encode_unconditional(pipe, "blurry", "cpu")
    assert negative.hidden.any() and negative.pooled.any()


def test_the_sdxl_family_samples_with_sdxls_published_betas() -> None:
    from stencil_cli.core.families import FAMILIES

    text = (
        resources.files("stencil_cli").joinpath("models", "configs", "sdxl.json").read_text(encoding="utf-8")
    )
    published = json.loads(text)["scheduler"]
    settings = FAMILIES["sdxl"].ddim_settings
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type"):
        assert settings[key] == published[key], key
    assert FAMILIES["sdxl"].decoder_prefix == FAMILIES["sd15"].decoder_prefix == "up_blocks."
