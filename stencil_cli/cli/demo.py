"""`stencil demo`: the whole flow (add, caption, train, gen) on the tiny preset, offline, on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stencil_cli.base import events
from stencil_cli.cli.kit import JsonOption, handle_errors
from stencil_cli.cli.output import escape, info, print_json, warn
from stencil_cli.cli.progress import StageBars, progress_bar
from stencil_cli.store.db import open_store
from stencil_cli.verbs.demo import DemoRequest, run_demo


class DemoProgress:
    """Step headings as lines; each verb's stages as bars (what is loading, asked or written goes unsaid)."""

    def __init__(self, bars: StageBars) -> None:
        self.bars = bars

    def __call__(self, event: events.Event) -> None:
        """The hook."""
        match event:
            case events.Heading(number=number, total=total, title=title):
                info(f"[bold]{number}/{total} {escape(title)}[/bold]")
            case events.Removed(subject=subject):
                info(f"removed the half-made demo subject {escape(subject)}")
            case events.Warning(text=text):
                warn(text)
            case events.Note(text=text):
                info(f"[dim]{escape(text)}[/dim]")
            case _:
                self.bars(event)


@handle_errors
def demo(
    photos: Annotated[
        Path | None,
        typer.Argument(help="A folder of your own photos to use instead of the synthesised toy robot."),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="Subject name (made unique if taken).")] = "demo",
    phrase: Annotated[str, typer.Option("--phrase", help="The subject phrase.")] = "toy robot",
    prompt: Annotated[str, typer.Option("--prompt", help="What to render.")] = "on a beach at sunset",
    train_steps: Annotated[int, typer.Option("--train-steps", help="Training steps.", min=1)] = 10,
    steps: Annotated[
        int, typer.Option("--steps", help="DDIM steps for inversion and denoise.", min=1, max=1000)
    ] = 10,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Also copy the images into this folder.")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Run add, caption (template), train and gen on the tiny preset, offline on the CPU, in about a minute.

    The tiny models have random weights: the pictures are noise-like; the point is to see every stage work.
    """
    request = DemoRequest(photos, name, phrase, prompt, train_steps, steps, output)
    store = open_store()
    with progress_bar() as progress:
        result = run_demo(store, request, progress=DemoProgress(StageBars(progress)))
    images = [saved.to_dict() for saved in result.generated.images]
    if json_output:
        print_json(
            {
                "subject": result.subject,
                "seconds": round(result.seconds, 1),
                "images": images,
                "page": str(result.page) if result.page else None,
            }
        )
        return
    for saved in result.generated.images:
        typer.echo(saved.output_file or saved.generation.image_file)
    where = result.generated.plan.folder
    info(
        f"[green]demo done in {result.seconds:.0f} s[/green]: subject {escape(result.subject)}, "
        f"images in {escape(str(where))}"
    )
    info(
        "the tiny models have random weights, so the images are noise; with real models: "
        f'[bold]stencil gen {escape(result.subject)} "{escape(prompt)}"[/bold] '
        "(see the README's quickstart). "
        f"Remove the demo subject with `stencil rm {escape(result.subject)}`."
    )
    if result.page is not None:
        info(f"see it all on one page: {escape(str(result.page))} (`stencil view {escape(result.subject)}`)")


def register(app: typer.Typer) -> None:
    """Register `stencil demo`."""
    app.command("demo")(demo)
