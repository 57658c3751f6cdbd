"""The `gen --grid` contact sheet: one row per image seed (its draft, then one tile per tau), every tile
labelled with its seed and tau, and a tile identical to one before it in its row marked as such.

Two taus that inject the same number of draft steps (tau 20 and 60 at 10 steps both inject 1) give the same
image by construction; the tile says so ("same as tau 20") rather than leaving the reader to spot it. A tile
whose pixels equal an earlier one's is marked the same way, whatever the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from stencil_cli.verbs.sheets import Panel, Picture, SheetRow, draw_sheet

if TYPE_CHECKING:
    from PIL import Image

MODE_DRAFT_LABEL = {"edit": "your picture", "context": "draft"}


@dataclass
class GridTile:
    """One generated image of a grid row: its tau (None: plain generation), injected steps, pixels."""

    image: Image.Image
    tau: float | None
    injected_steps: int | None = None


@dataclass
class GridRow:
    """One seed's row: the prompt, the seed, its draft (None: none) and its images in tau order."""

    prompt: str
    seed: int
    draft: Image.Image | None
    tiles: list[GridTile]
    mode: str = "context"


def same_as(tiles: list[GridTile]) -> list[int | None]:
    """For each tile, the index of the first earlier tile it is identical to (same injected steps, or the
    same pixels), else None."""
    found: list[int | None] = []
    for index, tile in enumerate(tiles):
        match = None
        for earlier in range(index):
            other = tiles[earlier]
            if (
                tile.injected_steps is not None and tile.injected_steps == other.injected_steps
            ) or _same_pixels(tile.image, other.image):
                match = earlier
                break
        found.append(match)
    return found


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


def _tau_text(tau: float | None) -> str:
    return "plain" if tau is None else f"tau {tau:g}"


def grid_sheet(rows: list[GridRow], cell: int | None = None) -> Image.Image:
    """The grid picture (cells as wide as the widest image, at least 128 px)."""
    cell = cell or max(128, *(t.image.width for row in rows for t in row.tiles), 128)
    return draw_sheet(grid_sheet_rows(rows), cell)


def grid_sheet_rows(rows: list[GridRow]) -> list[SheetRow]:
    """The grid's rows: a heading wherever the prompt changes, then the draft and each tau's tile, each
    labelled with its seed and tau; a tile identical to an earlier one says which."""
    sheet_rows = []
    previous = None
    for row in rows:
        pictures = []
        if row.draft is not None:
            pictures.append(
                Picture(row.draft, f"{MODE_DRAFT_LABEL.get(row.mode, 'draft')} · seed {row.seed}")
            )
        matches = same_as(row.tiles)
        for tile, match in zip(row.tiles, matches, strict=True):
            mark = ""
            if match is not None:
                steps = tile.injected_steps
                why = f" ({steps} step{'s' if steps != 1 else ''} injected)" if steps is not None else ""
                mark = f"same as {_tau_text(row.tiles[match].tau)}{why}"
            pictures.append(Picture(tile.image, f"{_tau_text(tile.tau)} · seed {row.seed}", mark))
        heading = f"“{row.prompt}”" if row.prompt and row.prompt != previous else ""
        previous = row.prompt
        sheet_rows.append(SheetRow([Panel([p]) for p in pictures], heading=heading))
    return sheet_rows
