"""Evaluation as the field measures it (METHOD.md, Evaluation): DINO, CLIP-I and CLIP-T; DreamBench prompts.

Scores, for one generated image ``g`` of a subject with reference photos ``r_1..r_n`` and prompt ``p``:

* **DINO**: mean over the references of ``cos(dino(g), dino(r_j))``, where ``dino(x)`` is the CLS token of the
  last hidden state of DINO ViT-S/16 (``facebook/dino-vits16``; not the pooler, which DINO never trained).
* **CLIP-I**: the same mean pairwise cosine with CLIP image embeddings (``openai/clip-vit-base-patch32``,
  projected ``get_image_features``).
* **CLIP-T**: ``cos(clip_text(p), clip_image(g))``. The text is the prompt the subject model rendered, which
  names the subject by its class word / phrase ("a dog in the jungle"). Stencil binds no rare identifier, so
  this is also the form DreamBooth-style evaluations use: the prompt with the identifier token dropped.

A subject's (or a benchmark's) score is the mean over its generated images. Every score is a cosine and lies
in [-1, 1]. The scoring models arrive loaded: `stencil_cli.models.load_eval_models` finds them (presets, Hub
ids, local folders or the ``tiny`` preset) and returns an `EvalModels`.

This module never touches the store, never loads models and never prints.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from stencil_cli.base.errors import BadInputError, StencilError
from stencil_cli.models import EvalModels

BATCH_SIZE = 16
SCORE_KEYS = ("dino", "clip_i", "clip_t")

# -- embeddings ---------------------------------------------------------------------------------------


def _features(output: Any) -> torch.Tensor:
    """Projected CLIP features from get_*_features (a tensor in transformers 4, an output object in 5)."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def _batches(items: Sequence[Any], size: int = BATCH_SIZE) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _pixels(processor: Any, images: Sequence[Image.Image], device: torch.device) -> torch.Tensor:
    rgb = [image.convert("RGB") for image in images]
    return processor(images=rgb, return_tensors="pt")["pixel_values"].to(device, torch.float32)


@torch.no_grad()
def dino_embeddings(models: EvalModels, images: Sequence[Image.Image]) -> torch.Tensor:
    """L2-normalised DINO CLS-token embeddings of `images` (shape [n, dim])."""
    out = []
    for batch in _batches(images):
        pixels = _pixels(models.dino_processor, batch, models.device)
        out.append(models.dino(pixel_values=pixels).last_hidden_state[:, 0])  # CLS token, not the pooler
    return torch.nn.functional.normalize(torch.cat(out).float().cpu(), dim=-1)


@torch.no_grad()
def clip_image_embeddings(models: EvalModels, images: Sequence[Image.Image]) -> torch.Tensor:
    """L2-normalised CLIP image embeddings (projected) of `images` (shape [n, dim])."""
    out = []
    for batch in _batches(images):
        pixels = _pixels(models.clip_processor, batch, models.device)
        out.append(_features(models.clip.get_image_features(pixel_values=pixels)))
    return torch.nn.functional.normalize(torch.cat(out).float().cpu(), dim=-1)


@torch.no_grad()
def clip_text_embeddings(models: EvalModels, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised CLIP text embeddings (projected) of `texts` (truncated to 77 tokens)."""
    out = []
    max_length = min(int(getattr(models.clip_tokenizer, "model_max_length", 77) or 77), 77)
    for batch in _batches(list(texts)):
        tokens = models.clip_tokenizer(
            list(batch), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        features = models.clip.get_text_features(
            input_ids=tokens["input_ids"].to(models.device),
            attention_mask=tokens["attention_mask"].to(models.device),
        )
        out.append(_features(features))
    return torch.nn.functional.normalize(torch.cat(out).float().cpu(), dim=-1)


# -- scores -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageScores:
    """The three scores of one generated image."""

    dino: float
    clip_i: float
    clip_t: float

    def to_dict(self) -> dict[str, float]:
        """A JSON-ready view."""
        return asdict(self)


@dataclass
class References:
    """A subject's reference photos, embedded once and reused for every generated image."""

    dino: torch.Tensor
    clip: torch.Tensor
    count: int = field(default=0)


def embed_references(models: EvalModels, references: Sequence[Image.Image]) -> References:
    """Embed the real photos of a subject with DINO and CLIP."""
    if not references:
        raise StencilError("no reference photos to compare against (add photos with `stencil add`)")
    dino = dino_embeddings(models, references)
    return References(dino, clip_image_embeddings(models, references), len(references))


def _clamp(value: float) -> float:
    # float rounding may give 1.0000001 for identical images; anything further out is a bug, not rounding
    if not -1.0 - 1e-4 <= value <= 1.0 + 1e-4:
        raise ValueError(f"cosine similarity {value} is outside [-1, 1]: embeddings were not normalised")
    return max(-1.0, min(1.0, value))


def score_images(
    models: EvalModels,
    generated: Sequence[Image.Image],
    references: Sequence[Image.Image] | References,
    prompts: Sequence[str],
) -> list[ImageScores]:
    """Score each generated image against the references (DINO, CLIP-I) and its own prompt (CLIP-T)."""
    if len(generated) != len(prompts):
        raise ValueError(f"{len(generated)} images but {len(prompts)} prompts")
    if not generated:
        return []
    refs = references if isinstance(references, References) else embed_references(models, references)
    dino = dino_embeddings(models, generated) @ refs.dino.T  # [n, refs]
    clip_image = clip_image_embeddings(models, generated)
    clip_i = clip_image @ refs.clip.T
    text = clip_text_embeddings(models, prompts)
    clip_t = (clip_image * text).sum(dim=-1)
    return [
        ImageScores(
            dino=_clamp(float(dino[i].mean())),
            clip_i=_clamp(float(clip_i[i].mean())),
            clip_t=_clamp(float(clip_t[i])),
        )
        for i in range(len(generated))
    ]


def mean_scores(scores: Sequence[ImageScores | dict[str, float]]) -> dict[str, float | None]:
    """The mean of each score over `scores` (None for an empty list)."""
    rows = [s.to_dict() if isinstance(s, ImageScores) else s for s in scores]
    result: dict[str, float | None] = {}
    for key in SCORE_KEYS:
        values = [float(row[key]) for row in rows if row.get(key) is not None]
        result[key] = sum(values) / len(values) if values else None
    return result


# -- DreamBench ---------------------------------------------------------------------------------------

PROMPT_FILE = "prompts_and_classes.txt"
# DreamBooth (Ruiz et al. 2023) splits its 30 subjects into 21 objects and 9 live subjects (the cats and
# dogs); the prompt file lists the classes but not the split, so the split follows the class word.
LIVE_CLASSES = frozenset({"cat", "dog"})
_TEMPLATE = re.compile(r"""^\s*(['"])(?P<text>.*?)\1\s*\.format\(""")


@dataclass(frozen=True)
class BenchSubject:
    """One DreamBench subject: its folder name, class word and whether it is a live subject."""

    name: str
    class_word: str
    live: bool


@dataclass(frozen=True)
class DreamBench:
    """The parsed prompt file: subjects with classes, and the object / live-subject prompt templates."""

    subjects: dict[str, BenchSubject]
    object_prompts: tuple[str, ...]
    live_prompts: tuple[str, ...]

    def templates(self, subject: str) -> tuple[str, ...]:
        """The prompt templates of `subject` (live-subject list for cats and dogs, object list otherwise)."""
        return self.live_prompts if self.subjects[subject].live else self.object_prompts

    def prompts(self, subject: str, token: str = "") -> list[str]:
        """The subject's prompts with the class word filled in (and `token`, empty for Stencil)."""
        class_word = self.subjects[subject].class_word
        return [format_prompt(template, class_word, token) for template in self.templates(subject)]


def format_prompt(template: str, class_word: str, token: str = "") -> str:
    """Fill a DreamBench template ('a {0} {1} in the jungle') with an identifier (may be empty) and class."""
    return " ".join(template.format(token, class_word).split())


def parse_prompt_file(text: str) -> DreamBench:
    """Parse ``prompts_and_classes.txt``: the ``subject_name,class`` table and the two prompt lists."""
    subjects: dict[str, BenchSubject] = {}
    lists: dict[str, list[str]] = {}
    section: str | None = None
    current: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        lowered = line.lower()
        if not line:
            continue
        if lowered == "classes":
            section = "classes"
            continue
        if lowered == "prompts":
            section = "prompts"
            continue
        if lowered in ("object prompts", "live subject prompts"):
            section = "prompts"
            current = "object" if lowered.startswith("object") else "live"
            lists[current] = []
            continue
        if section == "classes":
            if lowered.replace(" ", "") == "subject_name,class":
                continue
            name, sep, class_word = line.partition(",")
            if sep and name.strip() and class_word.strip():
                name, class_word = name.strip(), " ".join(class_word.split())
                subjects[name] = BenchSubject(name, class_word, class_word in LIVE_CLASSES)
            continue
        if section == "prompts" and current is not None:
            match = _TEMPLATE.match(line)
            if match:
                lists[current].append(match.group("text"))
    problems = []
    if not subjects:
        problems.append("no 'subject_name,class' table")
    if not lists.get("object"):
        problems.append("no object prompts")
    if not lists.get("live"):
        problems.append("no live subject prompts")
    if problems:
        raise BadInputError(f"cannot read the DreamBench prompt file: {', '.join(problems)}")
    return DreamBench(subjects, tuple(lists["object"]), tuple(lists["live"]))


def load_dreambench(folder: Path) -> DreamBench:
    """Read a DreamBench folder's prompt file; a missing folder or file is a clear BadInputError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(f"no such DreamBench folder: {folder}")
    prompt_file = folder / PROMPT_FILE
    if not prompt_file.is_file():
        raise BadInputError(
            f"{folder} has no {PROMPT_FILE}: give the DreamBench dataset folder (the one with the subject "
            "folders and the prompt file)"
        )
    return parse_prompt_file(prompt_file.read_text(encoding="utf-8"))


def available_subjects(bench: DreamBench, folder: Path) -> list[str]:
    """Subjects of the prompt file that have a photo folder in `folder`, in prompt-file order."""
    return [name for name in bench.subjects if (Path(folder) / name).is_dir()]


def select_subjects(bench: DreamBench, folder: Path, wanted: Sequence[str] | None) -> list[str]:
    """Validate ``--subjects`` against the prompt file and the folders; default: every subject present."""
    present = available_subjects(bench, folder)
    if not wanted:
        if not present:
            raise BadInputError(f"{folder} has no subject folders named in {PROMPT_FILE}")
        return present
    chosen: list[str] = []
    for name in wanted:
        if name not in bench.subjects:
            close = difflib.get_close_matches(name, list(bench.subjects), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise BadInputError(f"unknown DreamBench subject {name!r}{hint} (see {PROMPT_FILE})")
        if name not in present:
            raise BadInputError(f"DreamBench subject {name!r} has no photo folder {Path(folder) / name}")
        if name not in chosen:
            chosen.append(name)
    return chosen
