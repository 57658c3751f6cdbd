"""`stencil eval`: score a subject's generated images (DINO, CLIP-I, CLIP-T) and store the scores."""

from __future__ import annotations

from typing import Annotated

import typer

from stencil_cli.base import events
from stencil_cli.cli.kit import JsonOption, handle_errors
from stencil_cli.cli.options import DeviceOption, EvalModelsOption
from stencil_cli.cli.output import escape, info, plain, print_json, warn
from stencil_cli.store.db import open_store
from stencil_cli.verbs.evaluate import EvalRequest, parse_ids
from stencil_cli.verbs.evaluate import evaluate as evaluate_verb

FLAGS = {"generation_ids": "--generations"}


@handle_errors(flags=FLAGS)
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
    request = EvalRequest(name, parse_ids(generations), eval_models, device)
    result = evaluate_verb(open_store(), request, progress=_progress)
    scored = [image.to_dict() for image in result.images]
    if json_output:
        print_json(
            {
                "subject": name,
                "eval_models": result.eval_models,
                "generations": scored,
                "mean": result.mean,
                "count": len(scored),
            }
        )
        return
    header = f"{'id':>5}  {'DINO':>6}  {'CLIP-I':>6}  {'CLIP-T':>6}  {'tau':>5}  {'seed':>10}"
    typer.echo(f"{header}  prompt | file")
    for row in result.images:
        s = row.scores
        tau = f"{row.tau:g}" if row.tau is not None else "-"
        seed = str(row.seed) if row.seed is not None else "-"
        prompt = plain(row.prompt or "")
        typer.echo(
            f"{row.id:>5}  {s['dino']:6.3f}  {s['clip_i']:6.3f}  {s['clip_t']:6.3f}  {tau:>5}  {seed:>10}  "
            f"{prompt} | {row.image_file}"
        )
    mean = result.mean
    if result.images:
        typer.echo(
            f"{'mean':>5}  {mean['dino']:6.3f}  {mean['clip_i']:6.3f}  {mean['clip_t']:6.3f}  "
            f"({len(result.images)} image(s))"
        )


def _progress(event: events.Event) -> None:
    """The verb's progress events as messages on stderr (skipped files, then the models loading)."""
    match event:
        case events.Warning(text=text):
            warn(text)
        case events.Loading(model=model, device=device):
            info(f"loading eval models {escape(model)} on {device} ...")


def register(app: typer.Typer) -> None:
    """Register `stencil eval`."""
    app.command("eval", no_args_is_help=True)(evaluate)
