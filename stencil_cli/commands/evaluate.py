"""`stencil eval`: score a subject's generated images (DINO, CLIP-I, CLIP-T) and store the scores."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from stencil_cli.clikit import JsonOption, handle_errors
from stencil_cli.commands.options import DeviceOption, setting
from stencil_cli.errors import BadInputError, NotFoundError, StencilError
from stencil_cli.output import escape, info, print_json, warn
from stencil_cli.store import Store, Subject, open_store

EvalModelsOption = Annotated[
    str | None,
    typer.Option(
        "--eval-models",
        envvar="STENCIL_EVAL_MODELS",
        help="DINO and CLIP models: 'DINO_REF,CLIP_REF', 'dino=REF,clip=REF' or 'tiny' (random, offline). "
        "[default: facebook/dino-vits16,openai/clip-vit-base-patch32]",
        show_default=False,
    ),
]


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
                if low > high:
                    raise ValueError
                ids.extend(range(low, high + 1))
            else:
                ids.append(int(part))
        except ValueError:
            raise BadInputError(f"bad --generations {text!r}: use ids like 3,5,7 or a range 3-7") from None
    if not ids:
        raise BadInputError(f"bad --generations {text!r}: no ids given")
    return list(dict.fromkeys(ids))


def clip_t_text(generation: dict[str, Any], subject: Subject) -> str:
    """The text CLIP-T compares with: the subject prompt the image was rendered from (phrase included)."""
    from stencil_cli.generation import build_prompts

    prompt = generation.get("prompt") or ""
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
    generations: list[dict[str, Any]],
    models: Any,
) -> list[dict[str, Any]]:
    """Score `generations` of `subject` against its photos, store the scores, return one row per image."""
    from stencil_cli import evaluation
    from stencil_cli.images import load_rgb

    photos = [load_rgb(Path(image["file"])) for image in subject.images if Path(image["file"]).is_file()]
    if not photos:
        raise StencilError(f"subject {subject.name!r} has no photos to compare against")
    references = evaluation.embed_references(models, photos)
    present = [g for g in generations if g.get("image_file") and Path(g["image_file"]).is_file()]
    for missing in (g for g in generations if g not in present):
        warn(f"generation {missing['id']}: image file missing, skipped")
    images = [load_rgb(Path(g["image_file"])) for g in present]
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
        store.set_generation_scores(generation["id"], stored)
        rows.append(
            {
                "id": generation["id"],
                "prompt": generation.get("prompt"),
                "image_file": generation["image_file"],
                "scores": score.to_dict(),
                "clip_t_text": text,
            }
        )
    return rows


@handle_errors
def evaluate(
    name: Annotated[str, typer.Argument(help="Subject name.")],
    generations: Annotated[
        str | None,
        typer.Option("--generations", help="Only these generation ids (3,5,7 or 3-7). [default: all]"),
    ] = None,
    eval_models: EvalModelsOption = None,
    device: DeviceOption = None,
    json_output: JsonOption = False,
) -> None:
    """Score a subject's generated images: DINO and CLIP-I against its photos, CLIP-T against the prompt."""
    from stencil_cli import evaluation, models

    refs = evaluation.parse_eval_models(eval_models)
    ids = parse_ids(generations)
    store = open_store()
    subject = store.get_subject(name)
    rows = store.list_generations(name)
    if ids is not None:
        by_id = {row["id"]: row for row in rows}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise NotFoundError(
                f"subject {name!r} has no generation(s) {', '.join(map(str, unknown))} "
                f"(its ids: {', '.join(str(r['id']) for r in rows) or 'none'})"
            )
        rows = [by_id[i] for i in ids]
    if not rows:
        raise StencilError(
            f"subject {name!r} has no generated images yet", hint=f"run `stencil gen {name} ...`"
        )
    torch_device = models.resolve_device(setting(store, "device", device))
    info(f"loading eval models {escape(refs.dino)} and {escape(refs.clip)} on {torch_device} ...")
    loaded = evaluation.load_eval_models(refs, torch_device)
    scored = score_generations(store, subject, rows, loaded)
    mean = evaluation.mean_scores([row["scores"] for row in scored])
    if json_output:
        print_json(
            {
                "subject": name,
                "eval_models": refs.to_dict(),
                "generations": scored,
                "mean": mean,
                "count": len(scored),
            }
        )
        return
    typer.echo(f"{'id':>5}  {'DINO':>6}  {'CLIP-I':>6}  {'CLIP-T':>6}  prompt")
    for row in scored:
        s = row["scores"]
        typer.echo(
            f"{row['id']:>5}  {s['dino']:6.3f}  {s['clip_i']:6.3f}  {s['clip_t']:6.3f}  {row['prompt']}"
        )
    if scored:
        typer.echo(
            f"{'mean':>5}  {mean['dino']:6.3f}  {mean['clip_i']:6.3f}  {mean['clip_t']:6.3f}  "
            f"({len(scored)} image(s))"
        )


def register(app: typer.Typer) -> None:
    """Register `stencil eval`."""
    app.command("eval", no_args_is_help=True)(evaluate)
