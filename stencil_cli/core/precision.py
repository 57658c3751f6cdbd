"""Precision policy for the trained subject model: the weights file's dtype and the inference dtype.

Training moves the decoder weights by about 1e-3 (lr 2e-5, 100 Adam steps), about 1/50 of a weight's size.
bfloat16 keeps 8 significant bits: an update that small mostly rounds away (measured: benchmarks/
bench_precision.py, docs/performance.md). So the trained parameters are saved in float32 (exact), and the
subject UNet never runs in bfloat16 under ``auto``. This module only decides dtypes; it loads nothing.
"""

from __future__ import annotations

import torch

from stencil_cli.models import subject_dtype
from stencil_cli.models.devices import DtypeName, Precision

DEFAULT_SAVE_DTYPE: DtypeName = "fp32"  # the trained parameters on disk: exact master weights
SAVE_DTYPES: dict[DtypeName, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}


def subject_unet_dtype(precision: Precision | str, device: torch.device | str) -> torch.dtype:
    """The dtype to run the trained subject UNet in for `precision` on `device`.

    ``auto``: float16 on CUDA and MPS (10 significant bits: >= 99.7% of the updated elements keep a 1/50
    update, 0.3-1.1% error), float32 on the CPU (exact); never bfloat16, whose 8 bits lose 2.5% of them and
    add ~9% error (full-size SD1.5 decoder, benchmarks/bench_precision.py). An explicit
    ``fp32`` / ``fp16`` / ``bf16`` is honoured (bf16 is the user's choice, at a measured cost in fidelity;
    fp16 on the CPU is refused as `models.resolve_dtype` does).
    """
    return subject_dtype(precision, torch.device(device))


def update_fidelity(
    base: torch.Tensor, trained: torch.Tensor, stored: torch.Tensor
) -> tuple[int, int, float, float]:
    """How well `stored` (the trained weights after save -> load -> inference dtype) keeps the update.

    Returns (updated elements, elements whose update survived, squared error sum, squared update sum):
    an element's update survives when the stored weight still moved from the base, in the update's
    direction; the update's relative error is sqrt(error sum / update sum) over a whole model.
    """
    base = base.detach().float()
    update = trained.detach().float() - base  # exact: both are float32 numbers within a factor of 2
    got = stored.detach().float() - base
    moved = update != 0
    survived = moved & (got != 0) & (torch.sign(got) == torch.sign(update))
    error = (got - update)[moved]
    return (
        int(moved.sum()),
        int(survived.sum()),
        float(error.double().pow(2).sum()),
        float(update[moved].double().pow(2).sum()),
    )
