"""`stencil eval`: score a subject's generated images (DINO, CLIP-I, CLIP-T) and store the scores."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from stencil_cli import workflows
from stencil_cli.clikit import JsonOption, handle_errors
from stencil_cli.commands.options import DeviceOption, setting
from stencil_cli.errors import BadInputError, NotFoundError, StencilError
from stencil_cli.output import escape, info, print_json, warn
from stencil_cli.store import open_store

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


MAX_RANGE = 100_000  # a range is expanded into a list: keep a typo like 1-99999999999 from eating memory


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
            raise BadInputError(
                f"bad --generations {text!r}: use ids like 3,5,7 or a range 3-7 (at most {MAX_RANGE} ids)"
            ) from None
    if not ids:
        raise BadInputError(f"bad --generations {text!r}: no ids given")
    return list(dict.fromkeys(ids))


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
    rows = _present_files(name, rows)  # before the eval models load
    torch_device = models.resolve_device(setting(store, "device", device))
    info(f"loading eval models {escape(refs.dino)} and {escape(refs.clip)} on {torch_device} ...")
    loaded = evaluation.load_eval_models(refs, torch_device)
    scored = workflows.score_generations(
        store,
        subject,
        rows,
        loaded,
        on_missing=lambda row: warn(f"generation {row['id']}: image file missing, skipped"),
    )
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


def _present_files(name: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose image file exists (a warning for each other); StencilError when none does."""
    present = [row for row in rows if row.get("image_file") and Path(row["image_file"]).is_file()]
    present_ids = {row["id"] for row in present}
    for row in rows:
        if row["id"] not in present_ids:
            warn(f"generation {row['id']}: image file missing, skipped")
    if not present:
        raise StencilError(
            f"none of the {len(rows)} selected image file(s) of {name!r} exist: nothing to score",
            hint=f"generate new ones with `stencil gen {name} ...`",
        )
    return present


def register(app: typer.Typer) -> None:
    """Register `stencil eval`."""
    app.command("eval", no_args_is_help=True)(evaluate)
