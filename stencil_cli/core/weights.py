"""Every trained-weights file: writing it with its metadata, reading it, fitting it to a UNet, LoRA adapters.

A run's weights file is one safetensors file whose metadata names its ``kind``:

- ``full``: the trained parameters themselves (the decoder, ``up_blocks.*``), loaded by copying them in;
- ``lora``: LoRA adapters (peft) on the attention projections ``to_q``, ``to_k``, ``to_v`` and ``to_out.0``
  of the decoder (the layers diffusers' DreamBooth-LoRA script adapts), stored under the UNet's own
  parameter names (``...attn1.to_q.lora_A.default.weight``) with ``lora_rank`` and ``lora_alpha`` in the
  metadata. Loading merges ``W += (alpha / rank) * B @ A`` into the base weights, so the UNet stays a plain
  diffusers UNet and every stage of generation (attention recording, inversion, denoising) works on it
  unchanged.

The metadata header also carries the format, the stencil version, the base model, what was trained and every
training parameter (JSON). Files are written to a temp name and moved into place (never a truncated file);
exports (`core.export`) write their files through `save_trained_weights` too.

This module takes models and tensors; it never touches the store and never prints."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import safetensors.torch
import torch
from safetensors import safe_open

from stencil_cli import __version__
from stencil_cli.base.errors import BadInputError, StencilError
from stencil_cli.base.fsutil import atomic_write_with

WeightsKind = Literal["full", "lora"]
KIND_FULL: WeightsKind = "full"
KIND_LORA: WeightsKind = "lora"
KINDS: tuple[WeightsKind, ...] = get_args(WeightsKind)
WEIGHTS_FORMAT = "stencil-trained-params"
WEIGHTS_FORMAT_VERSION = "1"
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
LORA_DEFAULT_LR = 1e-4  # diffusers' DreamBooth-LoRA examples; the paper's 2e-5 is for full fine-tuning
ADAPTER_NAME = "default"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")


class TrainedWith(Protocol):
    """The training settings a weights file records (`core.training.TrainConfig` is one)."""

    train: str
    save_dtype: str
    lora_rank: int | None

    @property
    def kind(self) -> WeightsKind:
        """``lora`` or ``full``."""
        ...

    @property
    def effective_lora_alpha(self) -> float:
        """The LoRA alpha in use."""
        ...

    def to_params(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict."""
        ...


# -- writing -------------------------------------------------------------------------------------------------


def trained_state(unet: Any, names: Sequence[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The named parameters as contiguous CPU tensors of `dtype` (what goes into the file)."""
    params = dict(unet.named_parameters())
    return {name: params[name].detach().to("cpu", dtype).contiguous() for name in names}


def weights_metadata(
    config: TrainedWith, base_model: str, names: Sequence[str], **extra: Any
) -> dict[str, str]:
    """The metadata header: format, stencil version, base model, training params and what was trained."""
    metadata = {
        "format": WEIGHTS_FORMAT,
        "format_version": WEIGHTS_FORMAT_VERSION,
        "stencil_version": __version__,
        "base_model": base_model,
        "trained": config.train,
        "tensors": str(len(names)),
        "dtype": config.save_dtype,
        "params": json.dumps(config.to_params(), sort_keys=True),
        "kind": config.kind,
    }
    if config.lora_rank:
        metadata["lora_rank"] = str(int(config.lora_rank))
        metadata["lora_alpha"] = str(config.effective_lora_alpha)
        metadata["lora_targets"] = ",".join(LORA_TARGET_MODULES)
    for key, value in extra.items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value)
    return metadata


def save_trained_weights(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> Path:
    """Write tensors and a metadata header as one safetensors file, atomically (never a truncated file)."""
    header = {str(k): str(v) for k, v in metadata.items()}
    data = dict(tensors)
    atomic_write_with(Path(path), lambda tmp: safetensors.torch.save_file(data, str(tmp), metadata=header))
    return Path(path)


def cast_weights_file(path: Path, dtype: torch.dtype, keep: Iterable[str] = ()) -> None:
    """Rewrite a safetensors file in place with its floating-point tensors in `dtype` (its header kept).

    Tensors named in `keep` stay as they are (an export keeps the updates `dtype` would round away)."""
    kept = set(keep)
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        tensors = {
            key: (t.to(dtype) if t.is_floating_point() and key not in kept else t).contiguous()
            for key in handle.keys()  # noqa: SIM118 - a safetensors handle is not a dict
            for t in (handle.get_tensor(key),)
        }
    safetensors.torch.save_file(tensors, str(path), metadata=header)


# -- reading -------------------------------------------------------------------------------------------------


class DamagedWeightsError(StencilError):
    """A weights file that is not readable safetensors (truncated, damaged or another format)."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(f"trained weights file {path} is damaged or not safetensors ({detail})")
        self.path = Path(path)
        self.detail = detail


def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """A weights file's metadata and every tensor's shape, from its header alone (no tensor is read)."""
    path = Path(path)
    if not path.is_file():
        raise StencilError(f"trained weights not found: {path}", hint="train again with `stencil train NAME`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            shapes = {
                key: tuple(handle.get_slice(key).get_shape())
                for key in handle.keys()  # noqa: SIM118 - a safetensors handle is not a dict
            }
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise DamagedWeightsError(path, str(error)) from error
    return metadata, shapes


def read_weights_metadata(path: Path) -> dict[str, str]:
    """The metadata header of a trained-weights file (clear error if missing or damaged)."""
    return read_header(path)[0]


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, from the file's header (clear error if missing or damaged)."""
    return read_header(path)[1]


def read_tensors(path: Any) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (CPU); a tensor holding NaN or infinity is refused."""
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise StencilError(f"cannot read trained weights {path}: {error}") from error
    for name, tensor in tensors.items():
        refuse_non_finite(path, name, tensor)
    return tensors


def refuse_non_finite(path: Any, name: str, tensor: torch.Tensor) -> None:
    """Refuse a weights tensor holding NaN or infinity (a diverged training): it renders NaN images."""
    if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        raise StencilError(
            f"trained weights file {path} holds non-finite values (NaN or infinity) in {name}",
            hint="the training diverged: train again (a lower learning rate, or fp32, keeps it finite)",
        )


def weights_kind(metadata: Mapping[str, str]) -> WeightsKind:
    """``lora`` or ``full`` (files written before LoRA existed are full)."""
    kind = metadata.get("kind", KIND_FULL)
    if kind not in KINDS:
        raise StencilError(f"unknown trained-weights kind {kind!r}: this stencil reads {', '.join(KINDS)}")
    return KIND_LORA if kind == KIND_LORA else KIND_FULL


# -- fitting a file to a UNet --------------------------------------------------------------------------------


def check_fits(
    unet: Any, path: Path, metadata: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """Refuse a full run's tensors that are not parameters of `unet` of the same shapes (names the first)."""
    params = dict(unet.named_parameters())
    trained_on = metadata.get("base_model", "another model")
    unknown = [name for name in shapes if name not in params]
    if unknown:
        raise StencilError(
            f"{path.name} does not fit this UNet (e.g. no parameter {unknown[0]!r}); "
            f"it was trained on {trained_on}"
        )
    for name, shape in shapes.items():
        if tuple(shape) != tuple(params[name].shape):
            raise StencilError(
                f"{path.name} does not fit this UNet: {name} is {tuple(shape)}, "
                f"the model has {tuple(params[name].shape)} (trained on {trained_on})"
            )


def is_full_run(path: Path) -> bool:
    """Whether a weights file holds trained parameters themselves (``full``), not LoRA adapters."""
    return weights_kind(read_header(Path(path))[0]) == KIND_FULL


def full_run_tensors(unet: Any, path: Path) -> dict[str, torch.Tensor]:
    """A full run's trained parameters (CPU, the file's dtype), checked against `unet`'s names and shapes.

    `unet` may live on the meta device: only its parameter names and shapes are looked at.
    """
    path = Path(path)
    metadata, shapes = read_header(path)
    if weights_kind(metadata) != KIND_FULL:
        raise StencilError(f"{path.name} holds LoRA adapters, not trained parameters")
    check_fits(unet, path, metadata, shapes)
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in shapes}
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise StencilError(f"cannot read trained weights {path}: {error}") from error
    for name, tensor in tensors.items():
        refuse_non_finite(path, name, tensor)
    return tensors


def load_trained_weights(unet: Any, path: Path, strength: float = 1.0) -> dict[str, str]:
    """Load a run's trained weights into `unet` (either kind), in its dtype/device; return the metadata.

    A full run's parameters are checked against the UNet (`check_fits`) and copied in; a LoRA run's
    adapters are merged into the base weights (``W += alpha / rank * B @ A``), so the UNet stays a plain
    diffusers UNet. `strength` scales the update: a LoRA's ``B @ A`` (the LoRA scale other tools offer), a
    full run's difference to the base (``W = W_base + strength * (W_trained - W_base)``, the interpolation);
    1.0 is the run as trained.
    """
    path = Path(path)
    metadata, shapes = read_header(path)
    if weights_kind(metadata) == KIND_LORA:
        merge_lora(unet, read_tensors(path), lora_scale(metadata) * strength)
        return metadata
    check_fits(unet, path, metadata, shapes)
    params = dict(unet.named_parameters())
    try:
        with safe_open(str(path), framework="pt") as handle, torch.no_grad():
            for name in shapes:
                target = params[name]
                tensor = handle.get_tensor(name)
                refuse_non_finite(path, name, tensor)
                if strength != 1.0:
                    base = target.float()
                    tensor = base + strength * (tensor.to(device=target.device, dtype=torch.float32) - base)
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    except StencilError:
        raise
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise StencilError(f"cannot read trained weights {path}: {error}") from error
    return metadata


# -- LoRA adapters -------------------------------------------------------------------------------------------


def lora_target_pattern(which: str = "decoder") -> str:
    """The peft ``target_modules`` regex: the attention projections of the decoder (or of the whole UNet)."""
    targets = "|".join(re.escape(name) for name in LORA_TARGET_MODULES)
    scope = r"up_blocks\..*" if which == "decoder" else r".*"
    return rf"{scope}\.(?:{targets})"


def largest_lora_rank(unet: Any, which: str = "decoder") -> int:
    """The highest useful LoRA rank for `unet`: min(in, out) over the layers that LoRA adapts (0 if none)."""
    pattern = re.compile(lora_target_pattern(which))
    sizes = [
        min(module.in_features, module.out_features)
        for name, module in unet.named_modules()
        if pattern.fullmatch(name) and hasattr(module, "in_features")
    ]
    return min(sizes) if sizes else 0


def has_lora(unet: Any) -> bool:
    """Whether peft adapters are injected into `unet`."""
    return any("lora_A" in name for name, _ in unet.named_parameters())


def lora_parameter_names(unet: Any) -> list[str]:
    """The adapter parameters' names (``...lora_A.default.weight``, ``...lora_B.default.weight``)."""
    return [name for name, _ in unet.named_parameters() if ".lora_A." in name or ".lora_B." in name]


def add_lora(unet: Any, rank: int, alpha: float, which: str = "decoder") -> list[str]:
    """Inject LoRA adapters (peft, Gaussian A, zero B) into `unet`; return the adapter parameter names.

    A UNet that already carries stencil's adapter keeps it (a resumed run); the base weights are untouched.
    """
    from peft import LoraConfig  # here, not at the top: peft loads transformers (seconds), only LoRA needs it

    if rank < 1:
        raise BadInputError(f"the LoRA rank must be at least 1 (got {rank})")
    if not has_lora(unet):
        config = LoraConfig(
            r=int(rank),
            lora_alpha=float(alpha),
            init_lora_weights="gaussian",
            target_modules=lora_target_pattern(which),
            lora_dropout=0.0,
        )
        unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    names = lora_parameter_names(unet)
    if not names:
        raise StencilError("this UNet has no attention projections to put LoRA adapters on")
    return names


def lora_pairs(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group LoRA tensors by the module they adapt: ``{module: (A, B)}`` (A: r x in..., B: out x r...)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise StencilError(f"{key!r} is not a LoRA tensor name (expected ...lora_A/lora_B...weight)")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    missing = [module for module, pair in parts.items() if set(pair) != {"A", "B"}]
    if missing:
        raise StencilError(f"LoRA weights for {missing[0]!r} lack their A or B half")
    return {module: (pair["A"], pair["B"]) for module, pair in parts.items()}


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The weight update ``scale * B @ A`` of one adapted layer, shaped like the layer's weight (fp32)."""
    a = down.float().flatten(1)  # (r, in * kh * kw)
    b = up.float().flatten(1)  # (out, r)
    delta = (b @ a) * scale
    return delta.reshape(up.shape[0], *down.shape[1:]) if down.dim() == 4 else delta


def merge_lora(unet: Any, tensors: Mapping[str, torch.Tensor], scale: float) -> int:
    """Add each adapter's ``scale * B @ A`` into the base weight it adapts (in place); return the count."""
    pairs = lora_pairs(tensors)
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for module_name, (down, up) in pairs.items():
            module = modules.get(module_name)
            weight = getattr(module, "weight", None)
            if weight is None:
                raise StencilError(f"the LoRA weights adapt {module_name!r}, which this UNet does not have")
            delta = lora_delta(down, up, scale)
            if tuple(delta.shape) != tuple(weight.shape):
                raise StencilError(
                    f"the LoRA weights for {module_name!r} give {tuple(delta.shape)}, "
                    f"the model's layer is {tuple(weight.shape)}"
                )
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    return len(pairs)


def lora_scale(metadata: Mapping[str, str]) -> float:
    """``alpha / rank`` from a LoRA weights file's metadata."""
    try:
        rank = float(metadata["lora_rank"])
        alpha = float(metadata.get("lora_alpha") or rank)
    except (KeyError, ValueError) as error:
        raise StencilError("the LoRA weights file does not record its rank (lora_rank metadata)") from error
    return alpha / rank
