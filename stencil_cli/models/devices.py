"""Devices and precision: turn ``auto|cpu|cuda[:N]|mps`` and ``auto|fp32|fp16|bf16`` into torch objects.

Also the small runtime helpers every pipeline user needs: silence the libraries, free a pipeline, read a
subject model's native resolution. torch is imported inside the functions, so importing this is cheap.
"""

from __future__ import annotations

import contextlib
import gc
import re
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, get_args

from stencil_cli.base.errors import BadInputError, StencilError

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
Precision = Literal["auto", "fp32", "fp16", "bf16"]  # a setting: auto picks by device
DtypeName = Literal["fp32", "fp16", "bf16"]  # a dtype by name: weights files, autocast, exports
PRECISIONS: tuple[Precision, ...] = get_args(Precision)


def resolve_device(name: str) -> torch.device:
    """Turn auto|cpu|cuda|cuda:N|mps into a torch.device; an unavailable device is a clear error."""
    import torch

    name = (name or "auto").strip().lower()
    if not DEVICE_PATTERN.match(name):
        raise BadInputError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise StencilError(
                f"{{device={name}}} was asked for but CUDA is not available on this machine",
                hint="use {device=cpu} (or auto), or install a CUDA build of torch",
                fields=("device",),
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise StencilError(
                f"{{device={name}}}: there are only {torch.cuda.device_count()} CUDA device(s) (cuda:0 ...)",
                fields=("device",),
            )
        return device
    if name == "mps" and not mps_available():
        raise StencilError(
            "{device=mps} was asked for but MPS is not available", hint="use {device=cpu}", fields=("device",)
        )
    return torch.device(name)


def mps_available() -> bool:
    """Whether torch can use Apple's MPS backend here."""
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Pick the dtype for `precision` on `device` (auto: bf16 on capable CUDA, fp16 on mps, fp32 on CPU)."""
    import torch

    precision = (precision or "auto").strip().lower()
    if precision not in PRECISIONS:
        raise BadInputError(f"unknown precision {precision!r}: use auto, fp32, fp16 or bf16")
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        if device.type == "cpu":
            raise BadInputError(
                "fp16 is not supported on the CPU: use {precision=fp32} (or bf16)", fields=("precision",)
            )
        return torch.float16
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise BadInputError(
                "this GPU does not support bf16: use {precision=fp16} or fp32", fields=("precision",)
            )
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def subject_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the (fine-tuned) subject model: like `resolve_dtype`, but `auto` never picks bf16.

    The trained update is ~1/50 of a weight: bf16's 8 significant bits lose part of it, fp16's 10 keep it
    (docs/training.md, benchmarks/bench_precision.py). So `auto` is fp16 on CUDA and MPS, fp32 on the CPU.
    """
    import torch

    if (precision or "auto").strip().lower() == "auto" and device.type in ("cuda", "mps"):
        return torch.float16
    return resolve_dtype(precision, device)


def cpu_computes_bf16() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX), where bf16 matmuls are fast."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume not
        return False


# The narrowest transformer a CPU runs faster in bf16: an SD3-shaped transformer measured 0.8-0.9x at 32 wide,
# 1.4x at 128, 2.1x at 256, 3.4x at 1536 (docs/performance.md)
BF16_MIN_WIDTH = 128


def transformer_width(config: Any) -> int | None:
    """A diffusion transformer's hidden width (heads x head size) from its config (a mapping); None when the
    config has no such keys (a UNet)."""
    try:
        return int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    except (KeyError, TypeError, ValueError):
        return None


def context_dtype(precision: str, device: torch.device, width: int | None = None) -> torch.dtype:
    """The dtype of the frozen context (draft) model: like `resolve_dtype`, but `auto` on a CPU with native
    bf16 arithmetic is bf16, unless its transformer is known to be narrower than `BF16_MIN_WIDTH`.

    The authors draft in half precision (SD3 in float16, models/support_model.py 17-19). On the CPU float16 is
    no compute type (3.5x slower than fp32 on a Zen 4 core) while bf16 is 4.5x faster (docs/performance.md);
    the context model is never trained, so no update is lost to bf16's 8 bits. `width`: the transformer's
    hidden width when known (None: unknown, treated as a real-size model).
    """
    import torch

    auto = (precision or "auto").strip().lower() == "auto"
    narrow = width is not None and width < BF16_MIN_WIDTH
    if auto and device.type == "cpu" and not narrow and cpu_computes_bf16():
        return torch.bfloat16
    return resolve_dtype(precision, device)


def native_resolution(pipe: Any) -> int:
    """The subject model's native image size (512 for SD1.5): UNet sample size x VAE scale factor."""
    factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    return int(pipe.unet.config.sample_size) * factor


def settle_heap() -> None:
    """Move every object alive now (a loaded pipeline's ~400k) out of the garbage collector's scans.

    A full collection over a loaded pipeline takes 0.2-0.9 s on a CPU and finds nothing (modules are freed
    by reference counting); frozen objects are still freed by reference counting when dropped.
    """
    gc.freeze()


def free_pipeline(pipe: Any) -> None:
    """Drop a pipeline's module references and empty the CUDA cache.

    Reference counting frees the models; only when one of them survives (a reference cycle) does a full
    collection run, with the frozen heap unfrozen for it. `pipe=None` collects what is unreachable.
    """
    import torch

    survivors: list[weakref.ref[Any]] = []
    if pipe is not None:
        components = getattr(pipe, "components", None)
        if isinstance(components, dict):
            survivors = [weakref.ref(m) for m in components.values() if isinstance(m, torch.nn.Module)]
            del components
            for name in list(getattr(pipe, "components", {})):
                with contextlib.suppress(Exception):
                    setattr(pipe, name, None)
    if pipe is None or any(ref() is not None for ref in survivors):
        gc.unfreeze()
        gc.collect()
        gc.freeze()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence diffusers/transformers progress bars, info logs and deprecation chatter inside the block."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    d_level, t_level = dlog.get_verbosity(), tlog.get_verbosity()
    d_bars, t_bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        dlog.set_verbosity(d_level)
        tlog.set_verbosity(t_level)
        if d_bars:
            dlog.enable_progress_bar()
        if t_bars:
            tlog.enable_progress_bar()
