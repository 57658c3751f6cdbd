"""Tiny random-weight evaluation models (a ViT standing in for DINO, a CLIP) for the ``tiny`` preset.

Built once with fixed seeds, saved with ``save_pretrained`` (safetensors) under
``<store root>/models/tiny-eval/{dino,clip}`` and loaded back through the same ``from_pretrained`` path as
the real models, so ``--eval-models tiny`` exercises every line of evaluation offline, on a CPU, in seconds.
The CLIP tokenizer is the byte-level one of the tiny diffusion models (no merges, no download).
"""

from __future__ import annotations

from pathlib import Path

import torch

from stencil_cli.fsutil import build_folder_once, folder_has_version

TINY_EVAL_VERSION = "1"  # bump when the architecture changes; old folders are rebuilt
TINY_EVAL_SEED = 0
IMAGE_SIZE = 32


def tiny_eval_dir(store_root: Path | None = None) -> Path:
    """Where the tiny eval models live: ``<store root>/models/tiny-eval``."""
    from stencil_cli.models import models_root

    return models_root(store_root) / "tiny-eval"


def build_tiny_eval(target: Path) -> Path:
    """Build the tiny DINO-like ViT and the tiny CLIP into `target` (``dino/`` and ``clip/``)."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    from stencil_cli.models import byte_level_clip_tokenizer, quiet_libraries

    target = Path(target)
    with quiet_libraries():
        torch.manual_seed(TINY_EVAL_SEED)
        vit = ViTModel(
            ViTConfig(
                image_size=IMAGE_SIZE,
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
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
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
                    "image_size": IMAGE_SIZE,
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
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ).save_pretrained(target / "clip")
    return target


def tiny_eval_ready(folder: Path) -> bool:
    """Whether `folder` holds complete tiny eval models of the current version."""
    return folder_has_version(folder, TINY_EVAL_VERSION)


def ensure_tiny_eval(folder: Path | None = None) -> Path:
    """Build the tiny eval models at `folder` (default: the store's) unless present; safe across processes."""
    target = Path(folder) if folder is not None else tiny_eval_dir()
    return build_folder_once(target, TINY_EVAL_VERSION, build_tiny_eval)
