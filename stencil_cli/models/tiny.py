"""The ``tiny`` preset: tiny random-weight models with the real shapes, for tests and offline smoke runs.

* Diffusion: an SD1.5-shaped subject pipeline (UNet with cross-attention, 64x64 images, 8x8 latents) and an
  SD3-shaped context pipeline (SD3 transformer, two projecting CLIP encoders, no T5), under
  ``<store root>/models/tiny/{subject,context}``.
* Draft models of today's shapes: ``tiny-sd35`` (SD3.5's transformer options: RMS qk-norm, dual-attention
  layers) and ``tiny-flux`` (a FLUX transformer, CLIP + T5 encoders, FLUX's 16-channel VAE), each under
  ``<store root>/models/<name>``.
* Evaluation: a ViT standing in for DINO and a CLIP, under ``<store root>/models/tiny-eval/{dino,clip}``.

Each is built once with fixed seeds, saved with ``save_pretrained`` (safetensors) and then loaded back
through the same ``from_pretrained`` path as the real models. The tokenizers are byte-level CLIP tokenizers
(no merges, nothing downloaded). torch is imported inside the builders, so importing this is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stencil_cli.base.fsutil import build_folder_once, folder_has_version
from stencil_cli.models.devices import quiet_libraries
from stencil_cli.models.refs import (
    CONTEXT,
    SUBJECT,
    TINY,
    TINY_FLUX,
    TINY_SD35,
    TINY_SDXL,
    local_preset_dir,
    tiny_dir,
    tiny_eval_dir,
)
from stencil_cli.models.scheduler import sd15_ddim_scheduler

TINY_SEED = 0
TINY_VERSION = "1"  # bump when the tiny architecture changes; old folders are rebuilt
TINY_EVAL_VERSION = "1"  # the same for the tiny eval models
TINY_EVAL_SEED = 0
TINY_DRAFT_VERSION = "1"  # the same for tiny-sd35 and tiny-flux
TINY_SDXL_VERSION = "1"  # the same for the tiny SDXL subject model
T5_WINDOW = 512  # the T5 tokenizer's model_max_length in SD3's and FLUX's repos
TINY_EVAL_IMAGE_SIZE = 32


# -- byte-level tokenizers --------------------------------------------------------------------------------


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


def byte_level_t5_tokenizer() -> Any:
    """A T5 (unigram) tokenizer over the 256 byte characters, one token each, no merges: offline-safe."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(char, -2.0) for char in bytes_to_unicode().values()]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_WINDOW)


def _tiny_t5_encoder(vocab_size: int, width: int) -> Any:
    """A two-layer T5 encoder (gated GELU like T5 v1.1 / T5-XXL) of width `width`."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=width,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


# -- the tiny diffusion pipelines -------------------------------------------------------------------------


def _tiny_clip_config(vocab_size: int, with_projection: bool, layers: int = 2, width: int = 32) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32 if with_projection else 32,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def build_tiny_subject_pipeline() -> Any:
    """An SD1.5-shaped pipeline with tiny fixed-seed random weights (64x64 images, 8x8 latents)."""
    import torch
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
    import torch
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


def build_tiny_sd35_pipeline() -> Any:
    """An SD3.5-shaped draft pipeline: SD3 transformer with RMS qk-norm and a dual-attention layer, CLIP-L/G
    and a T5 encoder (tiny, random, fixed seed)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(TINY_SEED + 2)
    tokenizer = byte_level_clip_tokenizer()
    tokenizer_2 = byte_level_clip_tokenizer(pad_token="!")
    tokenizer_3 = byte_level_t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # T5's width; the two CLIP states (32 + 32) are zero-padded to it
        caption_projection_dim=32,
        pooled_projection_dim=64,  # the two CLIP projections (32 + 32)
        pos_embed_max_size=16,
        qk_norm="rms_norm",  # SD3.5's QK normalisation
        dual_attention_layers=(0,),  # SD3.5 Medium's MMDiT-X: the first layers attend twice
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_tiny_vae(
            latent_channels=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=CLIPTextModelWithProjection(_tiny_clip_config(len(tokenizer), with_projection=True)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_tiny_clip_config(len(tokenizer_2), with_projection=True)),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_tiny_t5_encoder(len(tokenizer_3), width=64),
        tokenizer_3=tokenizer_3,
    )


def build_tiny_flux_pipeline() -> Any:
    """A FLUX-shaped draft pipeline: FLUX transformer (no guidance embedding, as schnell), CLIP (pooled) and
    T5 (sequence) encoders, FLUX's 16-channel VAE (tiny, random, fixed seed)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(TINY_SEED + 3)
    tokenizer = byte_level_clip_tokenizer()
    tokenizer_2 = byte_level_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's width
        pooled_projection_dim=32,  # CLIP's pooled output (its hidden size, as CLIP-L's 768)
        guidance_embeds=False,  # schnell: timestep-distilled, no guidance input
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as (16, 56, 56) sums to 128
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),  # schnell's
        vae=_tiny_vae(
            latent_channels=16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=CLIPTextModel(_tiny_clip_config(len(tokenizer), with_projection=False)),
        tokenizer=tokenizer,
        text_encoder_2=_tiny_t5_encoder(len(tokenizer_2), width=32),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


DRAFT_BUILDERS = {TINY_SD35: build_tiny_sd35_pipeline, TINY_FLUX: build_tiny_flux_pipeline}


def build_tiny_sdxl_pipeline() -> Any:
    """An SDXL-shaped pipeline with tiny fixed-seed random weights (64x64 images, 8x8 latents).

    Like SDXL base: two CLIP encoders (the second projecting, its pooled output feeds the UNet), a UNet with
    ``text_time`` added conditioning, cross-attention at two resolutions and a block with two transformer
    layers, ``force_zeros_for_empty_prompt``.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(TINY_SEED + 2)
    tokenizer = byte_level_clip_tokenizer()
    tokenizer_2 = byte_level_clip_tokenizer(pad_token="!")
    # narrower than the second encoder, as in SDXL (768 / 1280): from_single_file tells them apart by width
    text_encoder = CLIPTextModel(_tiny_clip_config(len(tokenizer), with_projection=False, width=16))
    # ten layers, tiny ones: diffusers' from_single_file tells an SDXL checkpoint by its OpenCLIP layer 9
    text_encoder_2 = CLIPTextModelWithProjection(
        _tiny_clip_config(len(tokenizer_2), with_projection=True, layers=10)
    )
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=48,  # the two encoders' hidden states side by side (16 + 32)
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=32 + 6 * time_dim,  # pooled (32) + six time ids
        norm_num_groups=8,
    )
    vae = _tiny_vae(latent_channels=4, scaling_factor=0.13025)
    with quiet_libraries():
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=sd15_ddim_scheduler(),
            force_zeros_for_empty_prompt=True,
        )


def build_tiny_sdxl(target: Path) -> Path:
    """Build the tiny SDXL preset into `target` (``subject/``) with save_pretrained."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    with quiet_libraries():
        build_tiny_sdxl_pipeline().save_pretrained(target / SUBJECT, safe_serialization=True)
    return target


def ensure_tiny_sdxl(folder: Path | None = None) -> Path:
    """Build the tiny SDXL preset at `folder` (default: the default store's) unless it is there."""
    target = Path(folder) if folder is not None else local_preset_dir(TINY_SDXL)
    return build_folder_once(target, TINY_SDXL_VERSION, build_tiny_sdxl)


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
    """Build the tiny preset at `folder` (default: the default store's) unless it is there; returns it."""
    return build_folder_once(Path(folder) if folder is not None else tiny_dir(), TINY_VERSION, build_tiny)


def _draft_builder(name: str) -> Any:
    """A function that builds draft preset `name` into a folder's ``context/`` with save_pretrained."""

    def build(target: Path) -> Path:
        with quiet_libraries():
            DRAFT_BUILDERS[name]().save_pretrained(Path(target) / CONTEXT, safe_serialization=True)
        return Path(target)

    return build


LOCAL_PRESET_VERSIONS = {
    TINY: TINY_VERSION,
    TINY_SDXL: TINY_SDXL_VERSION,
    TINY_SD35: TINY_DRAFT_VERSION,
    TINY_FLUX: TINY_DRAFT_VERSION,
}


def ensure_local_preset(name: str, folder: Path) -> Path:
    """Build the locally built preset `name` at `folder` (``<store root>/models/<name>``) unless it is in."""
    if name in DRAFT_BUILDERS:
        return build_folder_once(Path(folder), TINY_DRAFT_VERSION, _draft_builder(name))
    if name == TINY_SDXL:
        return ensure_tiny_sdxl(folder)
    return ensure_tiny(folder)


def local_preset_ready(name: str, folder: Path) -> bool:
    """Whether `folder` holds the locally built preset `name` at its current version."""
    return folder_has_version(Path(folder), LOCAL_PRESET_VERSIONS[name])


# -- the tiny evaluation models ---------------------------------------------------------------------------


def build_tiny_eval(target: Path) -> Path:
    """Build the tiny DINO-like ViT and the tiny CLIP into `target` (``dino/`` and ``clip/``)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    size = TINY_EVAL_IMAGE_SIZE
    target = Path(target)
    with quiet_libraries():
        torch.manual_seed(TINY_EVAL_SEED)
        vit = ViTModel(
            ViTConfig(
                image_size=size,
                patch_size=8,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
            ),
            add_pooling_layer=False,
        )
        vit.save_pretrained(target / "dino", safe_serialization=True)
        ViTImageProcessorPil(
            size={"height": size, "width": size},
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        ).save_pretrained(target / "dino")

        tokenizer = byte_level_clip_tokenizer()
        vocab = len(tokenizer)
        torch.manual_seed(TINY_EVAL_SEED + 1)
        clip = CLIPModel(
            CLIPConfig(
                text_config={
                    "vocab_size": vocab,
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "max_position_embeddings": 77,
                    "bos_token_id": vocab - 2,
                    "eos_token_id": vocab - 1,
                    "pad_token_id": vocab - 1,
                },
                vision_config={
                    "image_size": size,
                    "patch_size": 8,
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                },
                projection_dim=32,
            )
        )
        clip.save_pretrained(target / "clip", safe_serialization=True)
        tokenizer.save_pretrained(target / "clip")
        CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ).save_pretrained(target / "clip")
    return target


def ensure_tiny_eval(folder: Path | None = None) -> Path:
    """Build the tiny eval models at `folder` (default: the default store's) unless present; process-safe."""
    target = Path(folder) if folder is not None else tiny_eval_dir()
    return build_folder_once(target, TINY_EVAL_VERSION, build_tiny_eval)
