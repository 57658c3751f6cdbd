"""`stencil demo`: the whole flow (add, caption, train, gen) on the tiny preset, offline, on the CPU."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from stencil_cli.clikit import JsonOption, handle_errors
from stencil_cli.errors import BadInputError
from stencil_cli.output import escape, info, print_json
from stencil_cli.store import open_store, validate_name

if TYPE_CHECKING:
    from PIL import Image

DEMO_DESCRIPTION = "a small red toy robot with a blue chest panel and round yellow eyes"
BACKGROUNDS = [(235, 225, 205), (170, 205, 235), (200, 230, 190), (240, 200, 210)]


ROBOT_PARTS: list[tuple[tuple[int, int, int, int], tuple[int, int, int], bool]] = [
    ((-70, -150, 70, -40), (200, 40, 40), False),  # head
    ((-45, -120, -15, -90), (250, 220, 40), True),  # eyes
    ((15, -120, 45, -90), (250, 220, 40), True),
    ((-5, -185, 5, -150), (90, 90, 90), False),  # antenna
    ((-90, -35, 90, 110), (210, 50, 50), False),  # body
    ((-45, -5, 45, 60), (50, 80, 210), False),  # chest panel
    ((-125, -25, -95, 80), (180, 40, 40), False),  # arms
    ((95, -25, 125, 80), (180, 40, 40), False),
    ((-70, 110, -25, 170), (90, 90, 90), False),  # legs
    ((25, 110, 70, 170), (90, 90, 90), False),
]


def robot_photo(index: int, size: int = 512) -> Image.Image:
    """One synthetic photo of the demo's toy robot; `index` varies background, position and size."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUNDS[index % len(BACKGROUNDS)])
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, size * 0.8, size, size], fill=(120 + 20 * (index % 5), 110, 100))  # a table
    scale = size / 512 * (0.8 + 0.1 * (index % 4))
    cx = size // 2 + ((index % 4) - 2) * size // 12
    cy = size // 2 + (index % 2) * size // 16
    for (x0, y0, x1, y1), colour, ellipse in ROBOT_PARTS:
        shape = [cx + x0 * scale, cy + y0 * scale, cx + x1 * scale, cy + y1 * scale]
        (draw.ellipse if ellipse else draw.rectangle)(shape, fill=colour, outline=(40, 40, 40), width=3)
    return image


def synthesise_photos(folder: Path, count: int = 4, size: int = 512) -> list[Path]:
    """Write `count` synthetic photos of a toy robot as PNGs into `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"robot-{i + 1}.png"
        robot_photo(i, size).save(path)
        paths.append(path)
    return paths


def free_name(base: str, taken: list[str]) -> str:
    """`base`, or `base-2`, `base-3`, ... whichever is not taken yet (the demo never overwrites a subject)."""
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what the step commands print on stdout to stderr (the demo's stdout is the image paths)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


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
    from stencil_cli.commands import caption as caption_cmd
    from stencil_cli.commands import gen as gen_cmd
    from stencil_cli.commands import subjects as subjects_cmd
    from stencil_cli.commands import train as train_cmd

    started = time.monotonic()
    validate_name(name)
    if photos is not None and not Path(photos).is_dir():
        raise BadInputError(f"{photos} is not a folder of photos")
    store = open_store()
    subject_name = free_name(name, store.subject_names())
    store.close()
    common = {"subject_model": "tiny", "device": "cpu", "precision": "fp32"}
    scratch = tempfile.TemporaryDirectory(prefix="stencil-demo-")
    folder = Path(photos) if photos is not None else Path(scratch.name)
    try:
        with scratch, stdout_to_stderr():
            if photos is None:
                synthesise_photos(folder)
                info("[bold]1/4 add[/bold]: 4 synthesised photos of a toy robot")
            else:
                info(f"[bold]1/4 add[/bold]: photos from {escape(str(folder))}")
            subjects_cmd.add(subject_name, [folder], phrase=phrase, class_word=None, skip_bad=True)
            info("[bold]2/4 caption[/bold] (template captioner, offline)")
            caption_cmd.caption(subject_name, captioner="template")
            store = open_store()
            if not store.get_subject(subject_name).description and photos is None:
                store.update_subject(subject_name, description=DEMO_DESCRIPTION)
            store.close()
            info(f"[bold]3/4 train[/bold] ({train_steps} steps on the tiny preset)")
            train_cmd.train(subject_name, steps=train_steps, batch_size=2, **common)
            info("[bold]4/4 gen[/bold] (tiny context model draft -> null-text inversion -> guided denoise)")
            output_buffer = io.StringIO()
            with contextlib.redirect_stdout(output_buffer):
                gen_cmd.gen(
                    subject_name,
                    prompt,
                    seed=0,
                    tau="60,1000",
                    steps=steps,
                    inner_steps=5,
                    draft_steps=steps,
                    grid=True,
                    output=output,
                    context_model="tiny",
                    json_output=True,
                    **common,
                )
    except BaseException:
        _remove_half_made(subject_name)
        raise
    records = json.loads(output_buffer.getvalue())
    seconds = time.monotonic() - started
    if json_output:
        print_json({"subject": subject_name, "seconds": round(seconds, 1), "images": records})
        return
    for record in records:
        typer.echo(record.get("output_file") or record["image_file"])
    where = Path(records[0]["image_file"]).parent
    info(
        f"[green]demo done in {seconds:.0f} s[/green]: subject {escape(subject_name)}, "
        f"images in {escape(str(where))}"
    )
    info(
        "the tiny models have random weights, so the images are noise; with real models: "
        f'[bold]stencil gen {escape(subject_name)} "{escape(prompt)}"[/bold] (see the README\'s quickstart). '
        f"Remove the demo subject with `stencil rm {escape(subject_name)}`."
    )


def _remove_half_made(name: str) -> None:
    """After a failed step: remove the subject the demo started (it would linger in `stencil ls`)."""
    store = open_store()
    try:
        if store.find_subject(name) is not None:
            store.remove_subject(name)
            info(f"removed the half-made demo subject {escape(name)}")
    finally:
        store.close()


def register(app: typer.Typer) -> None:
    """Register `stencil demo`."""
    app.command("demo")(demo)
