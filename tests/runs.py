"""Training helpers shared by the test modules: a fixed-noise loss, an interrupted run with a checkpoint."""

from __future__ import annotations

from typing import Any

import torch

from stencil_cli.core.families import unet_inputs
from stencil_cli.core.training import masked_mse
from stencil_cli.store.db import Store
from stencil_cli.store.layout import CHECKPOINT_NAME
from stencil_cli.store.records import Run


def eval_loss(unet: Any, pipe: Any, data: Any) -> float:
    """The masked loss on a fixed set of noise and timesteps (independent of training randomness)."""
    generator = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        for t in (100, 400, 700):
            noise = torch.randn(data.latents.shape, generator=generator)
            steps = torch.full((data.latents.shape[0],), t)
            noisy = pipe.scheduler.add_noise(data.latents, noise, steps)
            prediction = unet(noisy, steps, **unet_inputs(data.embeddings)).sample
            total += masked_mse(prediction, noise, data.masks).item()
    return total / 3


def interrupted_run(store: Store, **config: Any) -> Run:
    """An interrupted run of `robot` at step 3 of 10 (with `config` settings) and a checkpoint file."""
    from stencil_cli.core.training import TrainConfig

    params = {**TrainConfig(steps=10, **config).to_params(), "subject_model": "tiny"}
    run = store.create_run("robot", params, base_model="tiny")
    store.finish_run(run.id, "interrupted", step=3, losses=[0.3, 0.2, 0.1])
    checkpoint = store.run_dir("robot", run.id) / CHECKPOINT_NAME
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"not read: the refusal comes first")
    return store.get_run("robot", run.id)
