"""Fine-tuning with the Cross-Attention Guided Loss (METHOD.md, section 2): the loop and its checkpoints.

The loop is written out step by step: photos are cropped to squares that keep the subject (a non-square
photo: one mask pass on the whole photo, letterboxed, places its crop; `base.crops`) and encoded to latents
once, captions to embeddings once, and the subject masks are computed once (`attention.compute_masks`) with
the frozen model, on the crops that are trained.
Each step samples references (with replacement when there are fewer than the batch), a timestep uniform in
[0, 1000) and Gaussian noise, all from one CPU generator, and minimises ``mean((mask * (eps - eps_hat))^2)``.

The trained parameters go into a weights file through `core.weights`; the resumable checkpoints (the
optimiser, the RNG and the loss curve besides the parameters) are this module's own. It takes models,
tensors and dataclasses; it never touches the store and never prints.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from PIL import Image

from stencil_cli.base.crops import (
    CROP_CHOICES,
    Box,
    CropChoice,
    box_from_canvas_mask,
    centre_box,
    crop_resize,
    letterbox,
)
from stencil_cli.base.errors import DiskFullError, FieldError, StencilError
from stencil_cli.base.fsutil import atomic_write_with
from stencil_cli.base.images import center_crop_resize
from stencil_cli.core.attention import (
    DEFAULT_MASK_TIMESTEP,
    DEFAULT_THRESHOLD,
    MASK_FROM,
    MaskFrom,
    compute_masks,
    token_weights,
)
from stencil_cli.core.precision import DEFAULT_SAVE_DTYPE, SAVE_DTYPES
from stencil_cli.core.weights import (
    KIND_FULL,
    KIND_LORA,
    WeightsKind,
    add_lora,
    largest_lora_rank,
    trained_state,
)
from stencil_cli.models.devices import DtypeName

CHECKPOINT_VERSION = 1
MAX_LORA_RANK = 1024  # documented in docs/training.md; the model's own layers usually bound it lower
TrainedPart = Literal["decoder", "all"]  # the decoder (up_blocks), the paper's choice, or the whole UNet
TRAIN_CHOICES: tuple[TrainedPart, ...] = get_args(TrainedPart)
AUTOCAST_DTYPES: dict[DtypeName, torch.dtype | None] = {
    "fp32": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@dataclass
class TrainConfig:
    """Training settings (paper defaults). `precision` is the autocast dtype; master weights stay fp32."""

    steps: int = 100
    batch_size: int = 6
    lr: float = 2e-5
    threshold: float = DEFAULT_THRESHOLD
    seed: int = 0
    resolution: int = 512
    train: TrainedPart = "decoder"
    use_mask: bool = True
    precision: DtypeName = "fp32"  # the autocast dtype
    gradient_checkpointing: bool = False
    mask_timestep: int = DEFAULT_MASK_TIMESTEP
    checkpoint_every: int = 0
    save_dtype: DtypeName = DEFAULT_SAVE_DTYPE  # fp32: the update (~1/50 of a weight) survives exactly
    mask_from: MaskFrom = "caption"  # the paper's, or the authors' [empty, caption] batch averaged
    lora_rank: int | None = None  # None: fine-tune the decoder itself (the paper); N: LoRA adapters of rank N
    lora_alpha: float | None = None  # LoRA scale numerator (alpha / rank); None: alpha = rank
    crop: CropChoice = "subject"  # runs from before subject crops have no "crop" in their params: "centre"

    @property
    def kind(self) -> WeightsKind:
        """``lora`` when training LoRA adapters, else ``full``."""
        return KIND_LORA if self.lora_rank else KIND_FULL

    @property
    def effective_lora_alpha(self) -> float:
        """The LoRA alpha in use (the rank when none was given)."""
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank or 0)

    def validate(self) -> None:
        """Raise BadInputError for values that cannot work."""
        if self.steps < 1:
            raise FieldError("steps", f"must be at least 1 (got {self.steps})")
        if self.batch_size < 1:
            raise FieldError("batch_size", f"must be at least 1 (got {self.batch_size})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FieldError("lr", f"must be a positive number (got {self.lr})")
        if not 0.0 <= self.threshold <= 1.0:
            raise FieldError("threshold", f"must be between 0 and 1 (got {self.threshold})")
        if self.resolution < 8 or self.resolution % 8:
            raise FieldError("resolution", f"must be a multiple of 8, at least 8 (got {self.resolution})")
        if self.train not in TRAIN_CHOICES:
            raise FieldError("train", f"must be one of {', '.join(TRAIN_CHOICES)} (got {self.train!r})")
        if self.precision not in AUTOCAST_DTYPES:
            raise FieldError("precision", f"must be fp32, fp16 or bf16 for training (got {self.precision!r})")
        if self.save_dtype not in SAVE_DTYPES:
            choices = ", ".join(SAVE_DTYPES)
            raise FieldError("save_dtype", f"must be one of {choices} (got {self.save_dtype!r})")
        if self.checkpoint_every < 0:
            raise FieldError("checkpoint_every", "must be 0 (off) or a positive number of steps")
        if self.mask_from not in MASK_FROM:
            raise FieldError("mask_from", f"must be one of {', '.join(MASK_FROM)} (got {self.mask_from!r})")
        if not 0 <= self.mask_timestep < 1000:
            raise FieldError("mask_timestep", "must be in [0, 1000)")
        if self.crop not in CROP_CHOICES:
            raise FieldError("crop", f"must be one of {', '.join(CROP_CHOICES)} (got {self.crop!r})")
        if self.lora_rank is not None and (isinstance(self.lora_rank, bool) or int(self.lora_rank) < 1):
            raise FieldError("lora_rank", f"must be at least 1 (got {self.lora_rank})")
        if self.lora_rank is not None and int(self.lora_rank) > MAX_LORA_RANK:
            raise FieldError(
                "lora_rank",
                f"must be at most {MAX_LORA_RANK} (got {self.lora_rank}); the paper's method fine-tunes the "
                "whole decoder: train without LoRA for the full update",
            )
        if self.lora_alpha is not None and not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise FieldError("lora_alpha", f"must be a positive number (got {self.lora_alpha})")

    def to_params(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (stored in the run row and the weights' metadata)."""
        return asdict(self)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainConfig:
        """Rebuild a config from `to_params` output (unknown keys ignored)."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in params.items() if k in known})


# -- data ----------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """Everything the loop needs, precomputed once: latents, caption embeddings, masks."""

    latents: torch.Tensor  # (n, c, h, w) scaled VAE latents, fp32
    embeddings: torch.Tensor  # (n, seq, d) caption embeddings, fp32
    masks: torch.Tensor  # (n, 1, h, w) in {0, 1}; all ones with --no-mask
    maps: torch.Tensor | None  # (n, hc, wc) normalised attention maps, None with --no-mask
    crops: list[Image.Image] = field(default_factory=list)  # the square crops that are trained
    boxes: list[Box] = field(default_factory=list)  # where each crop lies in its photo (pixels)


def square_crop(image: Image.Image, box: Box | None, resolution: int) -> Image.Image:
    """The photo's square `box` at `resolution`; None (or a square photo): the centre crop."""
    if box is None or image.width == image.height:
        return center_crop_resize(image, resolution)
    return crop_resize(image, box, resolution)


def images_to_tensor(
    images: Sequence[Image.Image], resolution: int, boxes: Sequence[Box | None] | None = None
) -> tuple[torch.Tensor, list[Image.Image]]:
    """Crop each photo to its square (`boxes`; the centre by default) at `resolution` and scale to [-1, 1]:
    (n, 3, R, R) and the crops."""
    boxes = list(boxes) if boxes is not None else [None] * len(images)
    pairs = zip(images, boxes, strict=True)
    crops = [square_crop(image.convert("RGB"), box, resolution) for image, box in pairs]
    return _to_unit_range(crops), crops


def _to_unit_range(images: Sequence[Image.Image]) -> torch.Tensor:
    arrays = np.stack([np.asarray(image, dtype=np.float32) / 127.5 - 1.0 for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def encode_latents(vae: Any, pixels: torch.Tensor, *, batch_size: int = 4) -> torch.Tensor:
    """VAE latents (distribution mode, times the scaling factor) of [-1, 1] pixels, as fp32."""
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    out = []
    for start in range(0, pixels.shape[0], batch_size):
        chunk = pixels[start : start + batch_size].to(device, dtype)
        out.append(vae.encode(chunk).latent_dist.mode().float() * vae.config.scaling_factor)
    return torch.cat(out)


@torch.no_grad()
def encode_captions(tokenizer: Any, text_encoder: Any, captions: Sequence[str]) -> torch.Tensor:
    """Text-encoder hidden states of the captions (padded to the tokenizer's length), as fp32."""
    device = next(text_encoder.parameters()).device
    ids = tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return text_encoder(ids)[0].float()


def prepare_training_data(
    pipe: Any,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    phrase: str | None,
    config: TrainConfig,
) -> TrainingData:
    """Encode photos and captions once and compute the subject masks with the frozen UNet.

    With masks, each non-square photo's crop is placed on its subject first (`subject_boxes`); the masks
    are then computed on the crops that are trained. Square photos (and use_mask off) are centre-cropped."""
    if len(images) != len(captions) or not images:
        raise ValueError("need one caption per photo, and at least one photo")
    weights = token_weights(pipe.tokenizer, captions, phrase or "") if config.use_mask else None
    embeddings = encode_captions(pipe.tokenizer, pipe.text_encoder, captions)
    empty = (
        encode_captions(pipe.tokenizer, pipe.text_encoder, [""])
        if weights is not None and config.mask_from == "both"
        else None
    )
    boxes: list[Box | None] = [None] * len(images)
    if weights is not None and config.crop == "subject":
        boxes = subject_boxes(pipe, images, embeddings, weights, config, empty)
    pixels, crops = images_to_tensor(images, config.resolution, boxes)
    latents = encode_latents(pipe.vae, pixels)
    chosen = [box or centre_box(*image.size) for image, box in zip(images, boxes, strict=True)]
    if weights is None:
        masks = torch.ones(latents.shape[0], 1, *latents.shape[-2:], device=latents.device)
        return TrainingData(latents, embeddings, masks, None, crops, chosen)
    result = _mask_pass(pipe, latents, embeddings, weights, config, empty)
    return TrainingData(latents, embeddings, result.masks.to(latents.device), result.maps, crops, chosen)


def _mask_pass(
    pipe: Any,
    latents: torch.Tensor,
    embeddings: torch.Tensor,
    weights: torch.Tensor,
    config: TrainConfig,
    empty: torch.Tensor | None,
) -> Any:
    """The frozen UNet's subject masks of `latents` with the config's mask settings."""
    return compute_masks(
        pipe.unet,
        pipe.scheduler,
        latents,
        embeddings,
        weights,
        threshold=config.threshold,
        timestep=config.mask_timestep,
        seed=config.seed,
        batch_size=config.batch_size,  # photos per frozen pass; the training step holds more than this
        mask_from=config.mask_from,
        empty_embedding=empty,
    )


def subject_boxes(
    pipe: Any,
    images: Sequence[Image.Image],
    embeddings: torch.Tensor,
    weights: torch.Tensor,
    config: TrainConfig,
    empty: torch.Tensor | None = None,
) -> list[Box | None]:
    """Each non-square photo's square crop, placed on its subject by one mask pass on the whole photo
    letterboxed to the resolution (`base.crops`); None for square photos (the centre crop, as before)."""
    boxes: list[Box | None] = [None] * len(images)
    todo = [index for index, image in enumerate(images) if image.width != image.height]
    if not todo:
        return boxes
    placed = [letterbox(images[index], config.resolution) for index in todo]
    latents = encode_latents(pipe.vae, _to_unit_range([canvas for canvas, _ in placed]))
    masks = _mask_pass(pipe, latents, embeddings[todo], weights[todo], config, empty).masks
    for row, (index, (_, where)) in enumerate(zip(todo, placed, strict=True)):
        grid = masks[row].detach().float().cpu().squeeze(0).numpy()
        boxes[index] = box_from_canvas_mask(images[index].size, grid, where, config.resolution)
    return boxes


def overlay_mask(crop: Image.Image, mask: torch.Tensor, *, size: int = 256) -> Image.Image:
    """The photo with the mask tinted red and everything outside it dimmed (a picture for people)."""
    side = min(size, crop.width)
    photo = crop.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    grid = (mask.detach().float().cpu().squeeze().numpy() * 255).astype(np.uint8)
    alpha = Image.fromarray(grid, mode="L").resize((side, side), Image.Resampling.NEAREST)
    inside = Image.blend(photo, Image.new("RGB", photo.size, (255, 40, 40)), 0.35)
    outside = Image.blend(photo, Image.new("RGB", photo.size, (0, 0, 0)), 0.6)
    return Image.composite(inside, outside, alpha)


# -- the loss and the trained parameters ---------------------------------------------------------


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The Cross-Attention Guided Loss: mean((mask * (target - prediction))^2), in fp32."""
    error = mask.float() * (target.float() - prediction.float())
    return error.pow(2).mean()


def trainable_names(unet: Any, which: TrainedPart = "decoder") -> list[str]:
    """Names of the parameters `which` trains: the decoder (`up_blocks.*`) or all of the UNet."""
    if which not in TRAIN_CHOICES:
        raise FieldError("train", f"must be one of {', '.join(TRAIN_CHOICES)} (got {which!r})")
    names = [name for name, _ in unet.named_parameters()]
    return names if which == "all" else [name for name in names if name.startswith("up_blocks.")]


def freeze_except(unet: Any, names: Sequence[str]) -> list[torch.nn.Parameter]:
    """Make only `names` trainable (requires_grad); return those parameters in order."""
    wanted = set(names)
    params = []
    for name, param in unet.named_parameters():
        param.requires_grad_(name in wanted)
        if name in wanted:
            params.append(param)
    return params


def make_optimizer(params: Sequence[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam without weight decay; fused kernels on CUDA, foreach elsewhere."""
    device = params[0].device.type if params else "cpu"
    if device == "cuda":
        with contextlib.suppress(RuntimeError, TypeError):
            return torch.optim.Adam(params, lr=lr, weight_decay=0.0, fused=True)
    return torch.optim.Adam(params, lr=lr, weight_decay=0.0, foreach=True)


# -- checkpoints ---------------------------------------------------------------------------------


def save_checkpoint(
    path: Path,
    *,
    unet: Any,
    names: Sequence[str],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    scaler: Any,
    step: int,
    losses: Sequence[float],
    config: TrainConfig,
) -> Path:
    """Write a resumable checkpoint (fp32 trained params, optimiser, RNG, loss curve) atomically."""
    state = {
        "version": CHECKPOINT_VERSION,
        "step": step,
        "losses": list(losses),
        "config": config.to_params(),
        "params": trained_state(unet, names, torch.float32),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    atomic_write_with(Path(path), lambda tmp: _save_through_python_file(state, tmp))
    return Path(path)


def _save_through_python_file(state: Any, path: Path) -> None:
    # torch writes a path in C++ and reports a full disk as "[enforce fail at inline_container.cc]" alone;
    # through a Python file the OSError (ENOSPC, EFBIG) stays attached, so a full disk is recognised.
    with open(path, "wb") as handle:
        torch.save(state, handle)


def load_checkpoint(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (tensors only, no pickled code).

    `mmap=True` maps the tensors instead of reading them: cheap when only the step count is wanted.
    """
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError as error:
        raise StencilError(f"no checkpoint at {path}") from error
    except Exception as error:  # noqa: BLE001
        raise StencilError(f"checkpoint {path} cannot be read ({error}); start a fresh run") from error
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise StencilError(f"checkpoint {path} is from another stencil version; start a fresh run")
    if not mmap:
        damaged = first_non_finite(state)
        if damaged is not None:
            raise StencilError(
                f"checkpoint {path} is corrupt (non-finite values in {damaged})",
                hint="start a fresh run (train without {resume})",
                fields=("resume",),
            )
    return state


def first_non_finite(value: Any, where: str = "") -> str | None:
    """The place of the first floating-point tensor holding NaN or infinity in a nested state, or None."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            return where or "a tensor"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (where or "a number")
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if key == "generator":  # the RNG state is bytes, not numbers
            continue
        found = first_non_finite(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


# -- the loop ------------------------------------------------------------------------------------


@dataclass
class TrainingLoopResult:
    """What the training loop produced: the trained names, the loss curve, the steps, a checkpoint writer."""

    names: list[str]  # the trained parameter names
    losses: list[float]  # one per step, from step 1
    steps: int  # steps done in all (including resumed ones)
    save_checkpoint: Callable[[Path], Path] | None = None  # writes a resumable checkpoint of the end state


def _sample_indices(count: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    if count >= batch:
        return torch.randperm(count, generator=generator)[:batch]
    return torch.randint(0, count, (batch,), generator=generator)  # with replacement


def check_lora_rank(unet: Any, rank: int | None, which: str = "decoder") -> None:
    """Refuse a LoRA rank above what the adapted layers can hold: min(in, out) of the smallest of them (a
    higher rank adds parameters, not expressiveness)."""
    if not rank:
        return
    largest = largest_lora_rank(unet, which)
    if largest and int(rank) > largest:
        raise FieldError(
            "lora_rank",
            f"{{}} {rank} is more than this model's adapted layers allow ({largest}: the smallest layer's "
            "input or output size)",
        )


def train_unet(
    unet: Any,
    scheduler: Any,
    data: TrainingData,
    config: TrainConfig,
    *,
    checkpoint_path: Path | None = None,
    resume: dict[str, Any] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    sample_every: int = 0,
    on_sample: Callable[[int, Any], None] | None = None,
    on_checkpoint_full: Callable[[int, DiskFullError], None] | None = None,
) -> TrainingLoopResult:
    """Fine-tune `unet` in place for `config.steps` steps (continuing a checkpoint if `resume` is given).

    The trained parameters must be fp32 (the master weights); forward passes run under autocast when
    `config.precision` is fp16/bf16. `on_step(step, loss)` is called after every step; KeyboardInterrupt
    propagates (the caller marks the run interrupted). With `config.checkpoint_every` and
    `checkpoint_path`, a resumable checkpoint is written atomically every N steps. With `sample_every` and
    `on_sample`, ``on_sample(step, unet)`` is called every N steps (after `on_step`) with the UNet in eval
    mode (training resumes afterwards); it may render with the UNet but must not change its weights.
    A checkpoint that does not fit on the disk calls ``on_checkpoint_full(step, error)`` and training goes on
    (the previous checkpoint stays); without that hook the DiskFullError propagates.
    """
    config.validate()
    device = next(unet.parameters()).device
    if config.lora_rank:  # adapters on the decoder's attention projections; the base weights stay frozen
        names = add_lora(unet, int(config.lora_rank), config.effective_lora_alpha, config.train)
    else:
        names = trainable_names(unet, config.train)
    params = freeze_except(unet, names)
    bad = [(name, p.dtype) for name, p in zip(names, params, strict=True) if p.dtype != torch.float32]
    if bad:
        raise ValueError(f"trained parameters must be fp32 master weights ({bad[0][0]} is {bad[0][1]})")
    optimizer = make_optimizer(params, config.lr)
    autocast_dtype = AUTOCAST_DTYPES[config.precision]
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
    generator = torch.Generator("cpu").manual_seed(config.seed)
    losses: list[float] = []
    step = 0
    if resume is not None:
        if resume["params"].keys() != set(names):
            raise StencilError("the checkpoint trained other parameters than this run; start a fresh run")
        by_name = dict(unet.named_parameters())
        with torch.no_grad():
            for name, tensor in resume["params"].items():
                by_name[name].copy_(tensor.to(device))
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        step = int(resume["step"])
        losses = [float(x) for x in resume["losses"]]
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    latents = data.latents.to(device, torch.float32)
    embeddings = data.embeddings.to(device, torch.float32)
    masks = data.masks.to(device, torch.float32)
    num_timesteps = int(scheduler.config.num_train_timesteps)
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    use_autocast = autocast_dtype is not None
    every = config.checkpoint_every if checkpoint_path is not None else 0

    def checkpoint_now(path: Path) -> Path:
        return save_checkpoint(
            path,
            unet=unet,
            names=names,
            optimizer=optimizer,
            generator=generator,
            scaler=scaler,
            step=step,
            losses=losses,
            config=config,
        )

    try:
        while step < config.steps:
            index = _sample_indices(latents.shape[0], config.batch_size, generator)
            noise = torch.randn((config.batch_size, *latents.shape[1:]), generator=generator).to(device)
            timesteps = torch.randint(0, num_timesteps, (config.batch_size,), generator=generator).to(device)
            index = index.to(device)
            clean = latents[index]
            noisy = scheduler.add_noise(clean, noise, timesteps)
            if prediction_type == "v_prediction":
                target = scheduler.get_velocity(clean, noise, timesteps)
            else:
                target = noise
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=use_autocast):
                prediction = unet(noisy, timesteps, encoder_hidden_states=embeddings[index]).sample
            loss = masked_mse(prediction, target, masks[index])
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                if resume is not None and step == int(resume["step"]) + 1:
                    raise StencilError(
                        f"the loss became {value} at the first step after resuming (step {step}): "
                        "the checkpoint looks corrupt",
                        hint="start a fresh run (train without {resume})",
                        fields=("resume",),
                    )
                raise StencilError(
                    f"the loss became {value} at step {step}; try a lower {{lr}} or {{precision=fp32}}",
                    fields=("lr", "precision"),
                )
            losses.append(value)
            if every and step % every == 0:
                assert checkpoint_path is not None
                try:
                    checkpoint_now(checkpoint_path)
                except DiskFullError as error:
                    if on_checkpoint_full is None:
                        raise
                    on_checkpoint_full(step, error)
            if on_step is not None:
                on_step(step, value)
            if on_sample is not None and sample_every > 0 and step % sample_every == 0:
                unet.eval()
                try:
                    on_sample(step, unet)
                finally:
                    unet.train()
    finally:
        unet.eval()
        if config.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        for param in unet.parameters():
            param.requires_grad_(False)
    return TrainingLoopResult(names=names, losses=losses, steps=step, save_checkpoint=checkpoint_now)
