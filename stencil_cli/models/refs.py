"""Model references: the presets, and turning what the user wrote into a `ModelSource`.

A reference is a preset name (``sd15``, ``sd3-medium``, ``tiny``; ``dino`` / ``clip`` for the evaluation
models), a Hub id (``owner/name``; evaluation models may pin ``owner/name@revision``) or a local folder
saved with ``save_pretrained``. Resolving a reference reads no weights and touches no network. Locally
built presets (the tiny models) live under ``<store root>/models/``; the store root is given by the caller
(default: `stencil_cli.base.paths.default_root`), this module never imports the store.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stencil_cli.base.errors import BadInputError
from stencil_cli.base.paths import default_root

ModelRole = Literal["subject", "context", "eval"]  # what a reference is resolved (and loaded) for
PresetRole = Literal["subject", "context", "both", "eval"]  # what a preset serves (tiny: both pipelines)
SourceKind = Literal["preset", "hub", "local"]
SUBJECT: ModelRole = "subject"
CONTEXT: ModelRole = "context"
EVAL: ModelRole = "eval"  # transformers models that score images (evaluation.py), not diffusion pipelines
TINY = "tiny"
TINY_SDXL = "tiny-sdxl"
TINY_FLUX = "tiny-flux"
TINY_SD35 = "tiny-sd35"
T5Need = Literal["optional", "required"]  # whether a draft model can run without its T5 encoder (--no-t5)

DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"


@dataclass(frozen=True)
class DraftDefaults:
    """How a draft (context) model renders by default: its model card's steps and guidance, and its T5."""

    steps: int
    guidance: float
    t5: T5Need = "optional"
    max_sequence_length: int | None = None  # the T5 window its card uses (None: the pipeline's default)


# The paper's draft: SD3 Medium as the reference code runs it (METHOD.md: 50 steps, guidance 7.5). A draft
# model that is not a preset (a Hub id or folder no preset names) renders with these too.
PAPER_DRAFT = DraftDefaults(steps=50, guidance=7.5)
STABILITY_LICENCE = "Stability AI Community License"


@dataclass(frozen=True)
class Preset:
    """A named model: where it comes from and what it is for."""

    name: str
    role: PresetRole
    repo_id: str | None  # Hub id, None for locally built presets
    gated: bool = False
    description: str = ""
    licence: str = ""
    draft: DraftDefaults | None = None  # draft (context) presets: how they render by default


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
        licence=STABILITY_LICENCE,
        draft=PAPER_DRAFT,
    ),
    # model cards: 40 steps / guidance 4.5 (medium), 4 steps / guidance 0 (turbo, adversarially distilled)
    "sd35-medium": Preset(
        "sd35-medium",
        CONTEXT,
        "stabilityai/stable-diffusion-3.5-medium",
        gated=True,
        description="Stable Diffusion 3.5 Medium (gated: accept its licence on the Hub, then log in)",
        licence=STABILITY_LICENCE,
        draft=DraftDefaults(steps=40, guidance=4.5),
    ),
    "sd35-large-turbo": Preset(
        "sd35-large-turbo",
        CONTEXT,
        "stabilityai/stable-diffusion-3.5-large-turbo",
        gated=True,
        description="Stable Diffusion 3.5 Large Turbo, 4 steps (gated: accept its licence, then log in)",
        licence=STABILITY_LICENCE,
        draft=DraftDefaults(steps=4, guidance=0.0),
    ),
    # model card and diffusers' FLUX page: 4 steps, guidance 0, max_sequence_length at most 256; FLUX reads
    # the prompt's sequence through T5 only (CLIP gives the pooled vector), so T5 cannot be left out
    "flux-schnell": Preset(
        "flux-schnell",
        CONTEXT,
        "black-forest-labs/FLUX.1-schnell",
        description="FLUX.1 [schnell], 4 steps (Apache-2.0, not gated)",
        licence="Apache-2.0",
        draft=DraftDefaults(steps=4, guidance=0.0, t5="required", max_sequence_length=256),
    ),
    TINY: Preset(
        TINY, "both", None, description="tiny random-weight models built locally", draft=PAPER_DRAFT
    ),
    TINY_SD35: Preset(
        TINY_SD35,
        CONTEXT,
        None,
        description="tiny random-weight SD3.5-shaped draft model built locally (as sd35-medium)",
        draft=DraftDefaults(steps=40, guidance=4.5),
    ),
    TINY_FLUX: Preset(
        TINY_FLUX,
        CONTEXT,
        None,
        description="tiny random-weight FLUX-shaped draft model built locally (as flux-schnell)",
        draft=DraftDefaults(steps=4, guidance=0.0, t5="required", max_sequence_length=256),
    ),
    "sdxl": Preset(
        "sdxl",
        SUBJECT,
        "stabilityai/stable-diffusion-xl-base-1.0",
        description="Stable Diffusion XL base 1.0 (a 1024 px subject model)",
        licence="CreativeML Open RAIL++-M",
    ),
    TINY_SDXL: Preset(
        TINY_SDXL, SUBJECT, None, description="tiny random-weight SDXL-shaped subject model built locally"
    ),
    # the default evaluation models (DEFAULT_DINO / DEFAULT_CLIP); transformers layout
    "dino": Preset("dino", EVAL, DEFAULT_DINO, description="DINO ViT-S/16 (DINO score)"),
    "clip": Preset("clip", EVAL, DEFAULT_CLIP, description="CLIP ViT-B/32 (CLIP-I and CLIP-T scores)"),
}

HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model reference."""

    ref: str  # what the user wrote
    kind: SourceKind
    repo_id: str | None  # Hub id for hub sources and Hub presets
    path: Path | None  # folder for local sources and built presets
    gated: bool = False
    revision: str | None = None  # Hub branch, tag, ``refs/pr/N`` or commit (evaluation models only)
    role: ModelRole = SUBJECT

    @property
    def label(self) -> str:
        """A short human name for messages."""
        return self.ref if self.kind != "hub" else self.repo_id or self.ref


# -- where locally built models live ----------------------------------------------------------------------


def models_root(store_root: Path) -> Path:
    """The store's folder of locally built models: ``<store root>/models``."""
    return Path(store_root) / "models"


def tiny_dir(store_root: Path | None = None) -> Path:
    """Where the tiny preset lives: ``<store root>/models/tiny`` with ``subject/`` and ``context/``."""
    return models_root(store_root if store_root is not None else default_root()) / "tiny"


def local_preset_dir(name: str, store_root: Path | None = None) -> Path:
    """Where a locally built preset (``tiny``, ``tiny-sdxl``, ``tiny-sd35``, ``tiny-flux``) lives:
    ``<store root>/models/<name>`` (its pipelines in ``subject/`` and ``context/``)."""
    return models_root(store_root if store_root is not None else default_root()) / name


def tiny_eval_dir(store_root: Path | None = None) -> Path:
    """Where the tiny eval models live: ``<store root>/models/tiny-eval`` with ``dino/`` and ``clip/``."""
    return models_root(store_root if store_root is not None else default_root()) / "tiny-eval"


# -- resolving references ---------------------------------------------------------------------------------


def split_revision(ref: str) -> tuple[str, str | None]:
    """``owner/name@revision`` -> (``owner/name``, ``revision``); no ``@``: (ref, None)."""
    repo, sep, revision = ref.partition("@")
    return (repo, revision.strip() or None) if sep else (ref, None)


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref


def is_gated_repo(repo_id: str) -> bool:
    """Whether `repo_id` is the Hub repo of a gated preset."""
    return any(p.repo_id == repo_id and p.gated for p in PRESETS.values())


def resolve_ref(ref: str, role: ModelRole = SUBJECT, *, store_root: Path | None = None) -> ModelSource:
    """Turn a model reference (preset, Hub id, local folder) into a `ModelSource`; bad refs raise.

    `role` is ``subject`` or ``context`` for diffusion pipelines and ``eval`` for the scoring models (which
    also take ``owner/name@revision``). `store_root` locates the tiny preset (default: the default store).
    """
    if role == EVAL:
        return _resolve_eval_ref(ref, store_root)
    ref = (ref or "").strip()
    if not ref:
        raise BadInputError(
            "empty model reference: use a preset (sd15, sd3-medium, tiny), a Hub id or a folder"
        )
    if ref in PRESETS:
        preset = PRESETS[ref]
        if preset.role == EVAL:
            raise BadInputError(
                f"{ref} is an evaluation model ({preset.repo_id}), not a diffusion model: use sd15, "
                "sd3-medium, tiny, a Hub id or a folder"
            )
        if preset.repo_id is None:  # built locally: a one-role preset has only that role's pipeline
            folder = preset.role if preset.role in (SUBJECT, CONTEXT) else role
            return ModelSource(ref, "preset", None, local_preset_dir(ref, store_root) / folder, role=role)
        return ModelSource(ref, "preset", preset.repo_id, None, gated=preset.gated, role=role)
    path = Path(ref).expanduser()
    if path.is_dir():
        return ModelSource(ref, "local", None, path.resolve(), role=role)
    if _looks_like_path(ref) or path.exists():
        if path.exists():
            raise BadInputError(f"{ref} is a file, not a model folder: give a folder in diffusers layout")
        raise BadInputError(f"no such model folder: {ref}")
    if HUB_ID_PATTERN.match(ref):
        return ModelSource(ref, "hub", ref, None, gated=is_gated_repo(ref), role=role)

    close = difflib.get_close_matches(ref, list(PRESETS), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise BadInputError(
        f"unknown model {ref!r}: {hint}use a preset (sd15, sdxl, sd3-medium, tiny, tiny-sdxl), a Hub id like "
        "owner/name, or a local diffusers folder"
    )


def _resolve_eval_ref(ref: str, store_root: Path | None) -> ModelSource:
    """An eval model: dino / clip / tiny, a transformers folder, or a Hub id with an optional revision."""
    ref = (ref or "").strip()
    preset = PRESETS.get(ref)
    if preset is not None and preset.role == EVAL:
        return ModelSource(ref, "preset", preset.repo_id, None, gated=preset.gated, role=EVAL)
    if ref == TINY:
        return ModelSource(ref, "preset", None, tiny_eval_dir(store_root), role=EVAL)
    path = Path(ref).expanduser()
    if ref and path.is_dir():
        return ModelSource(ref, "local", None, path.resolve(), role=EVAL)
    repo_id, revision = split_revision(ref)
    if not ref or path.exists() or ref.startswith((".", "/", "~")) or not HUB_ID_PATTERN.match(repo_id):
        raise BadInputError(
            f"unknown eval model {ref!r}: use dino, clip, a Hub id (owner/name[@revision]), a folder "
            "or 'tiny'"
        )
    return ModelSource(ref, "hub", repo_id, None, gated=is_gated_repo(repo_id), revision=revision, role=EVAL)


def preset_for(ref: str) -> Preset | None:
    """The preset a diffusion model reference names: by preset name or by its Hub id (None: no preset)."""
    ref = (ref or "").strip()
    if ref in PRESETS:
        return PRESETS[ref]
    return next((p for p in PRESETS.values() if p.repo_id is not None and p.repo_id == ref), None)


def draft_defaults(ref: str | None) -> DraftDefaults:
    """How draft model `ref` renders by default: its preset's card settings, else the paper's 50 / 7.5."""
    preset = preset_for(ref or "")
    return preset.draft if preset is not None and preset.draft is not None else PAPER_DRAFT


def t5_required_error(label: str) -> BadInputError:
    """The refusal of {no_t5} for a draft model that reads the prompt only through T5 (FLUX)."""
    return BadInputError(
        f"{{no_t5}} does not apply to {label}: FLUX reads the prompt through its T5 encoder only (CLIP gives "
        "just a pooled vector), so T5 cannot be left out; drop {no_t5} or pick an SD3-family draft model",
        fields=("no_t5",),
    )


def pull_command(source: ModelSource) -> str:
    """The command that downloads `source` for offline use (both default eval models at once)."""
    if source.role == EVAL and source.revision is None and source.repo_id in (DEFAULT_DINO, DEFAULT_CLIP):
        return "stencil models pull dino clip"
    if source.kind == "preset" or source.revision is not None:
        return f"stencil models pull {source.ref}"
    return f"stencil models pull {source.repo_id}"


# -- evaluation model choices -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalModelRefs:
    """Which DINO and CLIP models score images (presets, Hub ids, local folders or the tiny preset)."""

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
            f"bad {{eval_models}} {spec!r}: use 'tiny', 'DINO_REF,CLIP_REF' or 'dino=REF,clip=REF' "
            f"(default: {DEFAULT_DINO},{DEFAULT_CLIP})",
            fields=("eval_models",),
        )
    named: dict[str, str] = {}
    positional: list[str] = []
    for part in parts:
        key, sep, value = part.partition("=")
        if sep:
            key = key.strip().lower()
            if key not in ("dino", "clip") or not value.strip():
                raise BadInputError(
                    f"bad {{eval_models}} entry {part!r}: use dino=REF or clip=REF", fields=("eval_models",)
                )
            named[key] = value.strip()
        else:
            positional.append(part)
    if named and positional:
        raise BadInputError(
            f"bad {{eval_models}} {spec!r}: do not mix 'REF' and 'dino=REF' forms", fields=("eval_models",)
        )
    if positional:
        if len(positional) != 2:
            raise BadInputError(
                f"bad {{eval_models}} {spec!r}: give two models, DINO_REF,CLIP_REF (or 'tiny')",
                fields=("eval_models",),
            )
        return EvalModelRefs(positional[0], positional[1])
    return EvalModelRefs(named.get("dino", DEFAULT_DINO), named.get("clip", DEFAULT_CLIP))
