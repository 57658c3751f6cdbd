"""Cross-attention map capture on the UNet's `attn2` layers, and subject masks (METHOD.md, section 2).

Only the cross-attention layers (`...attn2.processor`) get the recording processor, which computes the
attention probabilities eagerly (they are small: pixels x 77 tokens). Self-attention (`attn1`) keeps its
fast scaled-dot-product processor, where a materialised pixels x pixels map per head would be ruinous.

This module takes tensors and models; it never touches the store and never prints.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

from stencil_cli.base.errors import BadInputError
from stencil_cli.core.families import Embedding, cat, rows, unet_inputs

DEFAULT_THRESHOLD = 0.2  # p_t in the paper
DEFAULT_MASK_TIMESTEP = 50  # the small timestep the reference code noises the latent to
MaskFrom = Literal["caption", "both"]  # caption: the paper ("conditioned on C"); both: the authors' CFG batch
MASK_FROM: tuple[MaskFrom, ...] = get_args(MaskFrom)
END_OF_WORD = "</w>"


# -- subject tokens ------------------------------------------------------------------------------


def _token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [str(token) for token in tokenizer.convert_ids_to_tokens(list(ids))]


def find_phrase_positions(tokenizer: Any, caption: str, phrase: str) -> list[int]:
    """Token positions (in the padded caption encoding) of every occurrence of `phrase` in `caption`.

    The phrase is tokenised on its own and searched for as a whole-word run of tokens in the caption's
    tokens, so a phrase the tokenizer splits into several pieces, or one that appears twice, works.
    Raises BadInputError when the caption does not contain the phrase (within the text encoder's window).
    """
    phrase = (phrase or "").strip()
    if not phrase:
        raise BadInputError(
            "the subject has no phrase: set one with `stencil add NAME {add.phrase=WORDS}`",
            fields=("add.phrase",),
        )
    phrase_ids = list(tokenizer(phrase, add_special_tokens=False)["input_ids"])
    if not phrase_ids:
        raise BadInputError(f"the subject phrase {phrase!r} gives no tokens")
    max_length = int(getattr(tokenizer, "model_max_length", 77) or 77)
    caption_ids = list(
        tokenizer(caption, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    )
    tokens = _token_strings(tokenizer, caption_ids)
    word_based = any(token.endswith(END_OF_WORD) for token in tokens)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    positions: list[int] = []
    width = len(phrase_ids)
    for start in range(len(caption_ids) - width + 1):
        if caption_ids[start : start + width] != phrase_ids:
            continue
        if word_based and start > 0:
            previous = caption_ids[start - 1]
            # whole words only: the token before ends a word or is special ("cat" is not in "bobcat")
            if previous not in special and not tokens[start - 1].endswith(END_OF_WORD):
                continue
        positions.extend(range(start, start + width))
    if not positions:
        untruncated = len(tokenizer(caption)["input_ids"])
        if untruncated > max_length and phrase.lower() in caption.lower():
            raise BadInputError(
                f"the subject phrase {phrase!r} falls after the text encoder's {max_length}-token limit "
                f"in the caption {caption[:60]!r}...; shorten the caption"
            )
        raise BadInputError(
            f"the caption {caption!r} does not contain the subject phrase {phrase!r}; "
            "edit the caption or re-run `stencil caption`"
        )
    return sorted(set(positions))


def token_weights(
    tokenizer: Any, captions: Sequence[str], phrase: str, *, seq_len: int | None = None
) -> torch.Tensor:
    """A (len(captions), seq_len) float tensor: 1/k on each of the phrase's k token positions, else 0."""
    length = seq_len or int(getattr(tokenizer, "model_max_length", 77) or 77)
    weights = torch.zeros(len(captions), length)
    for row, caption in enumerate(captions):
        positions = [p for p in find_phrase_positions(tokenizer, caption, phrase) if p < length]
        weights[row, positions] = 1.0 / len(positions)
    return weights


# -- recording processor -------------------------------------------------------------------------


@dataclass
class AttentionRecorder:
    """Collects, per `attn2` layer, the subject tokens' attention map averaged over heads and tokens.

    `weights` is (batch, seq_len): how much each text token counts (see `token_weights`). `maps` maps a
    layer name to a list of (batch, pixels) tensors, one per forward pass.
    """

    weights: torch.Tensor
    maps: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def record(self, layer: str, probs: torch.Tensor, batch: int, heads: int) -> None:
        """Reduce (batch*heads, pixels, tokens) probabilities to (batch, pixels) and keep them."""
        probs = probs.float().reshape(batch, heads, probs.shape[1], probs.shape[2]).mean(dim=1)
        weights = self.weights.to(device=probs.device, dtype=probs.dtype)
        if weights.shape[0] != batch:
            if batch % weights.shape[0]:
                raise ValueError(f"token weights for {weights.shape[0]} captions, batch of {batch}")
            weights = weights.repeat(batch // weights.shape[0], 1)
        tokens = probs.shape[-1]
        reduced = torch.einsum("bpt,bt->bp", probs, weights[:, :tokens])
        self.maps.setdefault(layer, []).append(reduced.detach())

    def clear(self) -> None:
        """Forget every recorded map."""
        self.maps.clear()


class RecordingCrossAttnProcessor:
    """An eager attention processor (like diffusers' AttnProcessor) that records the probabilities."""

    def __init__(self, recorder: AttentionRecorder, layer: str) -> None:
        self.recorder = recorder
        self.layer = layer

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Attention output, exactly as the eager processor computes it, plus a recorded map."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        sequence_length = (
            hidden_states.shape[1] if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)
        if is_cross:
            self.recorder.record(self.layer, probs, batch_size, attn.heads)
        hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_keys(unet: Any) -> list[str]:
    """The processor keys of the UNet's cross-attention (`attn2`) layers."""
    return [key for key in unet.attn_processors if key.endswith("attn2.processor")]


@contextmanager
def record_cross_attention(unet: Any, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
    """Within the block, the UNet's `attn2` layers record into `recorder`; every other layer is untouched."""
    original = dict(unet.attn_processors)
    keys = cross_attention_keys(unet)
    if not keys:
        raise ValueError("this UNet has no cross-attention (attn2) layers to record")
    processors = dict(original)
    for key in keys:
        processors[key] = RecordingCrossAttnProcessor(recorder, key.removesuffix(".processor"))
    unet.set_attn_processor(processors)  # pops entries from the dict it is given
    try:
        yield recorder
    finally:
        unet.set_attn_processor(dict(original))


# -- masks ---------------------------------------------------------------------------------------


def map_shape(pixels: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of a layer with `pixels` positions, for a latent of size `latent_hw`."""
    lh, lw = latent_hw
    factor = math.sqrt(lh * lw / pixels)
    for f in (round(factor), math.ceil(factor), math.floor(factor)):
        if f >= 1:
            h, w = math.ceil(lh / f), math.ceil(lw / f)
            if h * w == pixels:
                return h, w
    side = math.isqrt(pixels)
    if side * side == pixels:
        return side, side
    raise ValueError(f"cannot place {pixels} attention positions on a {lh}x{lw} latent")


def default_common_size(latent_hw: tuple[int, int], map_sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The resolution maps are combined at: latent/4 (16x16 at 512 px), never finer than needed."""
    lh, lw = latent_hw
    smallest = min(map_sizes, key=lambda hw: hw[0] * hw[1]) if map_sizes else (1, 1)
    return max(lh // 4, smallest[0], 1), max(lw // 4, smallest[1], 1)


def combine_maps(
    layer_maps: Sequence[torch.Tensor],
    latent_hw: tuple[int, int],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    common_size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn per-layer (batch, h, w) maps into masks.

    Every layer's map is resized (bilinear) to one common resolution, the layers are averaged, each map is
    min-max normalised to [0, 1] and thresholded at `threshold`; the binary mask is resized (nearest, so it
    stays binary) to the latent size. Returns (masks (batch, 1, H, W) in {0, 1}, normalised maps
    (batch, h, w) in [0, 1]).
    """
    if not layer_maps:
        raise ValueError("no attention maps were recorded")
    sizes = [(m.shape[-2], m.shape[-1]) for m in layer_maps]
    common = common_size or default_common_size(latent_hw, sizes)
    resized = []
    for layer_map in layer_maps:
        x = layer_map.float().unsqueeze(1)
        if tuple(x.shape[-2:]) != tuple(common):
            shrinking = x.shape[-2] > common[0] or x.shape[-1] > common[1]
            x = F.interpolate(x, size=common, mode="bilinear", align_corners=False, antialias=shrinking)
        resized.append(x)
    combined = torch.stack(resized).mean(dim=0)  # (batch, 1, h, w)
    flat = combined.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    normalised = ((flat - low) / (high - low).clamp_min(1e-12)).view_as(combined)
    binary = (normalised >= threshold).float()
    masks = F.interpolate(binary, size=tuple(latent_hw), mode="nearest")
    return masks, normalised.squeeze(1)


def recorded_layer_maps(recorder: AttentionRecorder, latent_hw: tuple[int, int]) -> list[torch.Tensor]:
    """The recorder's maps as (batch, h, w) grids, one per layer (passes of a layer are averaged)."""
    grids = []
    for per_pass in recorder.maps.values():
        reduced = torch.stack(per_pass).mean(dim=0)
        h, w = map_shape(reduced.shape[-1], latent_hw)
        grids.append(reduced.view(reduced.shape[0], h, w))
    return grids


def average_halves(recorder: AttentionRecorder) -> None:
    """Replace every recorded (2b, pixels) map of a [empty, caption] batch by the mean of its two halves."""
    for layer, per_pass in recorder.maps.items():
        recorder.maps[layer] = [(m[: m.shape[0] // 2] + m[m.shape[0] // 2 :]) / 2 for m in per_pass]


@dataclass
class MaskResult:
    """Masks for a set of photos: binary latent-size masks and the normalised attention maps."""

    masks: torch.Tensor  # (n, 1, H, W), values in {0, 1}
    maps: torch.Tensor  # (n, h, w), values in [0, 1]


@torch.no_grad()
def compute_masks(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    embeddings: Embedding,
    weights: torch.Tensor,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    timestep: int = DEFAULT_MASK_TIMESTEP,
    seed: int = 0,
    batch_size: int = 1,
    mask_from: MaskFrom = "caption",
    empty_embedding: Embedding | None = None,
) -> MaskResult:
    """Subject masks from one frozen UNet pass per photo on its latent noised to `timestep`.

    `latents` (n, c, H, W) are the scaled VAE latents, `embeddings` (n, seq, d) the caption embeddings and
    `weights` (n, seq) the subject-token weights (see `token_weights`). The noise comes from a CPU generator
    seeded with `seed`, so the masks are reproducible.

    `mask_from`: "caption" (default, the paper) conditions the pass on the caption alone; "both" runs the
    authors' classifier-free-guidance batch [empty prompt, caption] (`empty_embedding`, (1, seq, d)) and
    averages each layer's map over the two halves, the empty prompt's attention at the subject's token
    positions included, as the authors' code does.
    """
    if mask_from not in MASK_FROM:
        raise BadInputError(f"mask_from must be one of {', '.join(MASK_FROM)} (got {mask_from!r})")
    if mask_from == "both" and empty_embedding is None:
        raise ValueError("mask_from='both' needs the empty prompt's embedding")
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    dtype = next(unet.parameters()).dtype
    device = latents.device
    latent_hw = (latents.shape[-2], latents.shape[-1])
    masks, maps = [], []
    for start in range(0, latents.shape[0], batch_size):
        stop = min(start + batch_size, latents.shape[0])
        t = torch.full((stop - start,), timestep, dtype=torch.long, device=device)
        # METHOD.md: the noised latent goes into the UNet (the reference code feeds the clean one by mistake)
        noisy = scheduler.add_noise(latents[start:stop].float(), noise[start:stop].to(device), t)
        recorder = AttentionRecorder(weights[start:stop].to(device))
        context = embeddings[start:stop].to(device, dtype)
        if mask_from == "both":
            assert empty_embedding is not None
            empty = rows(empty_embedding.to(device, dtype), stop - start)
            noisy, t, context = torch.cat([noisy, noisy]), torch.cat([t, t]), cat([empty, context])
        with record_cross_attention(unet, recorder):
            unet(noisy.to(dtype), t, **unet_inputs(context))
        if mask_from == "both":
            average_halves(recorder)
        mask, soft = combine_maps(recorded_layer_maps(recorder, latent_hw), latent_hw, threshold=threshold)
        masks.append(mask)
        maps.append(soft)
    return MaskResult(masks=torch.cat(masks), maps=torch.cat(maps))
