"""A subject at a glance: a static HTML page, and a contact sheet of its mask pictures.

`write_view` writes one self-contained HTML file (no server, no network, no JavaScript) from the Jinja2
template `templates/subject.html.j2` (autoescaped): every generated image beside its draft (or the user's
picture, when editing), grouped by prompt with the newest group first, with tau, seed, run and scores; each
training run as a compact card (loss curve, settings table, previews); the photos with their captions and
latest mask pictures. Images are *referenced* by paths relative to the page, not embedded: the page stays
small however many images a subject has, shows them at full resolution, and a click opens the file itself. The
page is a window on the store, so it lives in the subject's folder by default (`subjects/NAME/view.html`); a
page written elsewhere with `out` refers to the same files by relative paths from there, and stops finding
them if it is moved without the store.

`mask_sheet` draws each photo beside its mask picture, labelled, with the caption the mask was made from, into
one PNG (`subjects/NAME/masks/contact-sheet.png`). Nothing here loads torch; Jinja2 loads only to render.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image

from stencil_cli.base.errors import FieldError, ShowMention, StencilError, fill, plain_mention
from stencil_cli.base.fsutil import atomic_write_bytes
from stencil_cli.base.targets import refuse_inside_store
from stencil_cli.store.db import Store
from stencil_cli.store.layout import CONTACT_SHEET_NAME, LOSS_CURVE_NAME, MASKS_DIR, PAGE_NAME, SAMPLES_DIR
from stencil_cli.store.records import Generation, Run, Subject
from stencil_cli.verbs.history import run_kind
from stencil_cli.verbs.sheets import Panel, Picture, SheetRow, draw_sheet
from stencil_cli.verbs.train import mask_files

TEMPLATE = "subject.html.j2"  # in verbs/templates/
PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif"}
# run settings worth a line on the page, in this order (the rest stay in `stencil runs --json`)
RUN_SETTINGS = (
    "batch_size",
    "lr",
    "resolution",
    "threshold",
    "seed",
    "train",
    "lora_rank",
    "subject_model",
    "device",
    "precision",
)


@dataclass
class ViewRequest:
    """Which subject, where the page goes (default: `subjects/NAME/view.html` in the store), and how its hints
    name a setting (the CLI: as its flag)."""

    name: str
    out: Path | str | None = None
    show_setting: ShowMention = plain_mention


@dataclass
class ViewResult:
    """The page written and what it shows; `missing` lists files that rows refer to but that are gone."""

    subject: str
    page: Path
    photos: int
    masks: int
    runs: int
    images: int
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {**self.__dict__, "page": str(self.page)}


def page_path(store: Store, request: ViewRequest) -> Path:
    """Where the page goes: `out` (a folder, or a name without a suffix, gets `NAME.html` inside), else the
    subject's `view.html`."""
    default = store.subject_dir(request.name) / PAGE_NAME
    if request.out is None:
        return default
    if not str(request.out).strip():
        raise FieldError("out", "{} is empty: give a file or a folder for the page")
    out = Path(request.out).expanduser()
    if out.is_dir() or (not out.exists() and not out.suffix):
        out = out / f"{request.name}.html"
    if out.exists() and not out.is_file():
        raise FieldError("out", f"{{}} {out} is not a file the page can be written to")
    blocker = next((parent for parent in out.parents if parent.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise FieldError("out", f"{{}} {out}: {blocker} is a file, not a folder")
    if out.absolute() != default.absolute():
        refuse_inside_store(out.absolute(), store.root, "out")
    return out


def write_view(store: Store, request: ViewRequest) -> ViewResult:
    """Write the subject's HTML page (atomically) and return where it is and what it shows."""
    subject = store.get_subject(request.name)
    page = page_path(store, request)
    links = _Links(page.parent.resolve())
    runs = sorted(store.list_runs(subject.name), key=lambda run: run.id, reverse=True)
    generations = store.list_generations(subject.name)
    photos = _photo_cards(links, store, subject)
    masks_only = fill("{train.masks_only}", ("train.masks_only",), request.show_setting)
    text = render_page(
        subject=subject,
        facts=[
            ("phrase", subject.phrase),
            ("class", subject.class_word),
            ("description", subject.description),
            ("created", _when(subject.created)),
        ],
        groups=prompt_groups(links, generations),
        images=len(generations),
        runs=[_run_card(links, store, subject, run) for run in runs],
        photos=photos,
        masks=sum(1 for card in photos if card.mask.url),
        hints={
            "images": f"no generated images yet: stencil gen {subject.name} PROMPT",
            "runs": f"no training runs yet: stencil train {subject.name}",
            "masks": f"no mask pictures yet: stencil train {subject.name} {masks_only}",
        },
    )
    try:
        atomic_write_bytes(page, text.encode("utf-8"))
    except OSError as error:
        raise StencilError(f"cannot write the page to {page}: {error.strerror or error}") from error
    return ViewResult(
        subject=subject.name,
        page=page,
        photos=len(subject.images),
        masks=sum(1 for card in photos if card.mask.url),
        runs=len(runs),
        images=len(generations),
        missing=links.missing,
    )


def render_page(**context: Any) -> str:
    """The page's HTML from its template (Jinja2, every value escaped unless the template says otherwise)."""
    import jinja2  # not at start-up: only this command renders a page

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("stencil_cli.verbs", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return environment.get_template(TEMPLATE).render(**context)


# -- what the page shows ---------------------------------------------------------------------------------


@dataclass
class PictureRef:
    """A picture on the page: its URL relative to the page (None: not there), alt text and file name."""

    url: str | None
    alt: str
    name: str = ""
    missing: bool = False


@dataclass
class ImagePair:
    """One generated image beside what it started from: the draft, the user's picture (editing) or nothing
    (plain generation)."""

    id: int
    source: PictureRef
    source_label: str  # "draft", "your picture", "no draft"
    result: PictureRef
    facts: list[tuple[str, str]]  # tau, seed, run, mode
    scores: list[tuple[str, str]]
    notes: list[tuple[str, str]]  # negative prompt, draft prompt
    meta: str


@dataclass
class PromptGroup:
    """Every image made from one prompt, newest batch first."""

    anchor: str
    prompt: str
    pairs: list[ImagePair]
    newest: str
    draft_prompts: list[str]


@dataclass
class RunCard:
    """One training run: a headline, its settings as one small table, the loss curve and the previews."""

    id: int
    status: str
    headline: list[str]
    settings: list[tuple[str, str]]
    error: str | None
    chart: PictureRef | None
    previews: list[tuple[PictureRef, str]]


@dataclass
class PhotoCard:
    """One photo beside its latest mask picture, with its caption."""

    id: Any
    photo: PictureRef
    mask: PictureRef
    size: str
    name: str
    caption: str | None
    caption_source: str | None


class _Links:
    """Turns store files into links relative to the page's folder; remembers files that are gone."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.missing: list[str] = []

    def href(self, path: Path) -> str:
        """A URL for `path` from the page: relative where it can be, else a file:// URL."""
        target = Path(path).resolve()
        try:
            relative = os.path.relpath(target, self.folder)
        except ValueError:  # another drive (Windows): no relative path exists
            return target.as_uri()
        return quote(Path(relative).as_posix())

    def picture(self, path: Path | None, alt: str) -> PictureRef:
        """The picture at `path`, or one marked missing (and the path noted in `missing`)."""
        if path is None:
            return PictureRef(None, alt)
        if not Path(path).is_file():
            self.missing.append(str(path))
            return PictureRef(None, alt, Path(path).name, missing=True)
        return PictureRef(self.href(Path(path)), alt, Path(path).name)


def prompt_groups(links: _Links, generations: list[Generation]) -> list[PromptGroup]:
    """The images grouped by prompt, the group with the newest image first; in a group, the newest batch
    first and each batch in the order it was rendered (seed by seed, tau by tau)."""
    by_prompt: dict[str, list[Generation]] = {}
    for generation in generations:
        by_prompt.setdefault(generation.prompt or "", []).append(generation)
    groups = []
    for prompt, members in sorted(by_prompt.items(), key=lambda item: -max(g.id for g in item[1])):
        newest_in_batch: dict[str, int] = {}
        for g in members:
            batch = str(g.params.get("batch") or "")
            newest_in_batch[batch] = max(newest_in_batch.get(batch, 0), g.id)
        members.sort(key=lambda g: (-newest_in_batch[str(g.params.get("batch") or "")], g.id))
        drafts = sorted({g.draft_prompt for g in members if g.draft_prompt and g.draft_prompt != g.prompt})
        groups.append(
            PromptGroup(
                anchor=f"prompt-{max(g.id for g in members)}",
                prompt=prompt or "(no prompt)",
                pairs=[_pair(links, g) for g in members],
                newest=_when(max(members, key=lambda g: g.id).created),
                draft_prompts=drafts,
            )
        )
    return groups


def _pair(links: _Links, generation: Generation) -> ImagePair:
    params = generation.params
    mode = params.get("mode") or ("context" if generation.draft_file else "plain")
    if generation.draft_file is not None:
        label = "your picture" if mode == "edit" else "draft"
        source = links.picture(generation.draft_file, label)
    else:
        label, source = "no draft", PictureRef(None, "plain generation: no draft")
    facts = [
        ("tau", f"{generation.tau:g}" if generation.tau is not None else "-"),
        ("seed", str(generation.seed) if generation.seed is not None else "-"),
        ("run", str(generation.run_id) if generation.run_id is not None else "-"),
        ("mode", mode),
    ]
    notes = []
    if params.get("negative_prompt"):
        notes.append(("negative", str(params["negative_prompt"])))
    return ImagePair(
        id=generation.id,
        source=source,
        source_label=label,
        result=links.picture(generation.image_file, "no image file"),
        facts=facts,
        scores=_scores(generation.scores),
        notes=notes,
        meta=f"image {generation.id} · {_when(generation.created)}",
    )


def _scores(scores: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The numeric evaluation scores (nothing before `stencil eval` has run)."""
    return [
        (key.replace("_", "-").upper(), f"{value:.3f}")
        for key, value in (scores or {}).items()
        if isinstance(value, int | float) and not isinstance(value, bool) and key != "references"
    ]


def _run_card(links: _Links, store: Store, subject: Subject, run: Run) -> RunCard:
    folder = store.run_dir(subject.name, run.id)
    steps = run.params.get("steps")
    headline = [
        run_kind(run),
        f"{run.step}/{steps} steps" if steps else f"{run.step} steps",
        f"final loss {run.final_loss:.4f}" if run.final_loss is not None else "no loss yet",
        f"{run.duration_s:.1f} s" if run.duration_s is not None else "",
        f"started {_when(run.started)}",
    ]
    settings = [("base model", run.base_model or "-")]
    settings += [
        (key.replace("_", " "), _value(run.params[key]))
        for key in RUN_SETTINGS
        if run.params.get(key) is not None
    ]
    curve = folder / LOSS_CURVE_NAME
    return RunCard(
        id=run.id,
        status=run.status,
        headline=[part for part in headline if part],
        settings=settings,
        error=run.error,
        chart=links.picture(curve, f"loss curve of run {run.id}") if curve.is_file() else None,
        previews=[(links.picture(path, path.name), path.stem) for path in _pictures_in(folder / SAMPLES_DIR)],
    )


def _photo_cards(links: _Links, store: Store, subject: Subject) -> list[PhotoCard]:
    return [
        PhotoCard(
            id=image["id"],
            photo=links.picture(Path(image["file"]), f"photo {image['id']}"),
            mask=links.picture(mask, "no mask picture yet"),
            size=f"{image['width']}×{image['height']}",
            name=image["original_name"] or image["sha256"][:12],
            caption=image["caption"],
            caption_source=image["caption_source"],
        )
        for image, mask in mask_files(store, subject)
    ]


def _pictures_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PICTURE_SUFFIXES]
    return sorted(found, key=_natural)


def _natural(path: Path) -> list[Any]:
    """Sort key that puts `step-5` before `step-10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def _when(stamp: str | None) -> str:
    return (stamp or "-").replace("T", " ").split(".")[0].removesuffix("+00:00")


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# -- the mask contact sheet ----------------------------------------------------------------------------


@dataclass
class MaskSheet:
    """The contact sheet's path and how many photos have a mask picture on it."""

    path: Path
    photos: int
    masks: int


def mask_sheet(store: Store, name: str, cell: int = 256) -> MaskSheet | None:
    """Draw each photo beside its latest mask picture, labelled, with the caption the mask was made from,
    into `masks/contact-sheet.png`; None if no masks yet."""
    subject = store.get_subject(name)
    store.require_writable(f"write the mask sheet of {name!r}")
    pairs = mask_files(store, subject)
    if not any(mask for _, mask in pairs):
        return None
    per_row = 3 if len(pairs) > 4 else 2 if len(pairs) > 1 else 1  # pairs side by side
    panels = mask_panels(pairs, cell)
    rows = [SheetRow(panels[i : i + per_row]) for i in range(0, len(panels), per_row)]
    buffer = io.BytesIO()
    draw_sheet(rows, cell).save(buffer, format="PNG")
    path = store.subject_dir(name) / MASKS_DIR / CONTACT_SHEET_NAME
    atomic_write_bytes(path, buffer.getvalue())
    return MaskSheet(path, len(pairs), sum(1 for _, mask in pairs if mask))


def mask_panels(pairs: list[tuple[dict[str, Any], Path | None]], cell: int) -> list[Panel]:
    """One panel per photo: the photo and its mask picture, labelled, under them the caption the mask was
    made from (carried in the mask PNG; the photo's caption for an older mask picture)."""
    panels = []
    for image, mask in pairs:
        facts = _mask_facts(mask)
        caption = facts.get("caption") or image["caption"]
        pictures = [
            Picture(_tile(Path(image["file"]), cell, crop_box(mask)), f"photo {image['id']}"),
            Picture(_tile(mask, cell), _mask_label(mask, facts)),
        ]
        panels.append(Panel(pictures, caption=f"caption: {caption}" if caption else "no caption yet"))
    return panels


def _tile(path: Path | None, cell: int, box: tuple[int, int, int, int] | None = None) -> Image.Image | None:
    """The picture at `path` (its `box` when given) scaled into a `cell` square; None when missing."""
    if path is None or not path.is_file():
        return None
    try:
        with Image.open(path) as opened:
            picture = opened.convert("RGB")
    except OSError:
        return None
    if box is not None and box[2] <= picture.width and box[3] <= picture.height:
        picture = picture.crop(box)  # the square that was trained, as its mask picture records it
    picture.thumbnail((cell, cell))
    return picture


def crop_box(mask: Path | None) -> tuple[int, int, int, int] | None:
    """Where the trained square lies in the photo, as its mask picture records it (None if it does not)."""
    if mask is None or not mask.is_file():
        return None
    try:
        with Image.open(mask) as opened:
            text = opened.info.get("stencil:crop")
        left, top, right, bottom = (int(value) for value in str(text).split(","))
    except (OSError, ValueError):
        return None
    if not (0 <= left < right and 0 <= top < bottom):
        return None
    return left, top, right, bottom


def _mask_facts(path: Path | None) -> dict[str, str]:
    """What a mask picture carries: the caption it was made from and its coverage (empty when unreadable)."""
    if path is None:
        return {}
    try:
        with Image.open(path) as opened:
            info = dict(opened.info)
    except OSError:
        return {"unreadable": "1"}
    return {key: str(info[f"stencil:{key}"]) for key in ("caption", "coverage") if info.get(f"stencil:{key}")}


def _mask_label(path: Path | None, facts: dict[str, str]) -> str:
    if path is None:
        return "no mask picture yet"
    if facts.get("unreadable"):
        return "mask (unreadable)"
    coverage = facts.get("coverage")
    return f"mask, {float(coverage):.0%} of the picture" if coverage else "mask"
