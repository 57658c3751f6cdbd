"""A plain PyTorch training loop doing the work of stencil's training step: stencil must be at least as fast.

Decoder-only Adam (PyTorch's defaults), precomputed latents, caption embeddings and masks, the masked loss,
`zero_grad()` as the tutorials write it; nothing else (no autocast, no checkpoints, no progress). It imports
nothing from ``stencil_cli``; `benchmarks/run.py` times it beside stencil's `train_unet`.
"""

from __future__ import annotations

from typing import Any

import torch


def plain_train(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    embeddings: torch.Tensor,
    masks: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float = 2e-5,
    seed: int = 0,
) -> list[float]:
    """Train `unet`'s `up_blocks` for `steps` steps with the masked loss; return the losses."""
    device = next(unet.parameters()).device
    latents, embeddings, masks = latents.to(device), embeddings.to(device), masks.to(device)
    params = []
    for name, param in unet.named_parameters():
        param.requires_grad_(name.startswith("up_blocks."))
        if param.requires_grad:
            params.append(param)
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator("cpu").manual_seed(seed)
    n = latents.shape[0]
    losses = []
    unet.train()
    try:
        for _ in range(steps):
            if n >= batch_size:
                index = torch.randperm(n, generator=generator)[:batch_size]
            else:
                index = torch.randint(0, n, (batch_size,), generator=generator)
            noise = torch.randn((batch_size, *latents.shape[1:]), generator=generator).to(device)
            timesteps = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)
            index = index.to(device)
            noisy = scheduler.add_noise(latents[index], noise, timesteps)
            prediction = unet(noisy, timesteps, encoder_hidden_states=embeddings[index]).sample
            loss = ((masks[index] * (noise - prediction)) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        unet.eval()
        unet.requires_grad_(False)
    return losses
