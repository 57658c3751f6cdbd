"""Export a run's weights in the formats other tools load: diffusers/kohya LoRA, a diffusers folder, one file.

Formats (``FORMATS``):

- ``lora``: a diffusers/peft LoRA safetensors (``unet.<module>.lora_A.weight`` / ``lora_B``) that
  ``StableDiffusionPipeline.load_lora_weights`` reads: diffusers only (ComfyUI maps diffusers names only as
  ``unet.<name>`` with ``.processor.to_`` and A1111 splits a key at its first dot, so both drop its attention
  keys; measured with their loaders by ``benchmarks/interop.py``). A LoRA run exports its adapters
  (alpha / rank folded into ``lora_B``, so every layer has scale 1 and no alphas are needed); a full-decoder
  run is approximated
  by a truncated SVD of the weight difference of every Linear and Conv2d layer of the trained part (as
  kohya's ``extract_lora_from_models.py`` does, without its quantile clamping), rank ``min(R, out, in * kh *
  kw)`` per layer. Biases and normalisation weights cannot be LoRA layers: they are left out and counted in
  the error.
- ``kohya``: the same LoRA with ``lora_unet_...`` names, ``lora_down``/``lora_up`` and ``alpha`` tensors
  (AUTOMATIC1111, ComfyUI, and diffusers' ``load_lora_weights``), converted with diffusers' own
  ``convert_state_dict_to_kohya``. The default: it loads in every tool the docs name.
- ``diffusers``: a complete pipeline folder (``save_pretrained``) with the fine-tuned UNet.
- ``single-file``: one safetensors checkpoint in the original Stable Diffusion layout
  (``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.transformer.``). The names come
  from diffusers' maintained original -> diffusers converters (``diffusers.loaders.single_file_utils``),
  inverted by probing: each candidate original name is fed through the converter and the diffusers name it
  lands on is read back (see ``original_layout_names``).

Every export writes a model card beside it and refuses to replace an existing file unless forced; files are
written to a temp name and moved into place, folders are built in a temp folder and renamed.

This module takes models, tensors and paths; it never touches the store and never prints."""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from stencil_cli import __version__
from stencil_cli.base.errors import BadInputError, StencilError
from stencil_cli.base.fsutil import atomic_write_with, disk_full_as_error, folder_mode
from stencil_cli.core.precision import SAVE_DTYPES
from stencil_cli.core.weights import (
    KIND_LORA,
    LORA_TARGET_MODULES,
    WeightsKind,
    cast_weights_file,
    load_trained_weights,
    lora_delta,
    lora_pairs,
    lora_scale,
    read_tensors,
    read_weights_metadata,
    save_trained_weights,
    weights_kind,
)
from stencil_cli.models.devices import DtypeName

ExportFormat = Literal["lora", "kohya", "diffusers", "single-file"]
FORMATS: tuple[ExportFormat, ...] = get_args(ExportFormat)
LORA_FORMATS: tuple[ExportFormat, ...] = ("lora", "kohya")
DEFAULT_EXTRACT_RANK = 32
CARD_SUFFIX = ".README.md"  # file exports: ``NAME.safetensors`` gets ``NAME.README.md`` beside it
UNET_PREFIX = "unet."


# -- results -------------------------------------------------------------------------------------------------


@dataclass
class ExtractionError:
    """How well a rank-R LoRA reproduces a full run's weight difference (Frobenius norms, relative)."""

    rank: int
    overall: float  # ||D - D_R|| / ||D|| over every trained tensor (left-out tensors count in full)
    worst: float  # the largest per-layer ||D - D_R|| / ||D|| among the LoRA layers
    worst_layer: str
    left_out: float  # ||D|| of the tensors no LoRA layer can carry (biases, norms), relative to ||D||
    left_out_tensors: int
    layers: int  # LoRA layers written


@dataclass
class WrittenExport:
    """What `export_run` wrote: the file (or folder), its model card, its size and header, how it was made."""

    format: ExportFormat
    path: Path
    card: Path
    kind: WeightsKind  # the run's kind
    bytes: int
    rank: int | None = None
    error: ExtractionError | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    kept_fp32: int = 0  # trained tensors the export dtype would round back to the base: written in fp32


# -- validation ----------------------------------------------------------------------------------------------


def card_path(fmt: ExportFormat, target: Path) -> Path:
    """Where the model card of an export to `target` goes."""
    target = Path(target)
    if fmt == "diffusers":
        return target / "README.md"
    return target.with_name(target.stem + CARD_SUFFIX)


def check_request(
    fmt: ExportFormat, target: Path, *, rank: int | None, force: bool, kind: WeightsKind
) -> None:
    """Refuse bad requests before any model work: BadInputError with a plain message."""
    if fmt not in FORMATS:
        raise BadInputError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    target = Path(target)
    if not target.name:
        raise BadInputError("the export path is empty")
    if not target.parent.is_dir():
        raise BadInputError(
            f"the folder {target.parent} does not exist: create it first or pick another path"
        )
    for path in (target, card_path(fmt, target)) if fmt != "diffusers" else (target,):
        if (path.exists() or path.is_symlink()) and not force:
            raise BadInputError(f"{path} already exists: pick another path or allow overwriting (force)")
    if fmt == "diffusers" and target.exists() and not target.is_dir():
        raise BadInputError(f"{target} is a file; a diffusers export is a folder")
    if fmt != "diffusers" and target.is_dir():
        raise BadInputError(f"{target} is a folder; the {fmt} export is one file")
    if rank is not None:
        if fmt not in LORA_FORMATS:
            raise BadInputError(f"rank applies only to the lora and kohya formats (not {fmt})")
        if isinstance(rank, bool) or rank <= 0:
            raise BadInputError(f"rank must be a positive whole number (got {rank})")


def max_extraction_rank(shapes: Iterable[tuple[int, ...]]) -> int:
    """The largest rank any LoRA layer of these weight shapes allows: min(out, in * kh * kw), maximised."""
    return max((min(shape[0], math.prod(shape[1:])) for shape in shapes), default=0)


# -- LoRA: from a LoRA run, or by SVD from a full run --------------------------------------------------------


def _lora_layer_weights(unet: Any, names: Iterable[str]) -> dict[str, str]:
    """``{param name: module name}`` for the trained weights that sit in Linear / Conv2d layers."""
    modules = dict(unet.named_modules())
    layers = {}
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        if leaf == "weight" and isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            layers[name] = module_name
    return layers


def svd_extract(
    base_unet: Any, trained: Mapping[str, torch.Tensor], rank: int
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], ExtractionError]:
    """Approximate ``trained - base`` of every Linear/Conv2d weight by a rank-`rank` product (fp32).

    Returns ``{module: (A, B)}`` with ``B @ A ~= D`` (A: r x in[, kh, kw], B: out x r[, 1, 1]; the singular
    values split as sqrt between them) and the relative errors.
    """
    params = dict(base_unet.named_parameters())
    unknown = [name for name in trained if name not in params]
    if unknown:
        raise StencilError(f"the trained weights do not fit the base model (no parameter {unknown[0]!r})")
    layers = _lora_layer_weights(base_unet, trained)
    allowed = max_extraction_rank(tuple(trained[name].shape) for name in layers)
    if not layers:
        raise StencilError("the run trained no Linear or Conv2d layer: there is nothing to extract")
    if rank > allowed:
        raise BadInputError(
            f"rank must be at most {allowed} for this model (its largest layer allows {allowed})"
        )
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    total = residual = left_out = 0.0
    left_out_count = 0
    worst, worst_layer = 0.0, ""
    for name, tensor in trained.items():
        diff = tensor.float() - params[name].detach().float().cpu()
        norm2 = float(diff.pow(2).sum())
        total += norm2
        if name not in layers:
            if norm2 > 0:
                left_out += norm2
                left_out_count += 1
            continue
        matrix = diff.flatten(1)
        r = min(rank, *matrix.shape)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        root = s[:r].sqrt()
        up = u[:, :r] * root  # (out, r)
        down = root[:, None] * vh[:r]  # (r, in * kh * kw)
        approx = up @ down
        error2 = float((matrix - approx).pow(2).sum())
        residual += error2
        if norm2 > 0 and math.sqrt(error2 / norm2) >= worst:
            worst, worst_layer = math.sqrt(error2 / norm2), layers[name]
        if diff.dim() == 4:
            up, down = up.reshape(diff.shape[0], r, 1, 1), down.reshape(r, *diff.shape[1:])
        pairs[layers[name]] = (down.contiguous(), up.contiguous())
    overall = math.sqrt((residual + left_out) / total) if total > 0 else 0.0
    report = ExtractionError(
        rank=rank,
        overall=overall,
        worst=worst,
        worst_layer=worst_layer,
        left_out=math.sqrt(left_out / total) if total > 0 else 0.0,
        left_out_tensors=left_out_count,
        layers=len(pairs),
    )
    return pairs, report


def diffusers_lora_state(
    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scale: float, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """diffusers/peft LoRA keys (``unet.<module>.lora_A.weight``), the scale folded into B."""
    state = {}
    for module, (down, up) in sorted(pairs.items()):
        state[f"{UNET_PREFIX}{module}.lora_A.weight"] = down.to(dtype).contiguous()
        state[f"{UNET_PREFIX}{module}.lora_B.weight"] = (up.float() * scale).to(dtype).contiguous()
    return state


def kohya_lora_state(state: Mapping[str, torch.Tensor], unet: Any | None = None) -> dict[str, torch.Tensor]:
    """The diffusers LoRA state in kohya naming (``lora_unet_...lora_down.weight`` + ``.alpha`` = rank).

    For an SDXL UNet (`unet` given and SDXL-shaped) the module names are sd-scripts' SDXL ones, the original
    (SGM) layout: ``lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q``; SD1.5 keeps the
    diffusers module names that sd-scripts uses for SD1.5."""
    from diffusers.utils import convert_state_dict_to_kohya

    if unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time":
        state = sgm_module_state(state, unet)
    converted = convert_state_dict_to_kohya(dict(state))
    return {key: value.contiguous() if value.dim() else value.float() for key, value in converted.items()}


def sgm_module_state(state: Mapping[str, torch.Tensor], unet: Any) -> dict[str, torch.Tensor]:
    """A diffusers LoRA state with each UNet module renamed to its original (SGM) checkpoint name, found
    by inverting diffusers' own single-file converter (`_unet_original_names`)."""
    from diffusers.loaders import single_file_utils as sfu

    originals = {
        name.removesuffix(".weight"): original.removeprefix(sfu.LDM_UNET_KEY).removesuffix(".weight")
        for name, (original, _) in _unet_original_names(unet).items()
        if name.endswith(".weight")
    }
    renamed = {}
    for key, tensor in state.items():
        match = re.match(r"^unet\.(.+)\.(lora_[AB]\.weight)$", key)
        if match is None or match[1] not in originals:
            raise StencilError(f"no original SDXL name for the LoRA layer {key!r}: cannot export")
        renamed[f"unet.{originals[match[1]]}.{match[2]}"] = tensor
    return renamed


# -- the original single-file layout -------------------------------------------------------------------------


class _Probe:
    """A stand-in tensor that remembers the original name it was given under (and whether it was sliced)."""

    ndim = 4
    shape = (1, 1, 1, 1)

    def __init__(self, key: str, sliced: bool = False) -> None:
        self.key = key
        self.sliced = sliced

    def __getitem__(self, item: Any) -> _Probe:
        return _Probe(self.key, sliced=True)


def _literal_renames(function: Callable[..., Any]) -> list[tuple[str, str]]:
    """The ``.replace("original", "diffusers")`` literals of one of diffusers' converter helpers."""
    pairs = re.findall(r'\.replace\(\s*"([^"]+)",\s*"([^"]+)"\s*\)', inspect.getsource(function))
    if not pairs:
        raise StencilError(f"cannot read the renames of diffusers' {function.__name__}: update stencil")
    return pairs


def _suffixes(rest: str, renames: Iterable[tuple[str, str]]) -> set[str]:
    """Original spellings of a diffusers name tail: each rename the converter makes, undone.

    The converter also accepts a name already in diffusers spelling (``replace`` leaves it alone), so the
    diffusers tail itself is a candidate only when no rename applies to it.
    """
    undone = {rest.replace(new, original) for original, new in renames if new in rest}
    return undone or {rest}


def _invert(
    convert: Callable[[dict[str, Any]], dict[str, Any]], names: Iterable[str], candidates: Iterable[str]
) -> dict[str, tuple[str, bool]]:
    """``{diffusers name: (original name, sliced)}``: run the converter on probes named by the candidates."""
    converted = convert({key: _Probe(key) for key in set(candidates)})
    mapping: dict[str, tuple[str, bool]] = {}
    for name in names:
        probe = converted.get(name)
        if not isinstance(probe, _Probe):
            raise StencilError(f"diffusers' converter gives no original name for {name!r}: cannot export")
        mapping[name] = (probe.key, probe.sliced)
    originals = [key for key, _ in mapping.values()]
    if len(set(originals)) != len(originals):
        raise StencilError("diffusers' converter maps two weights to one original name: cannot export")
    return mapping


def _unet_original_names(unet: Any) -> dict[str, tuple[str, bool]]:
    from diffusers.loaders import single_file_utils as sfu

    config = dict(unet.config)
    names = list(unet.state_dict())
    per_block = config["layers_per_block"]
    per_block = max(per_block) if isinstance(per_block, list | tuple) else int(per_block)
    slots = len(config["block_out_channels"]) * (per_block + 1) + 1
    renames = _literal_renames(sfu.update_unet_resnet_ldm_to_diffusers)
    inverse_top = {d: o for d, o in sfu.DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"].items()}
    group = re.compile(r"^(?:(?:down|up)_blocks\.\d+\.|mid_block\.)(resnets|attentions)\.\d+\.(.+)$")
    tails: set[str] = set()
    for name in names:
        match = group.match(name)
        if match:  # the converter renames inside resnets only; attention names keep their spelling
            tails |= _suffixes(match[2], renames) if match[1] == "resnets" else {match[2]}
    if config.get("addition_embed_type") == "text_time":  # SDXL's pooled-text + time-ids embedding
        inverse_top |= dict(sfu.DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    candidates = {inverse_top[n] for n in names if n in inverse_top}
    for i in range(slots):
        for j in (0, 1):
            candidates |= {f"input_blocks.{i}.{j}.{t}" for t in tails}
            candidates |= {f"output_blocks.{i}.{j}.{t}" for t in tails}
    candidates |= {f"middle_block.{k}.{t}" for k in range(3) for t in tails}
    # Where the samplers sit is the one thing the converter accepts two ways (an upsampler under `.1.conv` or
    # `.2.conv`): the original layout puts it after the layer's last module, i.e. at the block's last layer,
    # `.2` when that layer has an attention and `.1` when not; a downsampler is the next block's first slot.
    for name in names:
        down = re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)$", name)
        up = re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)$", name)
        if down:
            candidates.add(f"input_blocks.{(int(down[1]) + 1) * (per_block + 1)}.0.op.{down[2]}")
        if up:
            block = int(up[1])
            attention = any(n.startswith(f"up_blocks.{block}.attentions.{per_block}.") for n in names)
            candidates.add(
                f"output_blocks.{block * (per_block + 1) + per_block}.{2 if attention else 1}.conv.{up[2]}"
            )
    prefix = sfu.LDM_UNET_KEY

    def convert(probes: dict[str, Any]) -> dict[str, Any]:
        return sfu.convert_ldm_unet_checkpoint({prefix + k: v for k, v in probes.items()}, config)

    return {d: (prefix + o, s) for d, (o, s) in _invert(convert, names, candidates).items()}


def _vae_original_names(vae: Any) -> dict[str, tuple[str, bool]]:
    from diffusers.loaders import single_file_utils as sfu

    config = dict(vae.config)
    names = list(vae.state_dict())
    blocks = len(config["down_block_types"])
    per_block = int(config["layers_per_block"]) + 1  # the decoder has one more resnet per block
    renames = {
        "resnets": _literal_renames(sfu.update_vae_resnet_ldm_to_diffusers),
        "attentions": _literal_renames(sfu.update_vae_attentions_ldm_to_diffusers),
    }
    inverse_top = dict(sfu.DIFFUSERS_TO_LDM_MAPPING["vae"])
    group = re.compile(
        r"^(?:encoder|decoder)\.(?:(?:down|up)_blocks\.\d+\.|mid_block\.)(resnets|attentions)\.\d+\.(.+)$"
    )
    tails: set[str] = set()
    for name in names:
        match = group.match(name)
        if match:
            tails |= _suffixes(match[2], renames[match[1]])
    candidates = {inverse_top[n] for n in names if n in inverse_top}
    for part, side in (("encoder", "down"), ("decoder", "up")):
        for i in range(blocks):
            for j in range(per_block + 1):
                candidates |= {f"{part}.{side}.{i}.block.{j}.{t}" for t in tails}
            sampler = "downsample" if side == "down" else "upsample"
            candidates |= {f"{part}.{side}.{i}.{sampler}.conv.{w}" for w in ("weight", "bias")}
        candidates |= {f"{part}.mid.block_{k}.{t}" for k in (1, 2) for t in tails}
        candidates |= {f"{part}.mid.attn_1.{t}" for t in tails}
    prefix = sfu.LDM_VAE_KEYS[0]

    def convert(probes: dict[str, Any]) -> dict[str, Any]:
        return sfu.convert_ldm_vae_checkpoint({prefix + k: v for k, v in probes.items()}, config)

    return {d: (prefix + o, s) for d, (o, s) in _invert(convert, names, candidates).items()}


def _text_original_names(text_encoder: Any, prefix: str | None = None) -> dict[str, tuple[str, bool]]:
    from diffusers.loaders import single_file_utils as sfu

    prefix = prefix or sfu.LDM_CLIP_PREFIX_TO_REMOVE[0]  # "cond_stage_model.transformer."
    out = {}
    for name in text_encoder.state_dict():
        if name.endswith("position_ids"):
            continue
        inner = name if name.startswith("text_model.") else f"text_model.{name}"  # transformers 5 drops it
        out[name] = (prefix + inner, False)
    return out


SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL's CLIP ViT-L in the original checkpoint
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's OpenCLIP ViT-bigG


def open_clip_state(text_encoder: Any, dtype: torch.dtype, prefix: str = SDXL_OPEN_CLIP_PREFIX) -> dict:
    """A projecting CLIP text encoder in OpenCLIP layout: the inverse of diffusers'
    ``convert_open_clip_checkpoint`` (its own name tables; q/k/v fused into ``in_proj``, the projection
    transposed)."""
    from diffusers.loaders import single_file_utils as sfu

    tables = sfu.DIFFUSERS_TO_LDM_MAPPING["openclip"]
    tensors = {
        (k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v
        for k, v in text_encoder.state_dict().items()
        if not k.endswith("position_ids")
    }
    state: dict[str, torch.Tensor] = {}
    for diffusers_key, original in tables["layers"].items():
        tensor = tensors.pop(diffusers_key).detach().to("cpu", dtype)
        state[prefix + original] = (tensor.T if original == "text_projection" else tensor).contiguous()
    renames = [(new, old) for new, old in tables["transformer"].items() if not new.startswith("transformer.")]
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        original = name
        for new, old in renames:
            original = original.replace(new, old)
        match = re.match(r"^(.*)\.(q|k|v)_proj\.(weight|bias)$", original)
        if match:
            fused.setdefault(f"{match[1]}.in_proj_{match[3]}", {})[match[2]] = tensor
        else:
            state[prefix + "transformer." + original] = tensor.detach().to("cpu", dtype).contiguous()
    for original, parts in fused.items():
        qkv = torch.cat([parts["q"], parts["k"], parts["v"]]).detach().to("cpu", dtype)
        state[prefix + "transformer." + original] = qkv.contiguous()
    return state


def original_layout_names(pipe: Any) -> dict[str, dict[str, tuple[str, bool]]]:
    """``{component: {diffusers name: (original name, sliced)}}`` for the UNet, VAE and (CLIP-L) text encoder.

    `sliced` marks weights the converter reshapes (the VAE's 1x1-conv attention projections become Linear
    weights in diffusers); they are written back with their 1x1 kernel dims. SDXL's CLIP-L sits under
    ``conditioner.embedders.0``; its OpenCLIP encoder is written by `open_clip_state`.
    """
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    return {
        "unet": _unet_original_names(pipe.unet),
        "vae": _vae_original_names(pipe.vae),
        "text_encoder": _text_original_names(pipe.text_encoder, SDXL_CLIP_PREFIX if sdxl else None),
    }


def original_layout_state(pipe: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The pipeline's weights under original Stable Diffusion (SDXL: SGM) names, as one flat state dict."""
    state: dict[str, torch.Tensor] = {}
    for component, mapping in original_layout_names(pipe).items():
        tensors = getattr(pipe, component).state_dict()
        for name, (original, sliced) in mapping.items():
            tensor = tensors[name].detach().to("cpu", dtype)
            if sliced and tensor.dim() == 2:
                tensor = tensor[:, :, None, None]
            state[original] = tensor.contiguous()
    if getattr(pipe, "text_encoder_2", None) is not None:
        state.update(open_clip_state(pipe.text_encoder_2, dtype))
    return state


# -- writing -------------------------------------------------------------------------------------------------


def _metadata_strings(metadata: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items() if v is not None}


def _write_file(target: Path, tensors: dict[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    save_trained_weights(target, tensors, _metadata_strings(metadata))


def _write_folder(target: Path, build: Callable[[Path], None]) -> None:
    """Build a folder in a temp folder beside `target`, then rename it into place (any old one removed)."""
    with disk_full_as_error(target):
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old: Path | None = None
    try:
        os.chmod(staging, folder_mode())  # mkdtemp makes 0700: the export should honour the umask
        with disk_full_as_error(target):
            build(staging)
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "folder")
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _cast_safetensors(folder: Path, dtype: torch.dtype, keep_unet: Iterable[str] = ()) -> None:
    """Rewrite every safetensors file under `folder` with its floating-point tensors in `dtype`.

    The UNet's tensors named in `keep_unet` stay fp32 (their update would round away)."""
    for path in Path(folder).rglob("*.safetensors"):
        cast_weights_file(path, dtype, keep_unet if path.parent.name == "unet" else ())


SLOW_TOKENIZER_FILES = ("vocab.json", "merges.txt")  # what transformers 4's CLIPTokenizer reads


def write_tokenizer_files(tokenizer: Any, folder: Path) -> None:
    """Give an exported ``tokenizer/`` folder both layouts: ``tokenizer.json`` and vocab.json + merges.txt.

    transformers 5 saves only ``tokenizer.json``; ``model_index.json`` names ``CLIPTokenizer``, whose
    transformers 4.x (slow) loader needs ``vocab.json`` and ``merges.txt``, as the Hub's SD1.5 folder has
    them. The base model's own files are copied when it has them; otherwise they are written from the
    tokenizer's BPE model (the same vocabulary and merges)."""
    folder = Path(folder)
    source = Path(getattr(tokenizer, "name_or_path", "") or "")
    missing = [name for name in SLOW_TOKENIZER_FILES if not (folder / name).is_file()]
    for name in list(missing):
        for candidate in (source / name, source / "tokenizer" / name):
            if candidate.is_file():
                shutil.copyfile(candidate, folder / name)
                missing.remove(name)
                break
    if missing:
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            tokenizer.backend_tokenizer.model.save(scratch)
            for name in missing:
                os.replace(Path(scratch) / name, folder / name)


def _trained_names(unet: Any, tensors: Mapping[str, torch.Tensor], kind: WeightsKind) -> list[str]:
    """The UNet parameters a run changes: a full run's own tensors, a LoRA run's adapted weights."""
    if kind == KIND_LORA:
        return [f"{module}.weight" for module in lora_pairs(tensors)]
    return list(tensors)


def rounded_away(
    base: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> list[str]:
    """The tensors the run changed that `dtype` gives back bit-identical to the base (the update lost)."""
    if dtype == torch.float32:
        return []
    lost = []
    for name, before in base.items():
        after = trained[name].detach().cpu()
        if not torch.equal(before, after) and torch.equal(before.to(dtype), after.to(dtype)):
            lost.append(name)
    return lost


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# -- the model card ------------------------------------------------------------------------------------------


def model_card(fmt: ExportFormat, target: Path, info: Mapping[str, Any]) -> str:
    """The README.md text of an export: what it is, how it was trained, how to load it."""
    name = Path(target).name
    phrase = info.get("phrase") or "the subject"
    base = info.get("base_model") or "stable-diffusion-v1-5/stable-diffusion-v1-5"
    params = info.get("params") or {}
    settings = ", ".join(
        f"{key} {params[key]}"
        for key in ("steps", "batch_size", "lr", "resolution", "train", "lora_rank", "lora_alpha", "seed")
        if params.get(key) is not None
    )
    error = info.get("error")
    lines = [
        f"# {info.get('subject') or 'subject'} — Stencil {fmt} export",
        "",
        f"- Base model: `{base}` (Stable Diffusion 1.5 architecture)",
        f"- Subject phrase: **{phrase}** — write it in your prompts, "
        f'e.g. "a photo of a {phrase} on the beach"',
        f"- Trained with: {info.get('kind', 'full')} run {info.get('run_id') or ''} "
        f"({settings or 'defaults'})",
        f"- Exported by stencil {__version__} as `{fmt}`",
    ]
    if error is not None:
        lines.append(
            f"- LoRA extracted from the full decoder fine-tune by SVD at rank {error.rank}: relative "
            f"error of the weight difference {error.overall:.4f} overall, worst layer {error.worst:.4f} "
            f"({error.worst_layer}); "
            f"biases and norms left out ({error.left_out:.4f} of the difference)"
        )
    lines += [
        "",
        "## Method",
        "",
        "Trained with the Stencil method (Chen et al., ICIP 2025): the UNet decoder of Stable Diffusion 1.5 "
        "is fine-tuned on a few photos with a Cross-Attention Guided Loss (the loss is masked to where the "
        "subject phrase attends), binding the subject to its own phrase instead of a rare token. Context "
        "Guidance (a large model's draft, DDIM + null-text inversion, then denoising with these weights) "
        "needs stencil; "
        "elsewhere these weights render plain text-to-image prompts.",
        "",
        "## Load it",
        "",
        "```python",
        "import torch",
        "from diffusers import StableDiffusionPipeline",
        "",
    ]
    if fmt in LORA_FORMATS:
        lines += [
            f'pipe = StableDiffusionPipeline.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")',
            f'pipe.load_lora_weights("{name}")',
        ]
    elif fmt == "diffusers":
        lines += [
            f'pipe = StableDiffusionPipeline.from_pretrained("{name}", torch_dtype=torch.float16).to("cuda")'
        ]
    else:
        lines += [
            f'pipe = StableDiffusionPipeline.from_single_file("{name}", torch_dtype=torch.float16).to("cuda")'
        ]
    lines += [f'image = pipe("a photo of a {phrase} on the beach").images[0]', "```", ""]
    if fmt == "lora":
        lines += [
            "- This peft-named file is for diffusers only: ComfyUI's *Load LoRA* and AUTOMATIC1111's Lora "
            "extension match none of its attention keys (they drop them, with at most a log line). Export "
            "with the `kohya` format for them."
        ]
    elif fmt == "kohya":
        lines += [
            f"- ComfyUI: put `{name}` in `models/loras/` and add a *Load LoRA* node after the SD1.5 "
            "checkpoint.",
            f"- AUTOMATIC1111: put `{name}` in `models/Lora/` and write `<lora:{Path(name).stem}:1>` in "
            "the prompt.",
        ]
    elif fmt == "single-file":
        lines += [
            f"- ComfyUI: put `{name}` in `models/checkpoints/` and pick it in *Load Checkpoint*.",
            f"- AUTOMATIC1111: put `{name}` in `models/Stable-diffusion/` and pick it as the checkpoint.",
        ]
    else:
        lines += [
            "- ComfyUI / AUTOMATIC1111 read single files: export with the `single-file` format for them."
        ]
    return "\n".join(lines) + "\n"


# -- the export ----------------------------------------------------------------------------------------------


def export_run(
    pipe: Any,
    weights_path: Path,
    fmt: ExportFormat,
    target: Path,
    *,
    rank: int | None = None,
    force: bool = False,
    save_dtype: DtypeName = "fp16",
    base_model: str | None = None,
) -> WrittenExport:
    """Export a run (its weights file, over the base pipeline `pipe`) to `target` in format `fmt`.

    `pipe` must hold the base weights the run was trained from; the ``diffusers`` and ``single-file`` formats
    load the run into ``pipe.unet`` in place. `rank` is for extracting a LoRA from a full run (default
    ``DEFAULT_EXTRACT_RANK``); a LoRA run exports at its trained rank.
    """
    target = Path(target)
    metadata = read_weights_metadata(Path(weights_path))
    kind = weights_kind(metadata)
    check_request(fmt, target, rank=rank, force=force, kind=kind)
    if save_dtype not in SAVE_DTYPES:
        raise BadInputError(f"the export dtype must be one of {', '.join(SAVE_DTYPES)} (got {save_dtype!r})")
    dtype = SAVE_DTYPES[save_dtype]
    if kind == KIND_LORA and rank is not None and str(rank) != metadata.get("lora_rank"):
        raise BadInputError(
            f"a LoRA run exports at its trained rank ({metadata.get('lora_rank')}); rank applies to full runs"
        )
    params = json.loads(metadata.get("params") or "{}")
    info: dict[str, Any] = {
        "subject": metadata.get("subject"),
        "phrase": metadata.get("phrase"),
        "run_id": metadata.get("run_id"),
        "base_model": base_model or metadata.get("base_model"),
        "params": params,
        "kind": kind,
    }
    header: dict[str, Any] = {
        "format": f"stencil-export-{fmt}",
        "stencil_version": __version__,
        "base_model": info["base_model"],
        "subject": info["subject"],
        "phrase": info["phrase"],
        "run_id": info["run_id"],
        "run_kind": kind,
        "training_params": metadata.get("params"),
        "method": "Stencil (Cross-Attention Guided Loss fine-tune of the SD1.5 UNet decoder)",
    }
    error: ExtractionError | None = None
    used_rank: int | None = None
    keep: list[str] = []
    if fmt in LORA_FORMATS:
        tensors = read_tensors(weights_path)
        if kind == KIND_LORA:
            pairs, scale = lora_pairs(tensors), lora_scale(metadata)
            used_rank = int(metadata["lora_rank"])
        else:
            used_rank = rank or DEFAULT_EXTRACT_RANK
            pairs, error = svd_extract(pipe.unet, tensors, used_rank)
            scale = 1.0
        state = diffusers_lora_state(pairs, scale, dtype)
        if fmt == "kohya":
            state = kohya_lora_state(state, pipe.unet)
        header.update(lora_rank=str(used_rank), lora_alpha=str(used_rank), lora_layers=str(len(pairs)))
        header["lora_targets"] = ",".join(LORA_TARGET_MODULES) if kind == KIND_LORA else "Linear+Conv2d"
        if error is not None:
            header["extraction_error"] = json.dumps(error.__dict__)
        _write_file(target, state, header)
    else:
        params = dict(pipe.unet.named_parameters())
        names = _trained_names(pipe.unet, read_tensors(weights_path), kind)
        base = {name: params[name].detach().cpu().float().clone() for name in names}
        load_trained_weights(pipe.unet, Path(weights_path))
        keep = rounded_away(base, dict(pipe.unet.named_parameters()), dtype)
        del base
        header["kept_fp32"] = json.dumps(keep) if keep else None
        if fmt == "diffusers":
            info["error"] = None

            def build(folder: Path) -> None:
                pipe.save_pretrained(folder, safe_serialization=True)
                write_tokenizer_files(pipe.tokenizer, folder / "tokenizer")
                if dtype != torch.float32:
                    _cast_safetensors(folder, dtype, keep)
                (folder / "stencil_export.json").write_text(
                    json.dumps(_metadata_strings(header), indent=2, sort_keys=True) + "\n", encoding="utf-8"
                )
                (folder / "README.md").write_text(model_card(fmt, target, info), encoding="utf-8")

            _write_folder(target, build)
        else:
            state = original_layout_state(pipe, dtype)
            unet_names = original_layout_names(pipe)["unet"]
            unet_state = pipe.unet.state_dict()
            for name in keep:
                state[unet_names[name][0]] = unet_state[name].detach().to("cpu", torch.float32).contiguous()
            _write_file(target, state, header)
    info["error"] = error
    card = card_path(fmt, target)
    if fmt != "diffusers":
        atomic_write_with(card, lambda tmp: tmp.write_text(model_card(fmt, target, info), encoding="utf-8"))
    size = _folder_bytes(target) if target.is_dir() else target.stat().st_size
    return WrittenExport(
        format=fmt,
        path=target,
        card=card,
        kind=kind,
        bytes=size,
        rank=used_rank,
        error=error,
        metadata=_metadata_strings(header),
        kept_fp32=len(keep),
    )


__all__ = [
    "DEFAULT_EXTRACT_RANK",
    "FORMATS",
    "ExportFormat",
    "ExtractionError",
    "WrittenExport",
    "check_request",
    "export_run",
    "lora_delta",
    "original_layout_names",
    "original_layout_state",
    "svd_extract",
]
