"""Subject-model families (SD1.5, SDXL): what differs between them, behind one small interface.

Every method step (masks, the masked fine-tune, DDIM inversion + null-text optimisation, the guided denoise)
calls the UNet through `unet_inputs` and encodes text through `family_of(pipe)`, so SD1.5 and SDXL share one
code path. What differs per family:

* text encoding: SD1.5 gives one CLIP encoder's hidden states, a plain tensor (as before families existed);
  SDXL gives a `Conditioning`: both encoders' penultimate hidden states side by side, the second encoder's
  pooled projection and the ``add_time_ids`` (original size, crop corner, target size);
* the unconditional ("null") embedding: SD1.5 encodes the empty prompt; SDXL, like its diffusers pipeline
  (``force_zeros_for_empty_prompt``), uses zeros for the empty negative prompt;
* the native resolution (the UNet's sample size times the VAE factor: 512 / 1024);
* the decoder (``up_blocks`` in both) and the DDIM settings (the same betas in both; `models.scheduler`).

Null-text optimisation optimises every floating-point part of the null embedding that the UNet reads from
the text: the hidden states, and for SDXL also the pooled embedding (`Conditioning.optimisable`); the
time ids are image geometry, not text, and stay fixed. Tensors and pipelines only: no store, no printing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Union

import torch

from stencil_cli.models.scheduler import SD15_DDIM_SETTINGS

FamilyName = Literal["sd15", "sdxl"]
DECODER_PREFIX = "up_blocks."  # the UNet decoder in both families (METHOD.md: only the decoder is trained)


@dataclass
class Conditioning:
    """SDXL's text conditioning: hidden states, the pooled embedding and the size/crop time ids."""

    hidden: torch.Tensor  # (b, tokens, 2048): both encoders' penultimate hidden states, concatenated
    pooled: torch.Tensor  # (b, 1280): the second encoder's projected end-of-text state
    time_ids: torch.Tensor  # (b, 6): original (h, w), crop top-left (y, x), target (h, w)

    @property
    def shape(self) -> torch.Size:
        """The hidden states' shape (the batch is ``shape[0]``)."""
        return self.hidden.shape

    def _map(self, fn: Any) -> Conditioning:
        return Conditioning(fn(self.hidden), fn(self.pooled), fn(self.time_ids))

    def __getitem__(self, index: Any) -> Conditioning:
        """The rows `index` of every part."""
        return self._map(lambda t: t[index])

    def __setitem__(self, index: Any, value: Conditioning) -> None:
        """Overwrite the rows `index` of every part (in place)."""
        self.hidden[index] = value.hidden
        self.pooled[index] = value.pooled
        self.time_ids[index] = value.time_ids

    def to(self, *args: Any, **kwargs: Any) -> Conditioning:
        """Every part moved/cast like ``Tensor.to``; the time ids keep their values (they are integers)."""
        return self._map(lambda t: t.to(*args, **kwargs))

    def float(self) -> Conditioning:
        """Every part as float32."""
        return self._map(lambda t: t.float())

    def detach(self) -> Conditioning:
        """Every part detached from autograd."""
        return self._map(lambda t: t.detach())

    def clone(self) -> Conditioning:
        """A copy of every part."""
        return self._map(lambda t: t.clone())

    def expand(self, n: int, *_: Any) -> Conditioning:
        """A batch of one repeated `n` times (a view, like ``Tensor.expand``)."""
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    def requires_grad_(self, flag: bool = True) -> Conditioning:
        """Make the optimisable parts leaves that need a gradient; returns self."""
        for part in self.optimisable():
            part.requires_grad_(flag)
        return self

    def optimisable(self) -> list[torch.Tensor]:
        """The parts null-text optimisation optimises: the hidden states and the pooled embedding."""
        return [self.hidden, self.pooled]


Embedding = Union[torch.Tensor, Conditioning]  # noqa: UP007 - a runtime alias


def optimisable(embedding: Embedding) -> list[torch.Tensor]:
    """The tensors of `embedding` that null-text optimisation optimises."""
    return embedding.optimisable() if isinstance(embedding, Conditioning) else [embedding]


def cat(embeddings: Sequence[Embedding]) -> Embedding:
    """Concatenate embeddings along the batch (tensors or `Conditioning`s, not mixed)."""
    if isinstance(embeddings[0], Conditioning):
        parts = [e for e in embeddings if isinstance(e, Conditioning)]
        return Conditioning(
            torch.cat([e.hidden for e in parts]),
            torch.cat([e.pooled for e in parts]),
            torch.cat([e.time_ids for e in parts]),
        )
    return torch.cat(list(embeddings))  # type: ignore[arg-type]


def rows(embedding: Embedding, n: int) -> Embedding:
    """`embedding` with batch `n` (a batch of one is repeated; a batch of `n` is kept)."""
    if embedding.shape[0] == n:
        return embedding
    if embedding.shape[0] != 1:
        raise ValueError(f"expected a batch of 1 or {n}, got {embedding.shape[0]}")
    return embedding.expand(n, *embedding.shape[1:])


def unet_inputs(embedding: Embedding, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The UNet's text keyword arguments: ``encoder_hidden_states`` and, for SDXL, ``added_cond_kwargs``."""
    if isinstance(embedding, Conditioning):
        cast = embedding.to(dtype) if dtype is not None else embedding
        return {
            "encoder_hidden_states": cast.hidden,
            "added_cond_kwargs": {"text_embeds": cast.pooled, "time_ids": cast.time_ids},
        }
    return {"encoder_hidden_states": embedding.to(dtype) if dtype is not None else embedding}


# -- the families ---------------------------------------------------------------------------------------


class SD15Family:
    """Stable Diffusion 1.5: one CLIP text encoder, no pooled embedding, 512 px."""

    name: FamilyName = "sd15"
    native_resolution = 512
    decoder_prefix = DECODER_PREFIX
    ddim_settings = SD15_DDIM_SETTINGS  # METHOD.md's DDIM

    @torch.no_grad()
    def encode(self, pipe: Any, prompts: Sequence[str], resolution: int) -> torch.Tensor:
        """The text encoder's last hidden states of `prompts`, padded to the tokenizer's length (fp32)."""
        tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
        device = next(text_encoder.parameters()).device
        ids = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        return text_encoder(ids)[0].float()

    @torch.no_grad()
    def encode_prompt(self, pipe: Any, prompt: str, device: torch.device, resolution: int) -> torch.Tensor:
        """One prompt through the pipeline's own ``encode_prompt`` (shape [1, tokens, dim])."""
        embeds, _ = pipe.encode_prompt(prompt, device, 1, False)
        return embeds

    def unconditional(self, pipe: Any, negative: str, device: torch.device, resolution: int) -> torch.Tensor:
        """The unconditional embedding: the (empty or negative) prompt encoded."""
        return self.encode_prompt(pipe, negative, device, resolution)


class SDXLFamily:
    """Stable Diffusion XL: two CLIP encoders, a pooled embedding and time ids, 1024 px."""

    name: FamilyName = "sdxl"
    native_resolution = 1024
    decoder_prefix = DECODER_PREFIX
    ddim_settings = SD15_DDIM_SETTINGS  # SDXL's published betas are SD1.5's: the method's DDIM as it is

    @staticmethod
    def time_ids(resolution: int, batch: int, device: torch.device) -> torch.Tensor:
        """``add_time_ids`` of a centre-cropped square image: (R, R, 0, 0, R, R) per row."""
        row = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
        return row.to(device).expand(batch, 6).clone()

    @torch.no_grad()
    def _encode(self, pipe: Any, prompts: list[str], device: torch.device, resolution: int) -> Conditioning:
        hidden, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Conditioning(hidden.float(), pooled.float(), self.time_ids(resolution, len(prompts), device))

    def encode(self, pipe: Any, prompts: Sequence[str], resolution: int) -> Conditioning:
        """Both encoders' hidden states, the pooled embedding and the time ids of `prompts` (fp32)."""
        device = next(pipe.text_encoder_2.parameters()).device
        return self._encode(pipe, list(prompts), device, resolution)

    def encode_prompt(self, pipe: Any, prompt: str, device: torch.device, resolution: int) -> Conditioning:
        """One prompt's conditioning (batch 1) on `device`."""
        return self._encode(pipe, [prompt], device, resolution).to(device)

    def unconditional(self, pipe: Any, negative: str, device: torch.device, resolution: int) -> Conditioning:
        """The unconditional embedding: zeros for the empty prompt (as SDXL's pipeline), else `negative`."""
        encoded = self.encode_prompt(pipe, negative, device, resolution)
        if negative or not getattr(pipe.config, "force_zeros_for_empty_prompt", True):
            return encoded
        zeros = torch.zeros_like
        return replace(encoded, hidden=zeros(encoded.hidden), pooled=zeros(encoded.pooled))


SubjectFamily = Union[SD15Family, SDXLFamily]  # noqa: UP007 - a runtime alias
FAMILIES: dict[FamilyName, SubjectFamily] = {"sd15": SD15Family(), "sdxl": SDXLFamily()}


def is_sdxl_unet(unet: Any) -> bool:
    """Whether `unet` is SDXL-shaped (it reads pooled text embeddings and time ids)."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def family_of(pipe: Any) -> SubjectFamily:
    """The family of a loaded subject pipeline (SDXL when its UNet takes time ids, else SD1.5)."""
    return FAMILIES["sdxl" if is_sdxl_unet(pipe.unet) else "sd15"]
