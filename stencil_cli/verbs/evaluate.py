"""Score generated images the way the field does: DINO and CLIP-I against the subject's photos, CLIP-T
against the prompt. `stencil eval` and the DreamBench runner score through `score_generations`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stencil_cli import models
from stencil_cli.base import events
from stencil_cli.base.errors import FieldError, NotFoundError, StencilError
from stencil_cli.base.events import Loading, Progress, no_progress
from stencil_cli.base.images import load_rgb
from stencil_cli.core.prompts import build_prompts
from stencil_cli.store.db import Store
from stencil_cli.store.records import Generation, Subject
from stencil_cli.store.settings import resolve_setting
from stencil_cli.verbs.common import refuse_missing_photos, using_subject

MAX_RANGE = 100_000  # a range is expanded into a list: keep a typo like 1-99999999999 from eating memory


@dataclass
class EvalRequest:
    """Score `name`'s generations (all, or the given ids) with the given eval models."""

    name: str
    generation_ids: list[int] | None = None
    eval_models: str | None = None  # 'DINO,CLIP', 'dino=..,clip=..' or 'tiny' (default: the paper's)
    device: str | None = None


@dataclass
class ScoredImage:
    """One generation and its scores."""

    id: int
    prompt: str | None
    image_file: str
    tau: float | None
    seed: int | None
    scores: dict[str, float]
    clip_t_text: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return dict(self.__dict__)


@dataclass
class EvalResult:
    """Every scored image, the means, and the generations skipped because their file is gone."""

    subject: str
    eval_models: dict[str, str]
    images: list[ScoredImage]
    mean: dict[str, float | None]
    missing: list[int] = field(default_factory=list)


def parse_ids(text: str | None) -> list[int] | None:
    """Parse '3,5,7' or '3-7' (or a mix) into generation ids; None when not given."""
    if text is None or not text.strip():
        return None
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        start, sep, end = part.partition("-")
        try:
            if sep:
                low, high = int(start), int(end)
                if low > high or high - low > MAX_RANGE:
                    raise ValueError
                ids.extend(range(low, high + 1))
            else:
                ids.append(int(part))
        except ValueError:
            raise FieldError(
                "generation_ids",
                f"{{}} {text!r} is not valid: use ids like 3,5,7 or a range 3-7 (at most {MAX_RANGE} ids)",
            ) from None
    if not ids:
        raise FieldError("generation_ids", f"{{}} {text!r}: no ids given")
    return list(dict.fromkeys(ids))


def select_generations(store: Store, name: str, ids: list[int] | None) -> list[Generation]:
    """The subject's generations (or those with `ids`); NotFoundError naming unknown ids."""
    rows = store.list_generations(name)
    if ids is not None:
        by_id = {row.id: row for row in rows}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise NotFoundError(
                f"subject {name!r} has no generation(s) {', '.join(map(str, unknown))} "
                f"(its ids: {', '.join(str(r.id) for r in rows) or 'none'}; see `stencil images {name}`)"
            )
        rows = [by_id[i] for i in ids]
    if not rows:
        raise StencilError(
            f"subject {name!r} has no generated images yet", hint=f"run `stencil gen {name} ...`"
        )
    return rows


def evaluate(store: Store, request: EvalRequest, *, progress: Progress = no_progress) -> EvalResult:
    """Score the selected generations (files that are gone are skipped, before any model loads).

    Progress: a `Warning` per skipped generation, then `Loading` (the eval models, the device).
    """
    refs = models.parse_eval_models(request.eval_models)
    subject = store.get_subject(request.name)
    store.require_writable(f"store the scores of {subject.name!r}")
    with using_subject(store, subject.name):  # `stencil rm` waits for the scores to be stored
        refuse_missing_photos(store, subject.name)  # DINO and CLIP-I compare with the photos
        return _evaluate(store, request, subject, refs, progress)


def _evaluate(
    store: Store, request: EvalRequest, subject: Subject, refs: Any, progress: Progress
) -> EvalResult:
    """`evaluate` while the subject is held."""
    from stencil_cli.core import evaluation

    rows = select_generations(store, request.name, request.generation_ids)
    present = [row for row in rows if row.image_file is not None and row.image_file.is_file()]
    missing = [row.id for row in rows if row not in present]
    for row_id in missing:
        progress(events.Warning(f"generation {row_id}: image file missing, skipped"))
    if not present:
        raise StencilError(
            f"none of the {len(rows)} selected image file(s) of {request.name!r} exist: nothing to score",
            hint=f"generate new ones with `stencil gen {request.name} ...`",
        )
    device = models.resolve_device(resolve_setting(store, "device", request.device))
    progress(Loading(f"{refs.dino} and {refs.clip}", str(device)))
    loaded = models.load_eval_models(refs, device, store_root=store.root)
    scored = score_generations(store, subject, present, loaded)
    mean = evaluation.mean_scores([image.scores for image in scored])
    return EvalResult(subject.name, refs.to_dict(), scored, mean, missing)


def clip_t_text(generation: Generation, subject: Subject) -> str:
    """The text CLIP-T compares with: the subject prompt the image was rendered from (phrase included)."""
    prompt = generation.prompt or ""
    phrase = subject.phrase or subject.class_word
    if not phrase:
        return prompt
    try:
        return build_prompts(prompt, phrase).prompt
    except ValueError:
        return prompt


def score_generations(
    store: Store,
    subject: Subject,
    generations: list[Generation],
    models: Any,
    *,
    on_missing: Callable[[Generation], None] | None = None,
) -> list[ScoredImage]:
    """Score `generations` of `subject` against its photos, store the scores, return one row per image.

    A generation whose image file is gone is skipped (and passed to `on_missing`).
    """
    from stencil_cli.core import evaluation

    photos = [load_rgb(Path(image["file"])) for image in subject.images if Path(image["file"]).is_file()]
    if not photos:
        raise StencilError(f"subject {subject.name!r} has no photos to compare against")
    references = evaluation.embed_references(models, photos)
    present = [g for g in generations if g.image_file is not None and g.image_file.is_file()]
    if on_missing is not None:
        for missing in (g for g in generations if g not in present):
            on_missing(missing)
    images = [load_rgb(g.image_file) for g in present if g.image_file is not None]
    texts = [clip_t_text(g, subject) for g in present]
    scores = evaluation.score_images(models, images, references, texts)
    rows = []
    for generation, text, score in zip(present, texts, scores, strict=True):
        stored = {
            **score.to_dict(),
            "eval_models": models.refs.to_dict(),
            "clip_t_text": text,
            "references": references.count,
        }
        store.set_generation_scores(generation.id, stored)
        rows.append(
            ScoredImage(
                id=generation.id,
                prompt=generation.prompt,
                image_file=str(generation.image_file),
                tau=generation.tau,
                seed=generation.seed,
                scores=score.to_dict(),
                clip_t_text=text,
            )
        )
    return rows
