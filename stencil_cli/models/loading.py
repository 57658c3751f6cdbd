"""Load models: the subject (SD1.5/SDXL) and context (draft) pipelines, and the DINO / CLIP eval models.

Every source (preset, Hub id, local folder, the tiny preset) loads through one ``from_pretrained`` call with
safetensors only, the stencil-wide Hugging Face cache and offline mode; errors become one clear line. The tiny
preset is built on first use under ``<store root>/models/``. torch and the model libraries are imported inside
the functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stencil_cli.base.errors import StencilError
from stencil_cli.models.devices import (
    context_dtype,
    quiet_libraries,
    resolve_device,
    settle_heap,
    subject_dtype,
    transformer_width,
)
from stencil_cli.models.hub import (
    cached_eval_model,
    cached_snapshot,
    gated_without_token,
    hub_cache_dir,
    hub_error,
    is_offline,
)
from stencil_cli.models.refs import (
    CONTEXT,
    EVAL,
    SUBJECT,
    EvalModelRefs,
    ModelRole,
    ModelSource,
    preset_for,
    pull_command,
    resolve_ref,
    t5_required_error,
)
from stencil_cli.models.scheduler import sd15_ddim_scheduler
from stencil_cli.models.tiny import ensure_local_preset, ensure_tiny_eval

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Location:
    """Where ``from_pretrained`` loads a resolved model from."""

    source: ModelSource
    path: str  # a local folder, or the Hub id when `hub`
    hub: bool
    index: dict[str, Any] = field(default_factory=dict)  # the diffusers pipeline index, when known
    files: str | None = None  # folder with configs / processor files, when not beside the weights


# -- where a model is -------------------------------------------------------------------------------------


def _check_local_folder(path: Path, ref: str) -> dict[str, Any]:
    index = path / "model_index.json"
    if not index.is_file():
        raise StencilError(
            f"{ref} is not a diffusers model folder (no model_index.json)",
            hint="give a folder saved with save_pretrained, a Hub id, or a preset such as sd15",
        )
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise StencilError(f"{ref}: model_index.json is unreadable ({error})") from error
    if not isinstance(data, dict) or "_class_name" not in data:
        raise StencilError(f"{ref}: model_index.json is not a diffusers pipeline index")
    return data


def locate(source: ModelSource) -> Location:
    """Where a diffusion pipeline loads from, with its pipeline index; builds the tiny preset if needed."""
    if gated := gated_without_token(source):
        raise gated
    if source.kind == "preset" and source.repo_id is None:
        assert source.path is not None
        ensure_local_preset(source.ref, source.path.parent)
        return Location(source, str(source.path), False, _check_local_folder(source.path, source.ref))
    if source.kind == "local":
        assert source.path is not None
        return Location(source, str(source.path), False, _check_local_folder(source.path, source.ref))
    assert source.repo_id is not None
    snapshot = cached_snapshot(source.repo_id)
    if snapshot is None and is_offline():
        raise StencilError(
            f"model {source.label} is not in the Hugging Face cache and HF_HUB_OFFLINE is set",
            hint=f"run `{pull_command(source)}` while online, then try again",
        )
    index = _check_local_folder(snapshot, source.label) if snapshot is not None else {}
    return Location(source, source.repo_id, True, index)


def locate_eval(source: ModelSource, kind: str) -> Location:
    """Where eval model `kind` (``dino`` or ``clip``) loads from: tiny, a folder, the cache or the Hub."""
    if source.kind == "preset" and source.repo_id is None:
        assert source.path is not None
        return Location(source, str(ensure_tiny_eval(source.path) / kind), False)
    if source.kind == "local":
        assert source.path is not None
        if not (source.path / "config.json").is_file():
            raise StencilError(f"{source.ref} is not a transformers model folder (no config.json)")
        return Location(source, str(source.path), False)
    assert source.repo_id is not None
    if is_offline() and source.revision is None:
        cached = cached_eval_model(source.repo_id)
        if cached is None:
            raise StencilError(
                f"eval model {source.repo_id} (configs and safetensors weights) is not in the Hugging Face "
                "cache and HF_HUB_OFFLINE is set",
                hint=f"run `{pull_command(source)}` while online (see docs/evaluation.md); "
                "or use {eval_models=tiny} for a smoke run",
                fields=("eval_models",),
            )
        return Location(source, str(cached.weights), False, files=str(cached.files))
    return Location(source, source.repo_id, True)


def inspect_ref(
    ref: str, role: ModelRole = SUBJECT, *, store_root: Path | None = None
) -> tuple[ModelSource, dict]:
    """Resolve `ref` and read its model_index.json without loading weights; raises clear errors."""
    location = locate(resolve_ref(ref, role, store_root=store_root))
    return location.source, location.index


# -- from_pretrained --------------------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def from_pretrained(cls: Any, location: Location, *, weights: bool = True, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with safetensors only, the HF cache and offline mode; errors become one line.

    ``weights=False`` loads a config-only object (a processor, a tokenizer) from the configs' folder.
    """
    source = location.source
    if location.hub:
        kwargs.setdefault("cache_dir", str(hub_cache_dir()))
        if source.revision:
            kwargs["revision"] = source.revision
        if is_offline():
            kwargs["local_files_only"] = True
    path = location.path
    if weights:
        kwargs["use_safetensors"] = True
    elif location.files:
        path = location.files
    try:
        with quiet_libraries():
            if weights and location.files:
                from transformers import AutoConfig

                kwargs["config"] = AutoConfig.from_pretrained(location.files)
            return cls.from_pretrained(path, **kwargs)
    except StencilError:
        raise
    except Exception as error:  # noqa: BLE001 - translated into one line below
        translated = hub_error(error, source)
        if translated is not None:
            if source.role == EVAL and translated.hint and "models pull" in translated.hint:
                translated.hint = f"run `{pull_command(source)}` while online (see docs/evaluation.md)"
            raise translated from error
        message = _first_line(error)
        if source.role == EVAL:
            if weights and "safetensors" in message.lower():
                raise StencilError(
                    f"eval model {source.ref} has no safetensors weights (stencil never loads pickle files)",
                    hint=f"run `stencil models pull {source.repo_id or source.ref}` (it finds the Hub's "
                    "safetensors pull request), or pin one: owner/name@refs/pr/N",
                ) from error
            raise StencilError(f"cannot load eval model {source.ref}: {message}") from error
        if "safetensors" in message.lower() or "use_safetensors" in message:
            raise StencilError(
                f"model {source.label} has no safetensors weights (stencil never loads pickle files)"
            ) from error
        raise StencilError(f"cannot load model {source.label}: {message}") from error


# -- diffusion pipelines ----------------------------------------------------------------------------------


def _absent_components(index: dict[str, Any]) -> dict[str, None]:
    """Components a saved pipeline lists as absent ([null, null]): from_pretrained wants them as None."""
    return {
        key: None
        for key, value in index.items()
        if not key.startswith("_") and isinstance(value, list) and value and all(v is None for v in value)
    }


UnetReplacement = Callable[[Any], Mapping[str, "torch.Tensor"]]
"""Given the UNet (its parameters may be on the meta device: only names and shapes are known), the tensors
that replace some of its parameters (a run's trained decoder), read and checked by the caller."""

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _unet_weight_files(folder: Path) -> dict[str, Path] | None:
    """Every UNet parameter's safetensors file in a diffusers `unet/` folder (one file or shards), or None."""
    single = folder / UNET_WEIGHTS
    if single.is_file():
        return {"": single}
    index = folder / f"{UNET_WEIGHTS}.index.json"
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {name: folder / file for name, file in weight_map.items()}


def _local_component_folder(location: Location, component: str) -> Path | None:
    """The `component/` folder on this disk that from_pretrained would read, when there is one."""
    if not location.hub:
        return Path(location.path) / component
    if location.source.revision is not None or location.source.repo_id is None:
        return None
    snapshot = cached_snapshot(location.source.repo_id)
    return snapshot / component if snapshot is not None else None


def _local_unet_folder(location: Location) -> Path | None:
    """The `unet/` folder on this disk that from_pretrained would read, when there is one."""
    return _local_component_folder(location, "unet")


def local_transformer_width(location: Location) -> int | None:
    """The hidden width of a pipeline's `transformer`, from its config on this disk; None when there is no
    such config here (a UNet pipeline, or a model not downloaded yet)."""
    folder = _local_component_folder(location, "transformer")
    try:
        config = json.loads((folder / "config.json").read_text()) if folder is not None else {}
    except (OSError, ValueError):
        return None
    return transformer_width(config)


def _unet_in_place(folder: Path, replace: UnetReplacement, dtype: torch.dtype) -> Any | None:
    """The UNet built on the meta device, its base tensors read from `folder` except those `replace` gives,
    which are put in their place: the replaced base weights are never read. None when the folder is not a
    plain safetensors UNet (the caller then loads it the usual way)."""
    import torch
    from safetensors import safe_open

    files = _unet_weight_files(folder)
    if files is None or not (folder / "config.json").is_file():
        return None
    with quiet_libraries():
        from diffusers import UNet2DConditionModel

        config = UNet2DConditionModel.load_config(str(folder))
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
    replaced = replace(unet)
    wanted = {name for name, _ in unet.named_parameters()} | {name for name, _ in unet.named_buffers()}
    state = {
        name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in replaced.items()
    }
    shards = sorted(set(files.values())) if "" not in files else [files[""]]
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - a safetensors handle is not a dict
                if name in wanted and name not in state:
                    tensor = handle.get_tensor(name)
                    state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    if set(state) != wanted:
        return None  # a key layout from_pretrained would convert (an old checkpoint): let it
    unet.load_state_dict(state, strict=True, assign=True)
    unet.register_to_config(_name_or_path=str(folder.parent))
    return unet.eval()


def _replace_after_loading(unet: Any, replace: UnetReplacement) -> None:
    """Copy the replacing tensors over an already loaded UNet (when it could not be built in place)."""
    import torch

    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, tensor in replace(unet).items():
            target = params[name]
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))


SUBJECT_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")  # the subject-model families


def load_subject_pipeline(
    ref: str,
    *,
    device: str = "auto",
    precision: str = "auto",
    store_root: Path | None = None,
    replace_unet: UnetReplacement | None = None,
) -> Any:
    """Load an SD1.5- or SDXL-shaped subject pipeline (the method's DDIM, no safety checker).

    `replace_unet` gives the tensors (a run's trained parameters) that take the place of some of the UNet's:
    the base weights they replace are not loaded at all.
    """
    with quiet_libraries():
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    torch_device = resolve_device(device)
    dtype = subject_dtype(precision, torch_device)
    location = locate(resolve_ref(ref, SUBJECT, store_root=store_root))
    index = location.index
    kind = index.get("_class_name") if index else None
    if kind not in SUBJECT_PIPELINES and (index and "unet" not in index):
        raise StencilError(
            f"model {location.source.label} is a {kind}, not a Stable Diffusion (UNet) model",
            hint="the subject model must be SD1.5- or SDXL-shaped, e.g. {subject_model=sd15} or "
            "{subject_model=sdxl}",
            fields=("subject_model",),
        )
    sdxl = kind == "StableDiffusionXLPipeline" or "text_encoder_2" in index
    if sdxl:
        kwargs: dict[str, Any] = {}
    else:
        kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if replace_unet is not None:
        folder = _local_unet_folder(location)
        unet = _unet_in_place(folder, replace_unet, dtype) if folder is not None else None
        if unet is not None:
            kwargs["unet"] = unet
    pipeline = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = from_pretrained(pipeline, location, dtype=dtype, **kwargs)
    if replace_unet is not None and "unet" not in kwargs:
        _replace_after_loading(pipe.unet, replace_unet)
    pipe.scheduler = sd15_ddim_scheduler(dict(pipe.scheduler.config))
    pipe.to(torch_device)
    pipe.set_progress_bar_config(disable=True)
    settle_heap()
    return pipe


T5_COMPONENTS = ("text_encoder_3", "tokenizer_3")  # the SD3 family's T5, which `pull --no-t5` leaves out


def _check_cached_components(location: Location, wanted: list[str]) -> None:
    """Refuse a cached Hub pipeline whose wanted components were never downloaded (`pull --no-t5`), in one
    line that says how to get them or to do without."""
    if not location.hub or location.source.repo_id is None:
        return
    snapshot = cached_snapshot(location.source.repo_id)
    if snapshot is None:
        return
    index = location.index
    missing = [
        name
        for name in wanted
        if not name.startswith("_") and isinstance(index.get(name), list) and any(index[name])
        and not (snapshot / name).is_dir()
    ]  # fmt: skip
    if not missing:
        return
    label = location.source.label
    if set(missing) <= set(T5_COMPONENTS):
        raise StencilError(
            f"model {label} was downloaded without its T5 encoder ({', '.join(missing)})",
            hint=f"run it with {{no_t5}}, or fetch T5 with `{pull_command(location.source)}`",
            fields=("no_t5",),
        )
    raise StencilError(
        f"model {label} is not completely in the Hugging Face cache (no {', '.join(missing)})",
        hint=f"run `{pull_command(location.source)}` while online",
    )


def reads_prompt_through_t5_only(index: dict[str, Any]) -> bool:
    """Whether a pipeline index is FLUX-shaped: its only sequence text encoder is T5 (CLIP gives a pooled
    vector), so it cannot run without T5."""
    name = str(index.get("_class_name", ""))
    encoder = index.get("text_encoder_2")
    return name.startswith("Flux") and isinstance(encoder, list) and "T5" in str(encoder[-1])


def load_context_pipeline(
    ref: str,
    *,
    device: str = "auto",
    precision: str = "auto",
    no_t5: bool = False,
    store_root: Path | None = None,
) -> Any:
    """Load the context (draft) text-to-image pipeline; `no_t5` drops an SD3-family T5 (refused for FLUX)."""
    with quiet_libraries():
        from diffusers import DiffusionPipeline

    torch_device = resolve_device(device)
    context_dtype(precision, torch_device)  # a bad precision is refused before the model is looked for
    source = resolve_ref(ref, CONTEXT, store_root=store_root)
    preset = preset_for(ref)
    if no_t5 and preset is not None and preset.draft is not None and preset.draft.t5 == "required":
        raise t5_required_error(source.label)
    location = locate(source)
    dtype = context_dtype(precision, torch_device, width=local_transformer_width(location))
    index = location.index
    if no_t5 and reads_prompt_through_t5_only(index):
        raise t5_required_error(source.label)
    kwargs: dict[str, Any] = {"dtype": dtype, **_absent_components(index)}
    if no_t5 and (not index or "text_encoder_3" in index):
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    if index and "safety_checker" in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    _check_cached_components(location, [name for name in index if name not in kwargs])
    pipe = from_pretrained(DiffusionPipeline, location, **kwargs)
    pipe.to(torch_device)
    pipe.set_progress_bar_config(disable=True)
    settle_heap()
    return pipe


# -- evaluation models ------------------------------------------------------------------------------------


@dataclass
class EvalModels:
    """Loaded DINO and CLIP models with their processors, in eval mode on one device (float32)."""

    refs: EvalModelRefs
    device: torch.device
    dino: Any
    dino_processor: Any
    clip: Any
    clip_processor: Any
    clip_tokenizer: Any


def load_eval_models(
    refs: EvalModelRefs = EvalModelRefs(),
    device: str | torch.device = "cpu",
    *,
    store_root: Path | None = None,
) -> EvalModels:
    """Load DINO (ViTModel, no pooler) and CLIP with their image processors and tokenizer onto `device`."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, ViTModel

    torch_device = torch.device(device)
    dino_at = locate_eval(resolve_ref(refs.dino, EVAL, store_root=store_root), "dino")
    clip_at = locate_eval(resolve_ref(refs.clip, EVAL, store_root=store_root), "clip")
    dino = from_pretrained(ViTModel, dino_at, add_pooling_layer=False).to(torch_device, torch.float32).eval()
    dino_processor = from_pretrained(AutoImageProcessor, dino_at, weights=False, backend="pil")
    clip = from_pretrained(CLIPModel, clip_at).to(torch_device, torch.float32).eval()
    clip_processor = from_pretrained(AutoImageProcessor, clip_at, weights=False, backend="pil")
    clip_tokenizer = from_pretrained(AutoTokenizer, clip_at, weights=False)
    return EvalModels(refs, torch_device, dino, dino_processor, clip, clip_processor, clip_tokenizer)
