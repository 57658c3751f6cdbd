"""Contact sheets: pictures in rows, each with a label drawn under it at a size a person can read.

One drawing routine serves the `gen --grid` sheet, the mask contact sheet of `show --masks` and the bench
contact sheet. Labels use Pillow's scalable default font (`ImageFont.load_default(size=...)`, Pillow >= 10.1),
sized from the cell: never under `MIN_LABEL_PX` pixels, and larger on larger cells, so that a label stays
readable whether the sheet is looked at whole or zoomed in. Pillow only: nothing here loads torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image, ImageFont

MIN_LABEL_PX = 16  # font size; its "Hg" box is >= 14 px high
LABEL_SHARE = 0.075  # of the cell: 256 px cells get 19 px labels, 512 px cells 38 px
CAPTION_LINES = 3  # a panel's caption is wrapped to at most this many lines
HEADING_LINES = 2
INK, MUTED, MARK = (20, 20, 20), (90, 90, 96), (200, 90, 0)
PLACEHOLDER = (235, 235, 235)


@dataclass
class Picture:
    """One image of a sheet (None: a grey placeholder) with its label; `mark` is drawn in orange with a
    frame round the image (e.g. "same as tau 20")."""

    image: Image.Image | None
    label: str
    mark: str = ""


@dataclass
class Panel:
    """Pictures shown side by side as one unit (a photo and its mask), with a caption wrapped under them."""

    pictures: list[Picture]
    caption: str = ""


@dataclass
class SheetRow:
    """One row of panels, with an optional heading drawn above it (the prompt)."""

    panels: list[Panel]
    heading: str = ""


@dataclass
class Layout:
    """The sizes a sheet is drawn with, all from the cell size."""

    cell: int
    font_px: int = field(init=False)
    line_h: int = field(init=False)
    pad: int = field(init=False)

    def __post_init__(self) -> None:
        self.font_px = label_px(self.cell)
        self.line_h = math.ceil(self.font_px * 1.3)
        self.pad = max(6, self.font_px // 2)


def label_px(cell: int) -> int:
    """The label font size for a sheet of `cell`-pixel pictures."""
    return max(MIN_LABEL_PX, round(cell * LABEL_SHARE))


@lru_cache(maxsize=16)
def label_font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font at `size` pixels."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def fit_lines(text: str, font: Any, width: int, limit: int) -> list[str]:
    """`text` wrapped into lines no wider than `width` pixels; at most `limit` lines, the last one cut with
    an ellipsis when the text does not fit."""
    words = text.split()
    lines: list[str] = []
    current = ""
    for word in words:
        candidate = f"{current} {word}".strip()
        if font.getlength(candidate) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    lines = [_cut(line, font, width) for line in lines]
    if len(lines) > limit:
        lines = lines[:limit]
        lines[-1] = _cut(lines[-1] + " …", font, width, force=True)
    return lines


def _cut(line: str, font: Any, width: int, force: bool = False) -> str:
    """`line` shortened with an ellipsis until it fits `width` (`force`: it ends with one anyway)."""
    if font.getlength(line) <= width and not (force and not line.endswith("…")):
        return line
    while line and font.getlength(line.rstrip(" …") + "…") > width:
        line = line.rstrip(" …")[:-1]
    return line.rstrip(" …") + "…"


def draw_sheet(rows: list[SheetRow], cell: int) -> Image.Image:
    """The rows drawn onto one white image: each picture scaled into a `cell` square, labels under it."""
    from PIL import Image, ImageDraw

    layout = Layout(cell)
    font = label_font(layout.font_px)
    gap = layout.font_px  # between panels and between rows
    inner = max(4, cell // 64)  # between the pictures of one panel
    heights = [_row_height(row, layout, font, inner) for row in rows]
    width = max(_row_width(row, cell, inner, gap) for row in rows) + 2 * layout.pad
    sheet = Image.new("RGB", (width, sum(heights) + gap * (len(rows) - 1) + 2 * layout.pad), "white")
    draw = ImageDraw.Draw(sheet)
    y = layout.pad
    for row, height in zip(rows, heights, strict=True):
        _draw_row(sheet, draw, row, layout, font, inner, gap, y, width)
        y += height + gap
    return sheet


def _panel_width(panel: Panel, cell: int, inner: int) -> int:
    count = max(1, len(panel.pictures))
    return count * cell + (count - 1) * inner


def _row_width(row: SheetRow, cell: int, inner: int, gap: int) -> int:
    widths = [_panel_width(panel, cell, inner) for panel in row.panels] or [cell]
    return sum(widths) + gap * (len(widths) - 1)


def _label_lines(picture: Picture, font: Any, cell: int) -> list[str]:
    return fit_lines(picture.label, font, cell - 4, 2) + (fit_lines(picture.mark, font, cell - 4, 2))


def _row_height(row: SheetRow, layout: Layout, font: Any, inner: int) -> int:
    heading = len(fit_lines(row.heading, font, 10**6, HEADING_LINES)) if row.heading else 0
    labels = max(
        (len(_label_lines(p, font, layout.cell)) for panel in row.panels for p in panel.pictures), default=0
    )
    captions = max(
        (
            len(fit_lines(panel.caption, font, _panel_width(panel, layout.cell, inner), CAPTION_LINES))
            for panel in row.panels
            if panel.caption
        ),
        default=0,
    )
    return (heading + labels + captions) * layout.line_h + layout.cell + (layout.pad // 2 if heading else 0)


def _draw_row(
    sheet: Image.Image,
    draw: Any,
    row: SheetRow,
    layout: Layout,
    font: Any,
    inner: int,
    gap: int,
    top: int,
    width: int,
) -> None:
    from PIL import ImageOps

    cell, line_h = layout.cell, layout.line_h
    y = top
    if row.heading:
        for line in fit_lines(row.heading, font, width - 2 * layout.pad, HEADING_LINES):
            draw.text((layout.pad, y), line, fill=INK, font=font)
            y += line_h
        y += layout.pad // 2
    labels = max(
        (len(_label_lines(p, font, cell)) for panel in row.panels for p in panel.pictures), default=0
    )
    x = layout.pad
    for panel in row.panels:
        px = x
        for picture in panel.pictures:
            if picture.image is None:
                draw.rectangle([px, y, px + cell - 1, y + cell - 1], fill=PLACEHOLDER)
            else:
                image = picture.image.convert("RGB")
                if image.width < cell and image.height < cell:  # small pictures: blocky, not blurred
                    scale = cell / max(image.width, image.height)
                    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                    image = image.resize(size, resample=0)
                sheet.paste(ImageOps.pad(image, (cell, cell), color="white"), (px, y))
            if picture.mark:
                frame = max(3, cell // 48)
                draw.rectangle([px, y, px + cell - 1, y + cell - 1], outline=MARK, width=frame)
            ly = y + cell + 2
            for line in fit_lines(picture.label, font, cell - 4, 2):
                draw.text((px + 2, ly), line, fill=INK, font=font)
                ly += line_h
            for line in fit_lines(picture.mark, font, cell - 4, 2):
                draw.text((px + 2, ly), line, fill=MARK, font=font)
                ly += line_h
            px += cell + inner
        if panel.caption:
            cy = y + cell + 2 + labels * line_h
            for line in fit_lines(panel.caption, font, _panel_width(panel, cell, inner), CAPTION_LINES):
                draw.text((x + 2, cy), line, fill=MUTED, font=font)
                cy += line_h
        x += _panel_width(panel, cell, inner) + gap
