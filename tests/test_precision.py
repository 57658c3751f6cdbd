"""The trained update survives save -> load -> the inference dtype (tiny preset), and the dtype policy."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from stencil_cli.base.errors import BadInputError
from stencil_cli.core.precision import SAVE_DTYPES, subject_unet_dtype, update_fidelity
from stencil_cli.core.training import TrainConfig, trainable_names
from stencil_cli.core.weights import (
    load_trained_weights,
    save_trained_weights,
    trained_state,
    weights_metadata,
)


def test_auto_never_runs_the_subject_unet_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # a GPU that has it
    assert subject_unet_dtype("auto", "cuda") == torch.float16
    assert subject_unet_dtype("auto", "mps") == torch.float16
    assert subject_unet_dtype("auto", "cpu") == torch.float32
    assert subject_unet_dtype("bf16", "cuda") == torch.bfloat16  # asked for by name: honoured
    assert subject_unet_dtype("fp32", "cuda") == torch.float32
    with pytest.raises(BadInputError):
        subject_unet_dtype("fp16", "cpu")
    with pytest.raises(BadInputError):
        subject_unet_dtype("fp8", "cuda")
    assert TrainConfig().save_dtype == "fp32"


def _trained_copy(unet: torch.nn.Module) -> tuple[torch.nn.Module, list[str]]:
    """The UNet with a realistic update on its decoder: ~1e-3 per element (100 Adam steps at 2e-5)."""
    trained = copy.deepcopy(unet)
    names = trainable_names(trained, "decoder")
    generator = torch.Generator().manual_seed(0)
    params = dict(trained.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].add_(
                (torch.randn(params[name].shape, generator=generator) * 1e-3).clamp(-2e-3, 2e-3)
            )
    return trained, names


def _round_trip(
    base: torch.nn.Module,
    trained: torch.nn.Module,
    names: list[str],
    save: str,
    infer: torch.dtype,
    path: Path,
) -> tuple[float, float]:
    """(fraction of updated elements that kept their update, the update's relative error)."""
    config = TrainConfig(save_dtype=save)
    save_trained_weights(
        path, trained_state(trained, names, SAVE_DTYPES[save]), weights_metadata(config, "tiny", names)
    )
    fresh = copy.deepcopy(base).to(infer)
    load_trained_weights(fresh, path)
    totals = [0, 0, 0.0, 0.0]
    base_params, trained_params, loaded = (dict(m.named_parameters()) for m in (base, trained, fresh))
    for name in names:
        for i, value in enumerate(update_fidelity(base_params[name], trained_params[name], loaded[name])):
            totals[i] += value
    moved, kept, error, size = totals
    return kept / moved, (error / size) ** 0.5


def test_the_trained_update_survives_the_default_format_and_inference_dtypes(
    tiny_subject_pipe, tmp_path
) -> None:
    base = tiny_subject_pipe.unet
    trained, names = _trained_copy(base)
    default = TrainConfig().save_dtype
    # CPU default: fp32 file, fp32 UNet: exact
    kept, error = _round_trip(
        base, trained, names, default, subject_unet_dtype("auto", "cpu"), tmp_path / "a"
    )
    assert kept == 1.0 and error == 0.0
    # CUDA default, emulated (storage rounding is the whole effect): fp16's 10 bits keep the update
    cuda = subject_unet_dtype("auto", "cuda")
    kept, error = _round_trip(base, trained, names, default, cuda, tmp_path / "b")
    assert kept >= 0.99 and error <= 0.02
    # what it was before: an fp16 file in a bf16 UNet loses much more of it
    old_kept, old_error = _round_trip(base, trained, names, "fp16", torch.bfloat16, tmp_path / "c")
    assert old_kept < kept and old_error > 4 * error
