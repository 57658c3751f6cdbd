"""A subject at a glance: a static HTML page, and a contact sheet of its mask pictures.

`write_view` writes one self-contained HTML file (no server, no network, no JavaScript): the subject's photos
with their captions and latest mask pictures, each training run's settings, loss curve and previews, and every
generated image with its prompt, tau, seed, mode and evaluation scores. Images are *referenced* by paths
relative to the page, not embedded: the page stays a few kilobytes however many images a subject has, shows
them at full resolution, and a click opens the file itself. The page is a window on the store, so it lives in
the subject's folder by default (`subjects/NAME/view.html`); a page written elsewhere with `out` refers to the
same files by relative paths from there, and stops finding them if it is moved without the store.

`mask_sheet` draws each photo beside its mask picture into one PNG (`subjects/NAME/masks/contact-sheet.png`).
Pillow only: nothing here loads torch.
"""

from __future__ import annotations

import html
import io
import os
import re
from collections.abc import Iterable
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
from stencil_cli.verbs.train import mask_files

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
    builder = _Page(page.parent.resolve(), request.show_setting)
    body = [
        _header(subject),
        _photos_section(builder, store, subject),
        _runs_section(builder, store, subject),
        _images_section(builder, store, subject),
    ]
    text = _document(f"stencil · {subject.name}", "\n".join(body))
    try:
        atomic_write_bytes(page, text.encode("utf-8"))
    except OSError as error:
        raise StencilError(f"cannot write the page to {page}: {error.strerror or error}") from error
    return ViewResult(
        subject=subject.name,
        page=page,
        photos=len(subject.images),
        masks=builder.masks,
        runs=len(store.list_runs(subject.name)),
        images=len(store.list_generations(subject.name)),
        missing=builder.missing,
    )


# -- the page ------------------------------------------------------------------------------------------


def esc(value: Any) -> str:
    """Any value as HTML text (quotes too: safe inside attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


class _Page:
    """Turns store files into links relative to the page's folder; remembers files that are gone."""

    def __init__(self, folder: Path, show_setting: ShowMention = plain_mention) -> None:
        self.folder = folder
        self.show_setting = show_setting
        self.missing: list[str] = []
        self.masks = 0

    def href(self, path: Path) -> str:
        """A URL for `path` from the page: relative where it can be, else a file:// URL."""
        target = Path(path).resolve()
        try:
            relative = os.path.relpath(target, self.folder)
        except ValueError:  # another drive (Windows): no relative path exists
            return target.as_uri()
        return quote(Path(relative).as_posix())

    def picture(self, path: Path | None, alt: str, *, css: str = "") -> str:
        """An <img> linked to its file, or a 'file missing' box (and the path noted in `missing`)."""
        if path is None:
            return f'<div class="none {css}">{esc(alt)}</div>'
        if not Path(path).is_file():
            self.missing.append(str(path))
            return f'<div class="none {css}">file missing<br><small>{esc(Path(path).name)}</small></div>'
        url = esc(self.href(Path(path)))
        return f'<a href="{url}"><img class="{css}" src="{url}" alt="{esc(alt)}" loading="lazy"></a>'


def _header(subject: Subject) -> str:
    facts = [
        ("phrase", subject.phrase),
        ("class", subject.class_word),
        ("description", subject.description),
        ("created", _when(subject.created)),
    ]
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v or '-')}</dd>" for k, v in facts)
    nav = "<nav><a href='#photos'>photos</a><a href='#runs'>runs</a><a href='#images'>images</a></nav>"
    return f"<header><h1>{esc(subject.name)}</h1><dl class='facts'>{rows}</dl>{nav}</header>"


def _photos_section(page: _Page, store: Store, subject: Subject) -> str:
    cards = []
    for image, mask in mask_files(store, subject):
        if mask is not None:
            page.masks += 1
        pictures = page.picture(Path(image["file"]), f"photo {image['id']}", css="photo")
        pictures += page.picture(mask, "no mask picture yet", css="photo mask")
        caption = image["caption"]
        tag = image["caption_source"]
        source = f" <span class='tag'>{esc(tag)}</span>" if tag else ""
        cards.append(
            "<figure class='card photo-card' id='photo-{id}'><div class='pair'>{pictures}</div>"
            "<figcaption><b>photo {id}</b> · {w}×{h} · {name}{source}"
            "<p class='caption'>{caption}</p></figcaption></figure>".format(
                id=esc(image["id"]),
                pictures=pictures,
                w=esc(image["width"]),
                h=esc(image["height"]),
                name=esc(image["original_name"] or image["sha256"][:12]),
                source=source,
                caption=esc(caption) if caption else "<i>no caption yet</i>",
            )
        )
    masks_only = fill("{train.masks_only}", ("train.masks_only",), page.show_setting)
    hint = "" if page.masks else _hint(f"no mask pictures yet: stencil train {subject.name} {masks_only}")
    return _section(
        "photos",
        f"Photos ({len(subject.images)})",
        "<p class='note'>Each photo beside its latest mask picture (the trained region in red).</p>" + hint,
        cards,
        "photos",
    )


def _runs_section(page: _Page, store: Store, subject: Subject) -> str:
    runs = sorted(store.list_runs(subject.name), key=lambda run: run.id, reverse=True)
    cards = [_run_card(page, store, subject, run) for run in runs]
    hint = "" if runs else _hint(f"no training runs yet: stencil train {subject.name}")
    return _section("runs", f"Training runs ({len(runs)})", hint, cards, "runs")


def _run_card(page: _Page, store: Store, subject: Subject, run: Run) -> str:
    folder = store.run_dir(subject.name, run.id)
    steps = run.params.get("steps")
    facts = [
        ("status", f"<span class='status {esc(run.status)}'>{esc(run.status)}</span>"),
        ("kind", esc(run_kind(run))),
        ("steps", esc(f"{run.step}/{steps}" if steps else run.step)),
        ("final loss", esc(f"{run.final_loss:.4f}" if run.final_loss is not None else "-")),
        ("duration", esc(f"{run.duration_s:.1f} s" if run.duration_s is not None else "-")),
        ("started", esc(_when(run.started))),
        ("base model", esc(run.base_model or "-")),
    ]
    facts += [(key, esc(_value(run.params[key]))) for key in RUN_SETTINGS if run.params.get(key) is not None]
    if run.error:
        facts.append(("error", esc(run.error)))
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in facts)
    curve = folder / LOSS_CURVE_NAME
    loss = page.picture(curve, "loss curve", css="chart") if curve.is_file() else ""
    samples = _pictures_in(folder / SAMPLES_DIR)
    previews = ""
    if samples:
        thumbs = "".join(
            f"<figure>{page.picture(path, path.name, css='thumb')}"
            f"<figcaption>{esc(path.stem)}</figcaption></figure>"
            for path in samples
        )
        previews = f"<h4>Previews while training</h4><div class='strip'>{thumbs}</div>"
    return (
        f"<article class='card run' id='run-{run.id}'><div class='run-facts'><h3>run {run.id}</h3>"
        f"<dl class='facts'>{rows}</dl></div><div class='run-pictures'>{loss}{previews}</div></article>"
    )


def _images_section(page: _Page, store: Store, subject: Subject) -> str:
    generations = sorted(store.list_generations(subject.name), key=lambda g: g.id, reverse=True)
    cards = [_image_card(page, generation) for generation in generations]
    hint = "" if generations else _hint(f"no generated images yet: stencil gen {subject.name} PROMPT")
    return _section("images", f"Generated images ({len(generations)})", hint, cards, "images")


def _image_card(page: _Page, generation: Generation) -> str:
    params = generation.params
    facts = [
        ("tau", f"{generation.tau:g}" if generation.tau is not None else "-"),
        ("seed", generation.seed if generation.seed is not None else "-"),
        ("mode", params.get("mode") or "-"),
        ("run", generation.run_id if generation.run_id is not None else "-"),
    ]
    if params.get("negative_prompt"):
        facts.append(("negative", params["negative_prompt"]))
    if generation.draft_prompt and generation.draft_prompt != generation.prompt:
        facts.append(("draft prompt", generation.draft_prompt))
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts)
    scores = _scores(generation.scores)
    draft = ""
    if generation.draft_file is not None and Path(generation.draft_file).is_file():
        draft = f" · <a href='{esc(page.href(Path(generation.draft_file)))}'>draft</a>"
    return (
        f"<figure class='card image' id='image-{generation.id}'>"
        f"{page.picture(generation.image_file, 'no image file', css='photo')}"
        f"<figcaption><p class='prompt'>{esc(generation.prompt or '(no prompt)')}</p>"
        f"<dl class='facts small'>{rows}</dl>{scores}"
        f"<p class='meta'>image {generation.id} · {esc(_when(generation.created))}{draft}</p>"
        "</figcaption></figure>"
    )


def _scores(scores: dict[str, Any] | None) -> str:
    """The numeric evaluation scores as small badges (nothing before `stencil eval` has run)."""
    if not scores:
        return ""
    badges = "".join(
        f"<span class='score'>{esc(key.replace('_', '-').upper())} {value:.3f}</span>"
        for key, value in scores.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and key != "references"
    )
    return f"<p class='scores'>{badges}</p>" if badges else ""


def _pictures_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PICTURE_SUFFIXES]
    return sorted(found, key=_natural)


def _natural(path: Path) -> list[Any]:
    """Sort key that puts `step-5` before `step-10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def _section(anchor: str, title: str, intro: str, cards: Iterable[str], css: str) -> str:
    return (
        f"<section id='{anchor}'><h2>{esc(title)}</h2>{intro}"
        f"<div class='grid {css}'>{''.join(cards)}</div></section>"
    )


def _hint(text: str) -> str:
    return f"<p class='note'>{esc(text)}</p>"


def _when(stamp: str | None) -> str:
    return (stamp or "-").replace("T", " ").split(".")[0].removesuffix("+00:00")


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


STYLE = """
:root { --bg: #f6f5f2; --card: #fff; --ink: #1d1d1f; --muted: #6b6b70; --line: #e3e1dc; --accent: #2f5bd3; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px 48px; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header h1 { margin: 0 0 8px; font-size: 28px; }
nav { margin: 8px 0 0; } nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
h2 { margin: 32px 0 12px; font-size: 20px; border-bottom: 1px solid var(--line); padding-bottom: 6px; }
h3 { margin: 0 0 8px; font-size: 16px; } h4 { margin: 12px 0 6px; font-size: 13px; color: var(--muted); }
.grid { display: grid; gap: 16px; }
.grid.photos { grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); }
.grid.runs { grid-template-columns: 1fr; }
.run { display: grid; grid-template-columns: minmax(240px, 1fr) 2fr; gap: 16px; }
@media (max-width: 760px) { .run { grid-template-columns: 1fr; } }
.grid.images { grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); }
.card { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 10px;
  box-shadow: 0 1px 2px rgba(0,0,0,.04); }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 6px; }
img { display: block; max-width: 100%; border-radius: 6px; background: #eee; }
img.photo { width: 100%; aspect-ratio: 1; object-fit: cover; }
img.chart { width: 100%; max-width: 640px; border: 1px solid var(--line); }
.none { display: flex; align-items: center; justify-content: center; flex-direction: column;
  text-align: center; aspect-ratio: 1; border-radius: 6px;
  background: repeating-linear-gradient(45deg, #f0efeb, #f0efeb 8px, #e8e6e1 8px, #e8e6e1 16px);
  color: var(--muted); font-size: 12px; padding: 6px; }
figcaption { margin-top: 8px; }
.caption, .prompt { margin: 6px 0 0; } .prompt { font-weight: 600; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 6px 0 0; }
.facts dt { color: var(--muted); } .facts dd { margin: 0; overflow-wrap: anywhere; }
.facts.small { font-size: 12px; }
.tag, .score { display: inline-block; font-size: 11px; padding: 1px 6px; border-radius: 999px;
  background: #eef1fb; color: var(--accent); margin: 0 4px 2px 0; }
.scores { margin: 6px 0 0; }
.meta, .note { color: var(--muted); font-size: 12px; margin: 6px 0 0; }
.status { font-weight: 600; } .status.done { color: #23883a; } .status.failed { color: #c0392b; }
.status.interrupted, .status.running { color: #b7791f; }
.strip { display: grid; grid-template-columns: repeat(auto-fill, minmax(96px, 1fr)); gap: 6px; }
.strip figure { margin: 0; } .strip figcaption { font-size: 11px; color: var(--muted); margin-top: 2px; }
img.thumb { width: 100%; aspect-ratio: 1; object-fit: cover; }
footer { margin-top: 32px; }
"""


def _document(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n"
        "<footer class='note'>Written by <code>stencil view</code>; "
        "run it again to bring the page up to date.</footer>\n</body></html>\n"
    )


# -- the mask contact sheet ----------------------------------------------------------------------------


@dataclass
class MaskSheet:
    """The contact sheet's path and how many photos have a mask picture on it."""

    path: Path
    photos: int
    masks: int


def mask_sheet(store: Store, name: str, cell: int = 256) -> MaskSheet | None:
    """Draw each photo beside its latest mask picture into `masks/contact-sheet.png`; None if no masks yet."""
    from PIL import Image, ImageDraw, ImageOps

    subject = store.get_subject(name)
    store.require_writable(f"write the mask sheet of {name!r}")
    pairs = mask_files(store, subject)
    if not any(mask for _, mask in pairs):
        return None
    per_row = 3 if len(pairs) > 4 else 2 if len(pairs) > 1 else 1  # pairs side by side
    label_h, gap = 18, 16
    rows = -(-len(pairs) // per_row)
    width = per_row * (2 * cell + gap) - gap
    sheet = Image.new("RGB", (width, rows * (cell + label_h + gap) - gap), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (image, mask) in enumerate(pairs):
        x = (index % per_row) * (2 * cell + gap)
        y = (index // per_row) * (cell + label_h + gap)
        for offset, path, label in (
            (0, Path(image["file"]), f"photo {image['id']}"),
            (cell, mask, _mask_label(mask)),
        ):
            tile = _tile(path, cell)
            if tile is None:
                draw.rectangle([x + offset, y, x + offset + cell - 1, y + cell - 1], fill=(235, 235, 235))
            else:
                sheet.paste(ImageOps.pad(tile, (cell, cell), color="white"), (x + offset, y))
            draw.text((x + offset + 3, y + cell + 3), label, fill="black")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    path = store.subject_dir(name) / MASKS_DIR / CONTACT_SHEET_NAME
    atomic_write_bytes(path, buffer.getvalue())
    return MaskSheet(path, len(pairs), sum(1 for _, mask in pairs if mask))


def _tile(path: Path | None, cell: int) -> Any:

    if path is None or not path.is_file():
        return None
    try:
        with Image.open(path) as opened:
            picture = opened.convert("RGB")
    except OSError:
        return None
    picture.thumbnail((cell, cell))
    return picture


def _mask_label(path: Path | None) -> str:
    if path is None:
        return "no mask picture yet"

    try:
        with Image.open(path) as opened:
            coverage = opened.info.get("stencil:coverage")
    except OSError:
        return "mask (unreadable)"
    return f"mask, {float(coverage):.0%} of the picture" if coverage else "mask"
