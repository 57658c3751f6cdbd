"""The draft model's prompt window: how many tokens of the draft prompt it reads, from its tokenizers.

A text-to-image pipeline encodes the prompt with one or more tokenizers and truncates each at its window:
a CLIP tokenizer at ``model_max_length`` (77), a T5 tokenizer at the pipeline's ``max_sequence_length``
(SD3: 256, FLUX: 512, FLUX.1-schnell's card: 256; never past the tokenizer's own ``model_max_length``).
The window is the smallest among the encoders whose *sequence* the denoiser attends to, so no encoder
loses the user's context:

* SD3 / SD3.5: CLIP-L and CLIP-G give sequences (77 tokens) beside T5's: the window is 77 (with or
  without T5), as it always was;
* FLUX: CLIP-L gives only the pooled vector (of the first 77 tokens); the sequence is T5's alone, so the
  window is T5's (256 for FLUX.1-schnell, 512 for FLUX by default);
* any other pipeline: the smallest window among all its tokenizers.

No store, no flags, no printing: a pipeline in, a `PromptWindow` out.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from stencil_cli.core.prompts import TokenCounter, clip_token_counter

TOKENIZER_NAMES = ("tokenizer", "tokenizer_2", "tokenizer_3")
UNBOUNDED = 10**6  # a tokenizer saved without model_max_length reports ~1e30: no window of its own


@dataclass(frozen=True)
class PromptWindow:
    """How many tokens the draft model reads, and the tokenizer that counts them."""

    limit: int
    count_tokens: TokenCounter
    tokenizer: str  # which of the pipeline's tokenizers sets the window (``tokenizer_2`` ...)


def sequence_tokenizers(pipe: Any) -> list[str]:
    """The names of the pipeline's tokenizers whose encoders' sequences the denoiser reads (see above)."""
    present = [name for name in TOKENIZER_NAMES if getattr(pipe, name, None) is not None]
    if type(pipe).__name__.startswith("Flux"):  # CLIP (``tokenizer``) is pooled only in FLUX pipelines
        return [name for name in present if name != "tokenizer"] or present
    return present


def _is_t5_like(tokenizer: Any) -> bool:
    """Whether a tokenizer is truncated at the pipeline's ``max_sequence_length`` (T5 and other non-CLIP)."""
    return "CLIP" not in type(tokenizer).__name__


def _call_default(pipe: Any, name: str) -> Any:
    parameter = inspect.signature(pipe.__call__).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def tokenizer_window(pipe: Any, tokenizer: Any, max_sequence_length: int | None = None) -> int | None:
    """How many tokens the pipeline keeps of this tokenizer's encoding (None: no window is known)."""
    own = int(getattr(tokenizer, "model_max_length", 0) or 0)
    own = own if 0 < own < UNBOUNDED else None
    if not _is_t5_like(tokenizer):
        return own
    sequence = max_sequence_length or _call_default(pipe, "max_sequence_length")
    windows = [w for w in (own, sequence) if isinstance(w, int) and w > 0]
    return min(windows) if windows else None


def draft_prompt_window(pipe: Any, max_sequence_length: int | None = None) -> PromptWindow | None:
    """The draft pipeline's prompt window (None: it has no tokenizer with a known window).

    `max_sequence_length`: the T5 window the draft is rendered with (None: the pipeline's default)."""
    best: tuple[int, str] | None = None
    for name in sequence_tokenizers(pipe):
        window = tokenizer_window(pipe, getattr(pipe, name), max_sequence_length)
        if window is not None and (best is None or window < best[0]):
            best = (window, name)
    if best is None:
        return None
    limit, name = best
    return PromptWindow(limit, clip_token_counter(getattr(pipe, name)), name)
