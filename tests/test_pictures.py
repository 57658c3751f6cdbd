"""Every picture stencil writes can be read at its own size: labels drawn big enough, charts with titled axes,
gridlines and values on bars, grid tiles labelled with seed and tau and identical tiles marked.

"Readable" is the rule of issue 25: text at least 1.5% of the picture's height or at least 14 px high. Each
label is shown to be drawn by comparing against the same picture rendered without it.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, ImageChops

from stencil_cli.verbs.charts import figure_png, loss_curve_figure, scores_figure
from stencil_cli.verbs.grid import GridRow, GridTile, grid_sheet, grid_sheet_rows, same_as
from stencil_cli.verbs.sheets import (
    MARK,
    Layout,
    Panel,
    Picture,
    SheetRow,
    draw_sheet,
    fit_lines,
    label_font,
    label_px,
)

READABLE_PX = 14


def readable(text_height: float, picture_height: int) -> bool:
    """The issue's rule for a label's height on a picture of `picture_height` pixels."""
    return text_height >= READABLE_PX or text_height >= 0.015 * picture_height


def png(data: bytes) -> Image.Image:
    """PNG bytes as an RGB image."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def changed_box(a: Image.Image, b: Image.Image) -> tuple[int, int, int, int] | None:
    """The box where two pictures differ, both put on a white canvas of the larger size (None: identical)."""
    size = (max(a.width, b.width), max(a.height, b.height))
    canvases = []
    for picture in (a, b):
        canvas = Image.new("RGB", size, "white")
        canvas.paste(picture.convert("RGB"), (0, 0))
        canvases.append(canvas)
    return ImageChops.difference(*canvases).getbbox()


def texts_of(figure: Any) -> list[Any]:
    """Every visible, non-empty text artist of a drawn figure (titles, axis titles, ticks, legend, values)."""
    figure.canvas.draw()
    return [t for t in figure.findobj(lambda a: hasattr(a, "get_text")) if t.get_visible() and t.get_text()]


# -- the loss curve --------------------------------------------------------------------------------------


def test_the_loss_curve_has_titled_axes_gridlines_and_readable_text() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = loss_curve_figure([1.0 / (step + 1) for step in range(100)], "run 3 of cat")
    FigureCanvasAgg(figure)
    [axes] = figure.axes
    assert axes.get_xlabel() == "training step" and axes.get_ylabel() == "training loss (MSE)"
    assert axes.get_title(loc="left") == "run 3 of cat"
    assert all(line.get_visible() for line in axes.get_ygridlines())
    assert len([t for t in axes.get_yticklabels() if t.get_text()]) >= 4  # more than min and max
    height = figure.bbox.height
    for text in texts_of(figure):
        box = text.get_window_extent()
        assert readable(box.height, int(height)), (text.get_text(), box.height)


def test_the_loss_curve_labels_are_drawn_on_the_picture() -> None:
    losses = [0.5 - 0.004 * step for step in range(100)]
    labelled = png(figure_png(loss_curve_figure(losses)))
    figure = loss_curve_figure(losses)
    [axes] = figure.axes
    axes.set_xlabel("")
    axes.set_ylabel("")
    axes.set_title("", loc="left")
    bare = png(figure_png(figure))
    assert labelled.size == bare.size == (720, 360)
    assert changed_box(labelled, bare) is not None


def test_the_loss_curve_draws_a_single_step_and_no_steps() -> None:
    for losses in ([], [0.5], [float("nan"), 0.3, 0.2]):
        data = figure_png(loss_curve_figure(losses))
        assert data.startswith(b"\x89PNG")


# -- the bench chart --------------------------------------------------------------------------------------


GROUPS = [
    ("backpack", {"dino": 0.61, "clip_t": 0.31, "clip_i": 0.78}),
    ("cat", {"dino": 0.55, "clip_t": 0.29, "clip_i": 0.71}),
    ("overall", {"dino": 0.58, "clip_t": 0.30, "clip_i": 0.745}),
]


def test_the_bench_chart_writes_each_value_on_its_bar() -> None:
    figure = scores_figure(GROUPS)
    [axes] = figure.axes
    shown = [text.get_text() for text in texts_of(figure)]
    for _, scores in GROUPS:
        for value in scores.values():
            assert f"{value:.2f}" in shown
    assert axes.get_ylabel() and axes.get_xlabel() and axes.get_title()
    assert [t.get_text() for t in axes.get_xticklabels()] == ["backpack", "cat", "overall"]
    labelled = png(figure_png(figure))
    for text in list(axes.texts):  # the bar values are the axes' texts
        text.remove()
    assert changed_box(labelled, png(figure_png(figure))) is not None
    for text in texts_of(scores_figure(GROUPS)):
        assert readable(text.get_window_extent().height, int(figure.bbox.height)), text.get_text()


def test_the_bench_chart_has_no_empty_space_beside_the_bars() -> None:
    for groups in (GROUPS[:1], GROUPS, GROUPS * 4):
        figure = scores_figure(groups)
        figure.canvas.draw()
        [axes] = figure.axes
        bars = [patch for patch in axes.patches]
        right = max(bar.get_window_extent().x1 for bar in bars)
        left = min(bar.get_window_extent().x0 for bar in bars)
        box = axes.get_window_extent()
        margins = ((left - box.x0) / box.width, (box.x1 - right) / box.width)
        assert max(margins) < 0.15, (len(groups), margins)  # no empty third beside the bars


# -- contact sheets ----------------------------------------------------------------------------------------


def solid(colour: tuple[int, int, int], size: int = 64) -> Image.Image:
    """A one-colour square."""
    return Image.new("RGB", (size, size), colour)


def test_sheet_labels_are_readable_on_small_and_large_cells() -> None:
    for cell in (64, 128, 256, 512, 1024):
        font = label_font(label_px(cell))
        left, top, right, bottom = font.getbbox("Hg")
        sheet = draw_sheet([SheetRow([Panel([Picture(solid((9, 9, 9)), "tau 60 · seed 1")])])] * 3, cell)
        assert readable(bottom - top, sheet.height), (cell, bottom - top, sheet.height)


def test_sheet_labels_and_captions_are_drawn_under_their_pictures() -> None:
    cell = 128

    def sheet(label: str, caption: str, heading: str) -> Image.Image:
        pictures = [Picture(solid((200, 30, 30)), label), Picture(solid((30, 30, 200)), label)]
        return draw_sheet([SheetRow([Panel(pictures, caption)], heading)], cell)

    full = sheet("photo 1", "caption: a toy robot on a table", "a heading")
    no_label = sheet("", "caption: a toy robot on a table", "a heading")
    no_caption = sheet("photo 1", "x", "a heading")
    no_heading = sheet("photo 1", "caption: a toy robot on a table", "")
    layout = Layout(cell)
    top_of_pictures = layout.pad + layout.line_h + layout.pad // 2
    below = top_of_pictures + cell
    label_box = changed_box(full, no_label)
    assert label_box is not None and label_box[1] >= below  # the label is under the pictures
    caption_box = changed_box(full, no_caption)
    assert caption_box is not None and caption_box[1] >= below + layout.line_h  # under the labels
    assert no_heading.height < full.height
    assert full.getpixel((layout.pad + cell // 2, top_of_pictures + cell // 2)) == (200, 30, 30)


def test_long_text_is_wrapped_and_cut_to_fit() -> None:
    font = label_font(16)
    lines = fit_lines(
        "a photo of a toy robot standing on a wooden table in the morning sun " * 3, font, 200, 3
    )
    assert len(lines) == 3 and lines[-1].endswith("…")
    assert all(font.getlength(line) <= 200 for line in lines)
    assert fit_lines("short", font, 200, 3) == ["short"]
    assert fit_lines("", font, 200, 3) == []


# -- the gen --grid sheet ---------------------------------------------------------------------------------


def test_grid_marks_tiles_identical_to_an_earlier_one() -> None:
    a, b = solid((10, 10, 10)), solid((250, 250, 250))
    tiles = [GridTile(a, 20.0, 1), GridTile(a, 60.0, 1), GridTile(b, 80.0, 3), GridTile(b.copy(), 90.0, None)]
    assert same_as(tiles) == [None, 0, None, 2]  # same injected steps, then the same pixels


def test_grid_labels_each_tile_with_seed_and_tau_and_frames_the_identical_one() -> None:
    draft, first, second = solid((0, 0, 200)), solid((0, 160, 0)), solid((160, 0, 0))
    row = GridRow(
        "a toy robot on the moon",
        7,
        draft,
        [GridTile(first, 20.0, 1), GridTile(first, 60.0, 1), GridTile(second, 80.0, 3)],
    )
    cell = 128
    sheet = grid_sheet([row], cell)
    layout = Layout(cell)
    top = layout.pad + layout.line_h + layout.pad // 2  # under the prompt heading
    gap = layout.font_px
    x_of = [layout.pad + i * (cell + gap) for i in range(4)]
    assert sheet.getpixel((x_of[2] + 1, top + cell // 2)) == MARK  # tau 60's frame
    assert sheet.getpixel((x_of[1] + 1, top + cell // 2)) != MARK
    assert sheet.getpixel((x_of[2] + cell // 2, top + cell // 2)) == (0, 160, 0)
    unlabelled = grid_sheet(
        [
            GridRow(
                "", 7, draft, [GridTile(first, 20.0, 1), GridTile(first, 60.0, 1), GridTile(second, 80.0, 3)]
            )
        ],
        cell,
    )
    assert unlabelled.height < sheet.height  # no heading without a prompt
    [sheet_row] = grid_sheet_rows([row])
    pictures = [panel.pictures[0] for panel in sheet_row.panels]
    assert [p.label for p in pictures] == [
        "draft · seed 7",
        "tau 20 · seed 7",
        "tau 60 · seed 7",
        "tau 80 · seed 7",
    ]
    assert [p.mark for p in pictures] == ["", "", "same as tau 20 (1 step injected)", ""]
    assert sheet_row.heading == "“a toy robot on the moon”"
    bare = draw_sheet(
        [SheetRow([Panel([Picture(p.image, "", "")]) for p in pictures], sheet_row.heading)], cell
    )
    box = changed_box(sheet, bare)
    assert box is not None and box[3] > top + cell  # the labels (under the tiles) are drawn


# -- the bench pictures -----------------------------------------------------------------------------------


def test_the_bench_contact_sheet_labels_each_row_with_its_prompt(tmp_path: Any) -> None:
    from stencil_cli.store.records import Generation
    from stencil_cli.verbs.bench import contact_sheet_rows, plot_scores

    rows = []
    for index, (prompt, seed) in enumerate(
        [("a dog in the jungle", 0), ("a dog in the jungle", 1), ("a dog on the moon", 0)]
    ):
        path = tmp_path / f"{index}.png"
        solid((index * 60, 100, 100)).save(path)
        prompt_index = 0 if "jungle" in prompt else 1
        rows.append(
            Generation(
                index + 1,
                1,
                1,
                prompt,
                None,
                seed,
                60.0,
                {"bench": {"prompt_index": prompt_index}},
                path,
                None,
                {"dino": 0.5 + index / 10},
                "2026-01-01",
            )
        )
    photos = [solid((200, 200, 0)), solid((0, 200, 200))]
    sheet_rows = contact_sheet_rows("dog", photos, ["a {0} {1} in the jungle", "a {0} {1} on the moon"], rows)
    assert [row.heading for row in sheet_rows] == [
        "dog: reference photos",
        "p0: a dog in the jungle",
        "p1: a dog on the moon",
    ]
    assert [p.pictures[0].label for p in sheet_rows[1].panels] == ["seed 0 · DINO 0.50", "seed 1 · DINO 0.60"]
    sheet = draw_sheet(sheet_rows, 160)
    bare = draw_sheet([SheetRow(row.panels) for row in sheet_rows], 160)
    assert bare.height < sheet.height and changed_box(sheet, bare) is not None  # the headings are drawn
    chart = png(
        plot_scores(
            {
                "subjects": [{"subject": "dog", "dino": 0.5, "clip_t": 0.3, "clip_i": 0.7}],
                "overall": {"dino": 0.5, "clip_t": 0.3, "clip_i": 0.7},
            }
        )
    )
    assert chart.width >= 500
