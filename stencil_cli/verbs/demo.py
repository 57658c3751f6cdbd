"""The demo: add, caption (template), train and generate on the tiny preset, offline on the CPU; then the
subject's page (`stencil view`).

It calls the same verbs as `stencil add / caption / train / gen`, and removes the subject it started when a
step fails (a half-made demo subject would linger in `stencil ls`).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stencil_cli.base.errors import FieldError
from stencil_cli.base.events import Heading, Progress, Removed, no_progress
from stencil_cli.store.db import Store
from stencil_cli.store.records import validate_name
from stencil_cli.verbs.caption import CaptionRequest, caption
from stencil_cli.verbs.generate import GenerateResult, collect, generate
from stencil_cli.verbs.generation_plan import GenerateRequest, plan_generation, prepare_output
from stencil_cli.verbs.subjects import AddRequest, add_photos
from stencil_cli.verbs.train import TrainRequest, train
from stencil_cli.verbs.view import ViewRequest, write_view

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


@dataclass
class DemoRequest:
    """The demo's settings (tiny models on the CPU)."""

    photos: Path | None = None  # a folder of the user's own photos instead of the synthesised robot
    name: str = "demo"
    phrase: str = "toy robot"
    prompt: str = "on a beach at sunset"
    train_steps: int = 10
    steps: int = 10
    output: Path | None = None


@dataclass
class DemoResult:
    """The demo's subject, its images, the page that shows them and how long it all took."""

    subject: str
    generated: GenerateResult
    seconds: float
    page: Path | None = None


TINY = {"subject_model": "tiny", "device": "cpu", "precision": "fp32"}


def run_demo(store: Store, request: DemoRequest, *, progress: Progress = no_progress) -> DemoResult:
    """Add, caption, train and generate; the hook gets a `Heading` (i of 4, its title) before each step and
    every verb's own progress in between (and `Removed` when a failed step removed the subject)."""
    started = time.monotonic()
    validate_name(request.name)
    if not request.prompt.strip():
        raise FieldError("prompt", 'is empty: say what to render, e.g. "on a beach at sunset"')
    if request.photos is not None and not Path(request.photos).is_dir():
        raise FieldError("photos", f"{{}} {request.photos} is not a folder of photos")
    if request.train_steps < 1 or request.steps < 1:
        raise FieldError(("train_steps", "steps"), "{} must be at least 1")
    prepare_output(request.output, store.root)  # an unusable -o fails now, not after add, caption and train
    name = free_name(request.name, store.subject_names())
    try:
        with tempfile.TemporaryDirectory(prefix="stencil-demo-") as scratch:
            folder = Path(request.photos) if request.photos is not None else Path(scratch)
            if request.photos is None:
                synthesise_photos(folder)
                title = "add: 4 synthesised photos of a toy robot"
            else:
                title = f"add: photos from {folder}"
            progress(Heading(1, 4, title))
            add_photos(store, AddRequest(name, [folder], phrase=request.phrase, skip_bad=True))
            progress(Heading(2, 4, "caption (template captioner, offline)"))
            caption(store, CaptionRequest(name, captioner="template"), progress=progress)
            if not store.get_subject(name).description and request.photos is None:
                store.update_subject(name, description=DEMO_DESCRIPTION)
            progress(Heading(3, 4, f"train ({request.train_steps} steps on the tiny preset)"))
            train(
                store, TrainRequest(name, steps=request.train_steps, batch_size=2, **TINY), progress=progress
            )
            progress(Heading(4, 4, "gen (tiny draft -> null-text inversion -> denoise)"))
            plan = plan_generation(
                store,
                GenerateRequest(
                    name,
                    [request.prompt],
                    seed=0,
                    taus=[60.0, 1000.0],
                    steps=request.steps,
                    inner_steps=5,
                    draft_steps=request.steps,
                    grid=True,
                    output=request.output,
                    context_model="tiny",
                    **TINY,
                ),
            )
            generated = collect(plan, generate(store, plan, progress=progress))
    except BaseException:
        if store.find_subject(name) is not None:
            store.remove_subject(name)
            progress(Removed(name))
        raise
    page = write_view(store, ViewRequest(name)).page  # after the try: a page that fails keeps the subject
    return DemoResult(name, generated, time.monotonic() - started, page)
