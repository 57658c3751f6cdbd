"""Resolve and load models: presets (sd15, sd3-medium, tiny), Hub ids, local folders; devices and dtypes.

A model reference is a preset name, a Hub id (``owner/name``) or a local folder in diffusers layout. Every
source loads through the same diffusers ``from_pretrained`` call with ``use_safetensors=True``; the ``tiny``
preset is built once with random weights, saved with ``save_pretrained`` under ``<store root>/models/tiny/``
and then loaded back like any other local folder.

This module never touches SQLite and never prints: it raises ``StencilError`` with one clear line.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stencil_cli.errors import BadInputError, StencilError
from stencil_cli.fsutil import build_folder_once, folder_has_version

# -- presets ----------------------------------------------------------------------------------------------

SUBJECT = "subject"
CONTEXT = "context"
EVAL = "eval"  # transformers models that score images (evaluation.py), not diffusion pipelines


@dataclass(frozen=True)
class Preset:
    """A named model: where it comes from and what it is for."""

    name: str
    role: str  # "subject" | "context" | "both" | "eval"
    repo_id: str | None  # Hub id, None for locally built presets
    gated: bool = False
    description: str = ""


PRESETS: dict[str, Preset] = {
    "sd15": Preset(
        "sd15", SUBJECT, "stable-diffusion-v1-5/stable-diffusion-v1-5", description="Stable Diffusion 1.5"
    ),
    "sd3-medium": Preset(
        "sd3-medium",
        CONTEXT,
        "stabilityai/stable-diffusion-3-medium-diffusers",
        gated=True,
        description="Stable Diffusion 3 Medium (gated: accept its licence on the Hub, then log in)",
    ),
    "tiny": Preset("tiny", "both", None, description="tiny random-weight models built locally"),
    # the default evaluation models (evaluation.DEFAULT_DINO / DEFAULT_CLIP); transformers layout
    "dino": Preset("dino", EVAL, "facebook/dino-vits16", description="DINO ViT-S/16 (DINO score)"),
    "clip": Preset(
        "clip", EVAL, "openai/clip-vit-base-patch32", description="CLIP ViT-B/32 (CLIP-I and CLIP-T scores)"
    ),
}

# The DDIM settings the Stencil method uses with SD1.5 (METHOD.md); steps_offset 0 and "leading" spacing
# give timesteps 980, 960, ... for 50 steps, as the reference code does.
SD15_DDIM_SETTINGS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 0,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

# Files `models pull` fetches: configs, tokenizers and safetensors weights of the components, no pickles,
# no single-file checkpoints, no half-precision variants, no safety checker.
PULL_ALLOW_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]
PULL_IGNORE_PATTERNS = [
    "*.fp16.*",
    "*non_ema*",
    "*.bin",
    "*.ckpt",
    "*.pt",
    "*.pth",
    "*.msgpack",
    "*.onnx*",
    "safety_checker/*",
    "*.emaonly.*",
]

# Files `models pull` fetches for a transformers (eval) model: top-level configs, tokenizer/processor files
# and safetensors weights; no pickles (.bin, .h5, .msgpack), no subfolders (onnx/ ...), no fp16 variants.
TRANSFORMERS_ALLOW_PATTERNS = ["*.json", "*.txt", "*.model", "model.safetensors", "model-*-of-*.safetensors"]
TRANSFORMERS_IGNORE_PATTERNS = [
    "*/*",
    "*.fp16.*",
    "*.bin",
    "*.h5",
    "*.msgpack",
    "*.ckpt",
    "*.pt",
    "*.pth",
    "*.onnx*",
]
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# The Hub account that opens the automatic "Adding `safetensors` variant of this model" pull requests.
CONVERSION_BOT = "SFconvertbot"

HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model reference."""

    ref: str  # what the user wrote
    kind: str  # "preset" | "hub" | "local"
    repo_id: str | None  # Hub id for hub sources and Hub presets
    path: Path | None  # folder for local sources and built presets
    gated: bool = False

    @property
    def label(self) -> str:
        """A short human name for messages."""
        return self.ref if self.kind != "hub" else self.repo_id or self.ref


# -- paths, cache, offline --------------------------------------------------------------------------------


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def is_offline() -> bool:
    """Whether Hugging Face Hub access is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env is not None:
        return _truthy(env)
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache folder, read from the environment at call time."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hf_token_present() -> bool:
    """Whether a Hugging Face token is available (HF_TOKEN or `hf auth login`); never returns the token."""
    if os.environ.get("HF_TOKEN"):
        return True
    try:
        from huggingface_hub import get_token

        return get_token() is not None
    except Exception:  # noqa: BLE001 - a broken token store is the same as no token here
        return False


def models_root(store_root: Path | None = None) -> Path:
    """The store's folder of locally built models."""
    from stencil_cli.store import default_root

    return (store_root if store_root is not None else default_root()) / "models"


def tiny_dir(store_root: Path | None = None) -> Path:
    """Where the tiny preset lives: ``<store root>/models/tiny`` with ``subject/`` and ``context/``."""
    return models_root(store_root) / "tiny"


# -- resolving references ---------------------------------------------------------------------------------


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref


def resolve_ref(ref: str, role: str = SUBJECT) -> ModelSource:
    """Turn a model reference (preset, Hub id, local folder) into a `ModelSource`; bad refs raise."""
    ref = (ref or "").strip()
    if not ref:
        raise BadInputError(
            "empty model reference: use a preset (sd15, sd3-medium, tiny), a Hub id or a folder"
        )
    if ref in PRESETS:
        preset = PRESETS[ref]
        if preset.role == EVAL and role != EVAL:
            raise BadInputError(
                f"{ref} is an evaluation model ({preset.repo_id}), not a diffusion model: use sd15, "
                "sd3-medium, tiny, a Hub id or a folder"
            )
        if preset.repo_id is None:
            return ModelSource(ref, "preset", None, tiny_dir() / role)
        return ModelSource(ref, "preset", preset.repo_id, None, gated=preset.gated)
    path = Path(ref).expanduser()
    if path.is_dir():
        return ModelSource(ref, "local", None, path.resolve())
    if _looks_like_path(ref) or path.exists():
        if path.exists():
            raise BadInputError(f"{ref} is a file, not a model folder: give a folder in diffusers layout")
        raise BadInputError(f"no such model folder: {ref}")
    if HUB_ID_PATTERN.match(ref):
        gated = any(p.repo_id == ref and p.gated for p in PRESETS.values())
        return ModelSource(ref, "hub", ref, None, gated=gated)
    import difflib

    close = difflib.get_close_matches(ref, list(PRESETS), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise BadInputError(
        f"unknown model {ref!r}: {hint}use a preset (sd15, sd3-medium, tiny), a Hub id like owner/name, "
        "or a local diffusers folder"
    )


def cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a Hub model if its model_index.json is cached, else None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=str(hub_cache_dir()))
    except Exception:  # noqa: BLE001 - an invalid id is simply "not cached"
        return None
    if isinstance(found, str):
        return Path(found).parent
    return None


def _pull_command(source: ModelSource) -> str:
    name = source.ref if source.kind == "preset" else source.repo_id
    return f"stencil models pull {name}"


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


def _location(source: ModelSource) -> tuple[str, dict[str, Any]]:
    """Where from_pretrained should load `source` from, and the pipeline index; raises clear errors."""
    if source.kind == "preset" and source.repo_id is None:
        assert source.path is not None
        ensure_tiny(source.path.parent)
        return str(source.path), _check_local_folder(source.path, source.ref)
    if source.kind == "local":
        assert source.path is not None
        return str(source.path), _check_local_folder(source.path, source.ref)
    assert source.repo_id is not None
    snapshot = cached_snapshot(source.repo_id)
    if snapshot is None and is_offline():
        raise StencilError(
            f"model {source.label} is not in the Hugging Face cache and HF_HUB_OFFLINE is set",
            hint=f"run `{_pull_command(source)}` while online, then try again",
        )
    if snapshot is not None:
        return source.repo_id, _check_local_folder(snapshot, source.label)
    return source.repo_id, {}


def hub_error(error: BaseException, source: ModelSource) -> StencilError | None:
    """Translate a huggingface_hub / network error into one clear StencilError (None if not one of those)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = source.label
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for item in chain:
        if isinstance(item, GatedRepoError) or "gated" in str(item).lower() and "access" in str(item).lower():
            how = "accept its licence on huggingface.co and log in with `hf auth login` (or set HF_TOKEN)"
            if hf_token_present():
                how = (
                    f"accept its licence on https://huggingface.co/{source.repo_id} with your token's account"
                )
            return StencilError(f"model {name} is gated", hint=how)
        if isinstance(item, RepositoryNotFoundError):
            return StencilError(
                f"no model {name} on the Hugging Face Hub (check the spelling; private models need "
                "`hf auth login`)"
            )
        if isinstance(item, RevisionNotFoundError):
            return StencilError(f"model {name}: revision not found on the Hub")
        if isinstance(item, HFValidationError):
            return BadInputError(f"invalid model id {name!r}: use owner/name, a preset or a local folder")
        if isinstance(item, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
            return StencilError(
                f"model {name} is not (completely) in the Hugging Face cache and the Hub cannot be reached",
                hint=f"run `{_pull_command(source)}` while online",
            )
    for item in chain:
        if isinstance(item, (ConnectionError, TimeoutError)) or type(item).__name__ in {
            "ConnectError",
            "ConnectTimeout",
            "ReadTimeout",
            "NetworkError",
        }:
            return StencilError(
                f"cannot reach the Hugging Face Hub to fetch {name}",
                hint=f"check the network, or run `{_pull_command(source)}` later and set HF_HUB_OFFLINE=1",
            )
    return None


def _gated_without_token(source: ModelSource) -> StencilError | None:
    if source.gated and source.kind != "local" and not hf_token_present() and not is_offline():
        if source.repo_id and cached_snapshot(source.repo_id) is not None:
            return None
        return StencilError(
            f"model {source.label} is gated and no Hugging Face token is set",
            hint=f"accept its licence on https://huggingface.co/{source.repo_id}, then run `hf auth login` "
            "or set HF_TOKEN",
        )
    return None


# -- devices and precision --------------------------------------------------------------------------------

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_device(name: str) -> torch.device:
    """Turn auto|cpu|cuda|cuda:N|mps into a torch.device; an unavailable device is a clear error."""
    name = (name or "auto").strip().lower()
    if not DEVICE_PATTERN.match(name):
        raise BadInputError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise StencilError(
                f"--device {name} was asked for but CUDA is not available on this machine",
                hint="use --device cpu (or auto), or install a CUDA build of torch",
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise StencilError(
                f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s) (cuda:0 ...)"
            )
        return device
    if name == "mps" and not _mps_available():
        raise StencilError("--device mps was asked for but MPS is not available", hint="use --device cpu")
    return torch.device(name)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Pick the dtype for `precision` on `device` (auto: bf16 on capable CUDA, fp16 on mps, fp32 on CPU)."""
    precision = (precision or "auto").strip().lower()
    if precision not in PRECISIONS:
        raise BadInputError(f"unknown precision {precision!r}: use auto, fp32, fp16 or bf16")
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        if device.type == "cpu":
            raise BadInputError("fp16 is not supported on the CPU: use --precision fp32 (or bf16)")
        return torch.float16
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise BadInputError("this GPU does not support bf16: use --precision fp16 or fp32")
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def native_resolution(pipe: Any) -> int:
    """The subject model's native image size (512 for SD1.5): UNet sample size x VAE scale factor."""
    factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    return int(pipe.unet.config.sample_size) * factor


def free_pipeline(pipe: Any) -> None:
    """Drop a pipeline's module references, collect garbage and empty the CUDA cache."""
    if pipe is not None:
        components = getattr(pipe, "components", None)
        if isinstance(components, dict):
            for name in list(components):
                with contextlib.suppress(Exception):
                    setattr(pipe, name, None)
    gc.collect()
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


# -- loading ----------------------------------------------------------------------------------------------


def sd15_ddim_scheduler(config: dict[str, Any] | None = None) -> Any:
    """A DDIMScheduler with the SD1.5 settings of METHOD.md (prediction type kept from `config`)."""
    from diffusers import DDIMScheduler

    settings = dict(SD15_DDIM_SETTINGS)
    if config and config.get("prediction_type"):
        settings["prediction_type"] = config["prediction_type"]
    return DDIMScheduler(**settings)


def _from_pretrained(cls: Any, location: str, source: ModelSource, **kwargs: Any) -> Any:
    """Call cls.from_pretrained with safetensors only and the cache/offline settings; errors made clear."""
    if source.kind == "hub" or (source.kind == "preset" and source.repo_id):
        kwargs.setdefault("cache_dir", str(hub_cache_dir()))
        if is_offline():
            kwargs["local_files_only"] = True
    try:
        with quiet_libraries():
            return cls.from_pretrained(location, use_safetensors=True, **kwargs)
    except StencilError:
        raise
    except Exception as error:  # noqa: BLE001 - translated into one line below
        translated = hub_error(error, source)
        if translated is not None:
            raise translated from error
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "safetensors" in message.lower() or "use_safetensors" in message:
            raise StencilError(
                f"model {source.label} has no safetensors weights (stencil never loads pickle files)"
            ) from error
        raise StencilError(f"cannot load model {source.label}: {message}") from error


def _absent_components(index: dict[str, Any]) -> dict[str, None]:
    """Components a saved pipeline lists as absent ([null, null]): from_pretrained wants them as None."""
    return {
        key: None
        for key, value in index.items()
        if not key.startswith("_") and isinstance(value, list) and value and all(v is None for v in value)
    }


def load_subject_pipeline(ref: str, *, device: str = "auto", precision: str = "auto") -> Any:
    """Load an SD1.5-shaped StableDiffusionPipeline (SD1.5 DDIM, no safety checker) on device/dtype."""
    with quiet_libraries():
        from diffusers import StableDiffusionPipeline

    torch_device = resolve_device(device)
    dtype = resolve_dtype(precision, torch_device)
    source = resolve_ref(ref, SUBJECT)
    gated = _gated_without_token(source)
    if gated:
        raise gated
    location, index = _location(source)
    if index and index.get("_class_name") != "StableDiffusionPipeline" and "unet" not in index:
        raise StencilError(
            f"model {source.label} is a {index.get('_class_name')}, not a Stable Diffusion (UNet) model",
            hint="the subject model must be SD1.5-shaped, e.g. --subject-model sd15",
        )
    pipe = _from_pretrained(
        StableDiffusionPipeline,
        location,
        source,
        dtype=dtype,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = sd15_ddim_scheduler(dict(pipe.scheduler.config))
    pipe.to(torch_device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_context_pipeline(
    ref: str, *, device: str = "auto", precision: str = "auto", no_t5: bool = False
) -> Any:
    """Load the context (draft) text-to-image pipeline; SD3-shaped for tiny / sd3-medium; --no-t5 drops T5."""
    with quiet_libraries():
        from diffusers import DiffusionPipeline

    torch_device = resolve_device(device)
    dtype = resolve_dtype(precision, torch_device)
    source = resolve_ref(ref, CONTEXT)
    gated = _gated_without_token(source)
    if gated:
        raise gated
    location, index = _location(source)
    kwargs: dict[str, Any] = {"dtype": dtype, **_absent_components(index)}
    if no_t5 and (not index or "text_encoder_3" in index):
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    if index and "safety_checker" in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = _from_pretrained(DiffusionPipeline, location, source, **kwargs)
    pipe.to(torch_device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- the tiny preset --------------------------------------------------------------------------------------

TINY_SEED = 0
TINY_VERSION = "1"  # bump when the tiny architecture changes; old folders are rebuilt


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def byte_level_clip_tokenizer(pad_token: str = "<|endoftext|>") -> Any:
    """A CLIP tokenizer over the 256 byte characters (with and without ``</w>``), no merges: offline-safe."""
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for char in chars:
        vocab[char] = len(vocab)
    for char in chars:
        vocab[char + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token=pad_token)


def _tiny_clip_config(vocab_size: int, with_projection: bool) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32 if with_projection else 32,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def build_tiny_subject_pipeline() -> Any:
    """An SD1.5-shaped pipeline with tiny fixed-seed random weights (64x64 images, 8x8 latents)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(TINY_SEED)
    tokenizer = byte_level_clip_tokenizer()
    text_encoder = CLIPTextModel(_tiny_clip_config(len(tokenizer), with_projection=False))
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    vae = _tiny_vae(latent_channels=4, scaling_factor=0.18215)
    with quiet_libraries():  # the pipeline warns about steps_offset=0, which METHOD.md asks for
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=sd15_ddim_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def _tiny_vae(**shape: Any) -> Any:
    """A 4-block VAE (latents 1/8 of the image) with tiny channels; `shape` sets the latent side."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        **shape,
    )


def build_tiny_context_pipeline() -> Any:
    """An SD3-shaped pipeline (SD3 transformer, two projecting CLIP encoders, no T5) with tiny weights."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(TINY_SEED + 1)
    tokenizer = byte_level_clip_tokenizer()
    tokenizer_2 = byte_level_clip_tokenizer(pad_token="!")
    text_encoder = CLIPTextModelWithProjection(_tiny_clip_config(len(tokenizer), with_projection=True))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(len(tokenizer_2), with_projection=True))
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # the two CLIP hidden states (32 + 32), zero-padded to T5's width in SD3
        caption_projection_dim=32,
        pooled_projection_dim=64,  # the two CLIP projections (32 + 32)
        pos_embed_max_size=16,
    )
    vae = _tiny_vae(
        latent_channels=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def build_tiny(target: Path) -> Path:
    """Build the tiny preset into `target` (``subject/`` and ``context/``) with save_pretrained."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    with quiet_libraries():
        build_tiny_subject_pipeline().save_pretrained(target / SUBJECT, safe_serialization=True)
        build_tiny_context_pipeline().save_pretrained(target / CONTEXT, safe_serialization=True)
    return target


def tiny_ready(folder: Path) -> bool:
    """Whether `folder` holds a complete tiny preset of the current version."""
    return folder_has_version(folder, TINY_VERSION)


def ensure_tiny(folder: Path | None = None) -> Path:
    """Build the tiny preset at `folder` (default: the store's) unless it is already there; returns it."""
    return build_folder_once(Path(folder) if folder is not None else tiny_dir(), TINY_VERSION, build_tiny)


# -- full-size architectures (random weights, no download) ------------------------------------------------

FULL_SIZE_PRESETS = ("sd15", "sd3-medium")


def full_size_config(preset: str) -> dict[str, Any]:
    """The shipped architecture configs of a full-size preset (``stencil_cli/configs/<preset>.json``)."""
    from importlib import resources

    if preset not in FULL_SIZE_PRESETS:
        raise BadInputError(f"no full-size config for {preset!r}: use one of {', '.join(FULL_SIZE_PRESETS)}")
    text = resources.files("stencil_cli").joinpath("configs", f"{preset}.json").read_text(encoding="utf-8")
    return json.loads(text)


def _instantiate(config: dict[str, Any]) -> torch.nn.Module:
    """Build one component with random weights from its config (diffusers or transformers class)."""
    import diffusers
    import transformers

    config = dict(config)
    class_name = config.pop("_class_name")
    if hasattr(diffusers, class_name) and not class_name.startswith(("CLIP", "T5")):
        return getattr(diffusers, class_name).from_config(config)
    model_cls = getattr(transformers, class_name)
    config_cls = model_cls.config_class
    if class_name.startswith("CLIP"):
        config_cls = transformers.CLIPTextConfig
    return model_cls(config_cls(**config))


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_full_size_component(
    preset: str, component: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """One real-sized network (e.g. sd15 unet, sd3-medium transformer) with random weights, built on device.

    ``device="meta"`` builds it without memory (shapes and parameter counts only).
    """
    components = full_size_config(preset)["components"]
    if component not in components:
        raise BadInputError(f"{preset} has no component {component!r}: use one of {', '.join(components)}")
    with quiet_libraries(), torch.device(device), _default_dtype(dtype):
        module = _instantiate(components[component])
    return module.eval()


def full_size_parameter_counts(preset: str) -> dict[str, int]:
    """Parameter count of every component of a full-size preset (built on the meta device, no memory)."""
    return {
        name: sum(p.numel() for p in build_full_size_component(preset, name, device="meta").parameters())
        for name in full_size_config(preset)["components"]
    }


def byte_level_t5_tokenizer() -> Any:
    """A T5 tokenizer over single characters (a Unigram vocabulary), for random-weight full-size SD3 runs."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(char, -2.0) for char in bytes_to_unicode().values()]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def build_full_size_pipeline(
    preset: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    no_t5: bool = False,
) -> Any:
    """A full-size SD1.5 or SD3 Medium pipeline, random weights, byte-level tokenizers (benchmarks)."""
    with quiet_libraries():
        from diffusers import (
            FlowMatchEulerDiscreteScheduler,
            StableDiffusion3Pipeline,
            StableDiffusionPipeline,
        )

    def part(name: str) -> torch.nn.Module:
        return build_full_size_component(preset, name, device=device, dtype=dtype)

    if preset == "sd15":
        with quiet_libraries():
            return StableDiffusionPipeline(
                vae=part("vae"),
                text_encoder=part("text_encoder"),
                tokenizer=byte_level_clip_tokenizer(),
                unet=part("unet"),
                scheduler=sd15_ddim_scheduler(),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
    config = full_size_config(preset)
    scheduler_config = {k: v for k, v in config["scheduler"].items() if not k.startswith("_")}
    with quiet_libraries():
        return StableDiffusion3Pipeline(
            transformer=part("transformer"),
            scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config),
            vae=part("vae"),
            text_encoder=part("text_encoder"),
            tokenizer=byte_level_clip_tokenizer(),
            text_encoder_2=part("text_encoder_2"),
            tokenizer_2=byte_level_clip_tokenizer(pad_token="!"),
            text_encoder_3=None if no_t5 else part("text_encoder_3"),
            tokenizer_3=None if no_t5 else byte_level_t5_tokenizer(),
        )


# -- what is present locally, downloading -----------------------------------------------------------------


def folder_size(path: Path) -> int:
    """Total size in bytes of the files under `path` (following a top-level symlink)."""
    total = 0
    for root, _dirs, files in os.walk(Path(path), followlinks=True):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).stat().st_size
    return total


def cached_repos() -> dict[str, dict[str, Any]]:
    """Diffusers models in the Hugging Face cache: repo id -> {path, size_bytes, revisions}."""
    from huggingface_hub import scan_cache_dir

    cache = hub_cache_dir()
    if not cache.is_dir():
        return {}
    try:
        info = scan_cache_dir(cache)
    except Exception:  # noqa: BLE001 - an unreadable cache is an empty one here
        return {}
    found: dict[str, dict[str, Any]] = {}
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        snapshots = [rev for rev in repo.revisions if (Path(rev.snapshot_path) / "model_index.json").exists()]
        if not snapshots:
            continue
        latest = max(snapshots, key=lambda rev: rev.last_modified)
        found[repo.repo_id] = {
            "path": str(latest.snapshot_path),
            "size_bytes": int(repo.size_on_disk),
            "revisions": len(repo.revisions),
        }
    return found


def model_status(
    ref: str, role: str = SUBJECT, cache: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Where a model reference points and whether it is available offline (no loading, no network)."""
    source = resolve_ref(ref, role)
    cache = cached_repos() if cache is None else cache
    row: dict[str, Any] = {
        "ref": ref,
        "kind": source.kind,
        "repo_id": source.repo_id,
        "gated": source.gated,
        "present": False,
        "path": None,
        "size_bytes": None,
    }
    if source.kind == "preset" and source.repo_id is None:
        folder = tiny_dir()
        row.update(present=tiny_ready(folder), path=str(folder))
        if row["present"]:
            row["size_bytes"] = folder_size(folder)
    elif source.kind == "local":
        assert source.path is not None
        row.update(present=(source.path / "model_index.json").is_file(), path=str(source.path))
        row["size_bytes"] = folder_size(source.path) if row["present"] else None
    elif role == EVAL and source.repo_id is not None:
        from stencil_cli.evaluation import cached_eval_model

        found = cached_eval_model(source.repo_id, hub_cache_dir())
        if found is not None:
            size = folder_size(found.weights) + (
                folder_size(found.files) if found.files != found.weights else 0
            )
            row.update(present=True, path=str(found.weights), size_bytes=size)
    elif source.repo_id in cache:
        entry = cache[source.repo_id]
        row.update(present=True, path=entry["path"], size_bytes=entry["size_bytes"])
    return row


def inspect_ref(ref: str, role: str = SUBJECT) -> tuple[ModelSource, dict[str, Any]]:
    """Resolve `ref` and read its model_index.json without loading weights; raises clear errors."""
    source = resolve_ref(ref, role)
    gated = _gated_without_token(source)
    if gated:
        raise gated
    _location_str, index = _location(source)
    return source, index


@dataclass(frozen=True)
class PulledModel:
    """What `pull` downloaded (or built): the local folder, and the Hub id and revision it came from."""

    ref: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None  # None: main; else e.g. ``refs/pr/3`` (the Hub's safetensors conversion)
    layout: str = "diffusers"  # "diffusers" | "transformers" | "tiny"


def pull_model(ref: str, role: str = SUBJECT, *, progress: bool = True) -> Path:
    """Download a Hub model (configs, tokenizers, safetensors) into the HF cache; tiny: build it."""
    return pull(ref, role, progress=progress).path


def pull(ref: str, role: str = SUBJECT, *, progress: bool = True) -> PulledModel:
    """Download a diffusers or transformers (eval) model into the HF cache, safetensors only; tiny: build it.

    ``dino`` / ``clip`` and ``owner/name@revision`` are transformers models; another Hub id is a transformers
    model when its repo has ``config.json`` but no ``model_index.json``, else a diffusers pipeline.
    """
    ref = (ref or "").strip()
    preset = PRESETS.get(ref)
    if preset is not None and preset.role == EVAL:
        assert preset.repo_id is not None
        return _pull_transformers(ref, preset.repo_id, None, progress=progress)
    if "@" in ref:
        repo_id, _sep, revision = ref.partition("@")
        if not HUB_ID_PATTERN.match(repo_id) or not revision.strip():
            raise BadInputError(f"bad model reference {ref!r}: use owner/name or owner/name@revision")
        return _pull_transformers(ref, repo_id, revision.strip(), progress=progress)
    source = resolve_ref(ref, role)
    if source.kind == "preset" and source.repo_id is None:
        return PulledModel(ref, ensure_tiny(), layout="tiny")
    if source.kind == "local":
        raise BadInputError(f"{ref} is a local folder: there is nothing to download")
    assert source.repo_id is not None
    _check_can_download(source)
    if source.kind == "hub":
        files = _hub_call(source, lambda api: api.list_repo_files(source.repo_id))
        if "model_index.json" not in files and "config.json" in files:
            return _pull_transformers(ref, source.repo_id, None, progress=progress, main_files=files)
    folder = _snapshot(source, None, PULL_ALLOW_PATTERNS, PULL_IGNORE_PATTERNS, progress=progress)
    if not (folder / "model_index.json").is_file():
        raise StencilError(
            f"{source.label} is not a diffusers model (no model_index.json)",
            hint="stencil needs a model saved in diffusers layout",
        )
    return PulledModel(ref, folder, source.repo_id)


def _check_can_download(source: ModelSource) -> None:
    if is_offline():
        raise StencilError(
            f"cannot download {source.label}: HF_HUB_OFFLINE is set",
            hint="unset HF_HUB_OFFLINE (or set it to 0) and run the command again",
        )
    gated = _gated_without_token(source)
    if gated:
        raise gated


def _hub_call(source: ModelSource, call: Any) -> Any:
    """Run ``call(HfApi())`` with Hub errors turned into one clear line."""
    from huggingface_hub import HfApi

    try:
        return call(HfApi())
    except StencilError:
        raise
    except Exception as error:  # noqa: BLE001 - translated into one line
        translated = hub_error(error, source)
        if translated is not None:
            raise translated from error
        raise StencilError(f"cannot read {source.label} on the Hugging Face Hub: {error}") from error


def _snapshot(
    source: ModelSource,
    revision: str | None,
    allow: list[str],
    ignore: list[str],
    *,
    progress: bool,
) -> Path:
    """snapshot_download into the stencil-wide HF cache with the given patterns; errors made clear."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    assert source.repo_id is not None
    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        folder = snapshot_download(
            source.repo_id,
            revision=revision,
            cache_dir=str(hub_cache_dir()),
            allow_patterns=allow,
            ignore_patterns=ignore,
        )
    except Exception as error:  # noqa: BLE001 - translated into one line
        translated = hub_error(error, source)
        if translated is not None:
            raise translated from error
        raise StencilError(f"download of {source.label} failed: {error}") from error
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    return Path(folder)


def has_safetensors(files: list[str]) -> bool:
    """Whether a repo file listing has top-level transformers safetensors weights (single or sharded)."""
    return any(name in files for name in SAFETENSORS_WEIGHTS)


def _pr_number(ref: str) -> int | None:
    match = re.fullmatch(r"refs/pr/(\d+)", ref)
    return int(match.group(1)) if match else None


def find_safetensors_revision(repo_id: str, main_files: list[str] | None = None) -> str | None:
    """The revision of `repo_id` with safetensors weights: None when ``main`` has them, else a ``refs/pr/N``.

    Official repos such as facebook/dino-vits16 keep only pickles on ``main``; the Hub's conversion bot
    (SFconvertbot) opened a pull request adding ``model.safetensors``. Its PRs are tried first (lowest number
    first), then any other PR. Raises a clear StencilError when no revision has safetensors weights.
    """
    source = ModelSource(repo_id, "hub", repo_id, None)
    files = (
        main_files if main_files is not None else _hub_call(source, lambda api: api.list_repo_files(repo_id))
    )
    if has_safetensors(files):
        return None
    if "config.json" not in files:
        raise StencilError(f"{repo_id} is not a transformers model (no config.json on main)")
    refs = _hub_call(source, lambda api: api.list_repo_refs(repo_id, include_pull_requests=True))
    prs = sorted(
        (number, item.ref)
        for item in (refs.pull_requests or [])
        if (number := _pr_number(item.ref)) is not None
    )
    try:
        discussions = _hub_call(
            source,
            lambda api: list(
                api.get_repo_discussions(repo_id, author=CONVERSION_BOT, discussion_type="pull_request")
            ),
        )
        by_bot = {int(d.num) for d in discussions}
    except StencilError:  # the discussion list is only a preference
        by_bot = set()
    prs.sort(key=lambda pr: (pr[0] not in by_bot, pr[0]))
    for _number, revision in prs:
        if has_safetensors(
            _hub_call(source, lambda api, r=revision: api.list_repo_files(repo_id, revision=r))
        ):
            return revision
    raise StencilError(
        f"{repo_id} has no safetensors weights on main or on any pull request (stencil never loads pickle "
        "files)",
        hint="convert it at https://huggingface.co/spaces/safetensors/convert, or use another model",
    )


def _pull_transformers(
    ref: str,
    repo_id: str,
    revision: str | None,
    *,
    progress: bool,
    main_files: list[str] | None = None,
) -> PulledModel:
    """Pull a transformers model (configs, tokenizer/processor files, safetensors) from the right revision."""
    source = ModelSource(
        ref, "hub", repo_id, None, gated=any(p.repo_id == repo_id and p.gated for p in PRESETS.values())
    )
    _check_can_download(source)
    if revision is None:
        revision = find_safetensors_revision(repo_id, main_files)
    else:
        files = _hub_call(source, lambda api: api.list_repo_files(repo_id, revision=revision))
        if not has_safetensors(files):
            raise StencilError(
                f"{repo_id} has no safetensors weights (model.safetensors) at revision {revision}",
                hint=f"run `stencil models pull {repo_id}` to find the revision that has them",
            )
    folder = _snapshot(
        source, revision, TRANSFORMERS_ALLOW_PATTERNS, TRANSFORMERS_IGNORE_PATTERNS, progress=progress
    )
    if not (folder / "config.json").is_file() or not any((folder / n).is_file() for n in SAFETENSORS_WEIGHTS):
        raise StencilError(f"download of {source.label} is incomplete: no config.json or model.safetensors")
    return PulledModel(ref, folder, repo_id, revision, layout="transformers")
