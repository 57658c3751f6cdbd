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
in [-1, 1]. Model references: Hub ids, local folders saved with ``save_pretrained``, or the ``tiny`` preset
(random-weight ViT and CLIP built locally by ``tiny_eval.py``, for tests and offline smoke runs).

This module never touches the store and never prints.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from stencil_cli.errors import BadInputError, StencilError

DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
TINY = "tiny"
EVAL_MODELS_ENV = "STENCIL_EVAL_MODELS"
BATCH_SIZE = 16
SCORE_KEYS = ("dino", "clip_i", "clip_t")

# -- model references ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalModelRefs:
    """Which DINO and CLIP models score images (Hub ids, local folders or the tiny preset)."""

    dino: str = DEFAULT_DINO
    clip: str = DEFAULT_CLIP

    def to_dict(self) -> dict[str, str]:
        """A JSON-ready view."""
        return {"dino": self.dino, "clip": self.clip}


def parse_eval_models(spec: str | None) -> EvalModelRefs:
    """Parse ``--eval-models``: empty/``default``, ``tiny``, ``DINO,CLIP`` or ``dino=REF,clip=REF``."""
    text = (spec or "").strip()
    if text in ("", "default"):
        return EvalModelRefs()
    if text == TINY:
        return EvalModelRefs(TINY, TINY)
    parts = [part.strip() for part in text.split(",")]
    if any(not part for part in parts) or len(parts) > 2:
        raise BadInputError(
            f"bad --eval-models {spec!r}: use 'tiny', 'DINO_REF,CLIP_REF' or 'dino=REF,clip=REF' "
            f"(default: {DEFAULT_DINO},{DEFAULT_CLIP})"
        )
    named: dict[str, str] = {}
    positional: list[str] = []
    for part in parts:
        key, sep, value = part.partition("=")
        if sep:
            key = key.strip().lower()
            if key not in ("dino", "clip") or not value.strip():
                raise BadInputError(f"bad --eval-models entry {part!r}: use dino=REF or clip=REF")
            named[key] = value.strip()
        else:
            positional.append(part)
    if named and positional:
        raise BadInputError(f"bad --eval-models {spec!r}: do not mix 'REF' and 'dino=REF' forms")
    if positional:
        if len(positional) != 2:
            raise BadInputError(f"bad --eval-models {spec!r}: give two models, DINO_REF,CLIP_REF (or 'tiny')")
        return EvalModelRefs(positional[0], positional[1])
    return EvalModelRefs(named.get("dino", DEFAULT_DINO), named.get("clip", DEFAULT_CLIP))


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class _Location:
    """Where from_pretrained loads an eval model from."""

    ref: str
    path: str  # local folder or Hub id
    hub: bool
    revision: str | None = None  # Hub branch, tag, ``refs/pr/N`` or commit
    files: str | None = None  # local folder with config/processor/tokenizer files, if not beside the weights


def split_revision(ref: str) -> tuple[str, str | None]:
    """``owner/name@revision`` -> (``owner/name``, ``revision``); no ``@``: (ref, None)."""
    repo, sep, revision = ref.partition("@")
    return (repo, revision.strip() or None) if sep else (ref, None)


@dataclass(frozen=True)
class CachedModel:
    """A Hub model found in the local cache: the snapshot with the weights and the one with the configs."""

    weights: Path
    files: Path


def _snapshots(repo_id: str, cache_dir: Path) -> list[Path]:
    """The cached snapshot folders of `repo_id`: the one `main` points to first, then newest first."""
    folder = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    if not (folder / "snapshots").is_dir():
        return []
    try:
        main = (folder / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        main = None
    found = [snap for snap in (folder / "snapshots").iterdir() if snap.is_dir()]
    return sorted(found, key=lambda snap: (snap.name != main, -snap.stat().st_mtime))


def cached_eval_model(repo_id: str, cache_dir: Path) -> CachedModel | None:
    """Find `repo_id`'s safetensors weights and config/processor files in the Hugging Face cache.

    The official DINO and CLIP repos keep their safetensors weights only on the Hub's conversion pull request
    (``refs/pr/N``); online, transformers fetches the weights from there and the configs from ``main``, so
    the two may sit in different snapshots. Offline, both are found here.
    """
    snapshots = _snapshots(repo_id, cache_dir)
    weights = next(
        (
            s
            for s in snapshots
            if (s / "model.safetensors").is_file() or (s / "model.safetensors.index.json").is_file()
        ),
        None,
    )
    if weights is None:
        return None

    def complete(snap: Path) -> bool:
        return (snap / "config.json").is_file() and (snap / "preprocessor_config.json").is_file()

    files = weights if complete(weights) else next((s for s in snapshots if complete(s)), None)
    return CachedModel(weights, files) if files is not None else None


def pull_command(ref: str) -> str:
    """The command that downloads eval model `ref` for offline use (the presets for the default models)."""
    presets = {DEFAULT_DINO: "dino", DEFAULT_CLIP: "clip"}
    if ref in presets:
        return "stencil models pull dino clip"
    return f"stencil models pull {ref}"


def _locate(ref: str, kind: str) -> _Location:
    """Resolve one eval model reference (tiny / local folder / Hub id[@revision]); offline-aware errors."""
    if ref == TINY:
        from stencil_cli.tiny_eval import ensure_tiny_eval

        return _Location(ref, str(ensure_tiny_eval() / kind), hub=False)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise StencilError(f"{ref} is not a transformers model folder (no config.json)")
        return _Location(ref, str(path.resolve()), hub=False)
    repo_id, revision = split_revision(ref)
    if path.exists() or ref.startswith((".", "/", "~")) or not _HUB_ID.match(repo_id):
        raise BadInputError(
            f"unknown {kind} eval model {ref!r}: use a Hub id (owner/name[@revision]), a folder or 'tiny'"
        )
    from stencil_cli.models import hub_cache_dir, is_offline

    if is_offline() and revision is None:
        cached = cached_eval_model(repo_id, hub_cache_dir())
        if cached is None:
            raise StencilError(
                f"eval model {repo_id} (configs and safetensors weights) is not in the Hugging Face cache "
                "and HF_HUB_OFFLINE is set",
                hint=f"run `{pull_command(ref)}` while online (see docs/evaluation.md); "
                "or use --eval-models tiny for a smoke run",
            )
        return _Location(ref, str(cached.weights), hub=False, files=str(cached.files))
    return _Location(ref, repo_id, hub=True, revision=revision)


def _load(cls: Any, location: _Location, *, weights: bool = True, **kwargs: Any) -> Any:
    """from_pretrained with safetensors only, the HF cache and offline mode; errors become one line."""
    from stencil_cli.models import ModelSource, hub_cache_dir, hub_error, is_offline, quiet_libraries

    if location.hub:
        kwargs.setdefault("cache_dir", str(hub_cache_dir()))
        if location.revision:
            kwargs["revision"] = location.revision
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
        source = ModelSource(location.ref, "hub" if location.hub else "local", location.path, None)
        translated = hub_error(error, source)
        if translated is not None:
            if translated.hint and "models pull" in translated.hint:  # name the eval pull, with revision
                translated.hint = f"run `{pull_command(location.ref)}` while online (see docs/evaluation.md)"
            raise translated from error
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if weights and "safetensors" in first.lower():
            raise StencilError(
                f"eval model {location.ref} has no safetensors weights (stencil never loads pickle files)",
                hint=f"run `stencil models pull {split_revision(location.ref)[0]}` (it finds the Hub's "
                "safetensors pull request), or pin one: owner/name@refs/pr/N",
            ) from error
        raise StencilError(f"cannot load eval model {location.ref}: {first}") from error


# -- loaded models ------------------------------------------------------------------------------------


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


def load_eval_models(refs: EvalModelRefs = EvalModelRefs(), device: str | torch.device = "cpu") -> EvalModels:
    """Load DINO (ViTModel, no pooler) and CLIP with their image processors and tokenizer onto `device`."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, ViTModel

    torch_device = torch.device(device)
    dino_at = _locate(refs.dino, "dino")
    clip_at = _locate(refs.clip, "clip")
    dino = _load(ViTModel, dino_at, add_pooling_layer=False).to(torch_device, torch.float32).eval()
    dino_processor = _load(AutoImageProcessor, dino_at, weights=False, backend="pil")
    clip = _load(CLIPModel, clip_at).to(torch_device, torch.float32).eval()
    clip_processor = _load(AutoImageProcessor, clip_at, weights=False, backend="pil")
    clip_tokenizer = _load(AutoTokenizer, clip_at, weights=False)
    return EvalModels(refs, torch_device, dino, dino_processor, clip, clip_processor, clip_tokenizer)


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
            import difflib

            close = difflib.get_close_matches(name, list(bench.subjects), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise BadInputError(f"unknown DreamBench subject {name!r}{hint} (see {PROMPT_FILE})")
        if name not in present:
            raise BadInputError(f"DreamBench subject {name!r} has no photo folder {Path(folder) / name}")
        if name not in chosen:
            chosen.append(name)
    return chosen

