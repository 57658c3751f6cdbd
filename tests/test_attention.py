"""Cross-attention capture on attn2 layers and subject masks (METHOD.md section 2), on the tiny preset."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from stencil_cli.base.errors import BadInputError
from stencil_cli.core.attention import (
    AttentionRecorder,
    RecordingCrossAttnProcessor,
    combine_maps,
    compute_masks,
    cross_attention_keys,
    find_phrase_positions,
    record_cross_attention,
    recorded_layer_maps,
    token_weights,
)
from stencil_cli.core.families import family_of, unet_inputs
from stencil_cli.models import native_resolution


def _tokens(pipe, caption: str, positions: list[int]) -> str:
    ids = pipe.tokenizer(caption, padding="max_length", max_length=77)["input_ids"]
    return "".join(pipe.tokenizer.convert_ids_to_tokens([ids[p] for p in positions]))


def test_phrase_positions_cover_every_token_of_a_split_phrase(tiny_subject_pipe) -> None:
    """The tiny tokenizer splits 'toy robot' into many byte tokens: all of them are found."""
    positions = find_phrase_positions(tiny_subject_pipe.tokenizer, "a toy robot on a desk", "toy robot")
    assert len(positions) == len("toyrobot")  # one token per letter, spaces end words
    assert positions == list(range(positions[0], positions[0] + len(positions)))
    assert _tokens(tiny_subject_pipe, "a toy robot on a desk", positions) == "toy</w>robot</w>"


def test_phrase_appearing_twice_gives_both_occurrences(tiny_subject_pipe) -> None:
    """Both occurrences are used; case is ignored as the CLIP tokenizer lowercases."""
    once = find_phrase_positions(tiny_subject_pipe.tokenizer, "a cat", "cat")
    twice = find_phrase_positions(tiny_subject_pipe.tokenizer, "a Cat next to another cat.", "cat")
    assert len(once) == 3 and len(twice) == 6
    assert _tokens(tiny_subject_pipe, "a Cat next to another cat.", twice) == "cat</w>cat</w>"


def test_phrase_matches_whole_words_only(tiny_subject_pipe) -> None:
    """'cat' inside 'bobcat' is not the subject; the separate word is."""
    positions = find_phrase_positions(tiny_subject_pipe.tokenizer, "a bobcat and a cat", "cat")
    assert len(positions) == 3
    assert positions[0] == 1 + len("abobcatanda")  # BOS, then one token per letter (spaces end words)


def test_caption_without_the_phrase_is_a_clear_error(tiny_subject_pipe) -> None:
    """A caption that lacks the phrase raises BadInputError naming both."""
    with pytest.raises(BadInputError, match="does not contain the subject phrase 'cat'"):
        find_phrase_positions(tiny_subject_pipe.tokenizer, "a dog on the grass", "cat")
    with pytest.raises(BadInputError):
        token_weights(tiny_subject_pipe.tokenizer, ["a cat", "a dog"], "cat")


def test_token_weights_average_the_phrase_tokens(tiny_subject_pipe) -> None:
    """Each row sums to 1 and is spread evenly over the phrase's tokens."""
    weights = token_weights(tiny_subject_pipe.tokenizer, ["a cat", "cat and cat"], "cat")
    assert weights.shape == (2, 77)
    assert torch.allclose(weights.sum(dim=1), torch.ones(2))
    assert (weights[0] > 0).sum() == 3 and (weights[1] > 0).sum() == 6


def test_only_attn2_layers_record_and_everything_is_restored(family_pipe) -> None:
    """attn1 keeps its SDPA processor, attn2 records (every transformer layer of every block, SDXL's
    many-layer blocks included); the output is unchanged; processors come back."""
    unet = family_pipe.unet
    before = dict(unet.attn_processors)
    keys = cross_attention_keys(unet)
    assert keys and all(key.endswith("attn2.processor") for key in keys)
    assert len(keys) == sum(1 for name, _ in unet.named_modules() if name.endswith(".attn2"))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = family_of(family_pipe).encode(family_pipe, ["a toy robot"], native_resolution(family_pipe))
    with torch.no_grad():
        plain = unet(latents, 10, **unet_inputs(text)).sample
    recorder = AttentionRecorder(torch.full((1, 77), 1 / 77))
    with record_cross_attention(unet, recorder), torch.no_grad():
        during = dict(unet.attn_processors)
        recorded = unet(latents, 10, **unet_inputs(text)).sample
    for key, processor in during.items():
        if key.endswith("attn2.processor"):
            assert isinstance(processor, RecordingCrossAttnProcessor)
        else:
            assert processor is before[key] and isinstance(processor, AttnProcessor2_0)
    assert set(recorder.maps) == {key.removesuffix(".processor") for key in keys}
    assert torch.allclose(plain, recorded, atol=1e-5)
    assert all(unet.attn_processors[key] is before[key] for key in before)


def test_mask_shape_and_range(family_pipe) -> None:
    """Masks are latent-sized and binary; the normalised maps span [0, 1] (both families)."""
    pipe = family_pipe
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    captions = ["a toy robot", "the toy robot on grass", "toy robot and toy robot"]
    embeddings = family_of(pipe).encode(pipe, captions, native_resolution(pipe))
    weights = token_weights(pipe.tokenizer, captions, "toy robot")
    result = compute_masks(pipe.unet, pipe.scheduler, latents, embeddings, weights, threshold=0.2, seed=0)
    assert result.masks.shape == (3, 1, 8, 8)
    assert set(result.masks.unique().tolist()) <= {0.0, 1.0}
    assert result.masks.flatten(1).max(dim=1).values.eq(1).all()  # the peak is always inside
    assert result.maps.min() >= 0 and result.maps.max() <= 1
    assert torch.allclose(result.maps.flatten(1).amin(dim=1), torch.zeros(3))
    assert torch.allclose(result.maps.flatten(1).amax(dim=1), torch.ones(3))
    again = compute_masks(pipe.unet, pipe.scheduler, latents, embeddings, weights, threshold=0.2, seed=0)
    assert torch.equal(result.masks, again.masks)  # reproducible
    stricter = compute_masks(pipe.unet, pipe.scheduler, latents, embeddings, weights, threshold=0.9, seed=0)
    assert stricter.masks.sum() <= result.masks.sum()


def _hand_built_cross_attention(region: torch.Tensor) -> tuple[Attention, torch.Tensor, torch.Tensor]:
    """An attention layer whose pixels in `region` (a 4x4 bool grid) attend to text token 2."""
    attn = Attention(query_dim=4, cross_attention_dim=4, heads=1, dim_head=4, bias=False)
    with torch.no_grad():
        attn.to_q.weight.copy_(torch.eye(4) * 4.0)
        attn.to_k.weight.copy_(torch.eye(4))
    pixels = torch.zeros(1, 16, 4)
    pixels[0, region.flatten(), 0] = 1.0  # subject pixels look for feature 0
    pixels[0, ~region.flatten(), 1] = 1.0  # background pixels for feature 1, which no token has
    text = torch.zeros(1, 5, 4)
    text[0, 2, 0] = 5.0  # token 2 (the subject) carries feature 0
    text[0, [0, 1, 3, 4], 2] = 1.0
    return attn, pixels, text


def test_mask_lands_where_the_subject_token_attends() -> None:
    """With a hand-built attention pattern, the mask is exactly the region attending to the subject token."""
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[1:3, 2:4] = True
    attn, pixels, text = _hand_built_cross_attention(region)
    weights = torch.zeros(1, 5)
    weights[0, 2] = 1.0
    recorder = AttentionRecorder(weights)
    attn.set_processor(RecordingCrossAttnProcessor(recorder, "hand.attn2"))
    with torch.no_grad():
        attn(pixels, encoder_hidden_states=text)
    layer_maps = recorded_layer_maps(recorder, (4, 4))
    assert layer_maps[0].shape == (1, 4, 4)
    masks, maps = combine_maps(layer_maps, (4, 4), threshold=0.2, common_size=(4, 4))
    assert torch.equal(masks[0, 0].bool(), region)
    # another token position gives a different (here: empty-of-region) map
    other = torch.zeros(1, 5)
    other[0, 3] = 1.0
    recorder_other = AttentionRecorder(other)
    attn.set_processor(RecordingCrossAttnProcessor(recorder_other, "hand.attn2"))
    with torch.no_grad():
        attn(pixels, encoder_hidden_states=text)
    other_masks, _ = combine_maps(recorded_layer_maps(recorder_other, (4, 4)), (4, 4), common_size=(4, 4))
    assert not torch.equal(other_masks[0, 0].bool(), region)


def test_layers_of_different_resolutions_combine_and_resize_to_the_latent() -> None:
    """A blob seen by a coarse and a fine layer ends up in the same corner of a larger latent mask."""
    fine = torch.zeros(1, 8, 8)
    fine[0, :4, :4] = 1.0
    coarse = torch.zeros(1, 4, 4)
    coarse[0, :2, :2] = 1.0
    masks, maps = combine_maps([fine, coarse], (16, 16), threshold=0.2)
    assert masks.shape == (1, 1, 16, 16) and maps.shape == (1, 4, 4)
    assert masks[0, 0, :8, :8].all() and not masks[0, 0, 8:, :].any() and not masks[0, 0, :, 8:].any()
