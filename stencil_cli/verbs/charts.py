"""Charts drawn with matplotlib (Agg, no display): a run's loss curve and the bench's score bars.

matplotlib is imported inside the functions, never at module level: the command line starts without it.
Each chart is a `Figure` built by a `*_figure` function (what the tests inspect) and written as PNG bytes by
`figure_png`. Text is 12 pt at 100 dpi (about 17 px), axes are titled and gridlines drawn.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
FONT_PT = 12
RAW_COLOUR, SMOOTH_COLOUR = "#b8b8b8", "#1e5ac8"
SCORE_COLOURS = {"dino": "#3465a4", "clip_t": "#cc6600", "clip_i": "#4e9a06"}
SCORE_NAMES = {"dino": "DINO", "clip_t": "CLIP-T", "clip_i": "CLIP-I"}
PAPER_SCORES = {"dino": 0.671, "clip_t": 0.328}  # the paper's Stencil row (SD1.5 base)


def _style() -> dict[str, Any]:
    return {"font.size": FONT_PT, "axes.titlesize": FONT_PT + 1, "legend.fontsize": FONT_PT - 1}


def running_mean(values: list[float], window: int) -> list[float | None]:
    """The mean of the last `window` finite values at each position (None before the first finite one)."""
    out: list[float | None] = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(chunk) / len(chunk) if chunk else None)
    return out


def loss_curve_figure(losses: list[float], title: str = "training loss") -> Figure:
    """The loss per step (raw in grey, a running mean in blue) with titled axes and gridlines."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_style()):
        figure = Figure(figsize=(7.2, 3.6), dpi=DPI, layout="constrained")
        axes = figure.subplots()
        steps = list(range(1, len(losses) + 1))
        finite = [(s, v) for s, v in zip(steps, losses, strict=True) if math.isfinite(v)]
        if not finite:
            axes.text(0.5, 0.5, "no loss recorded", ha="center", va="center", transform=axes.transAxes)
        elif len(finite) == 1:
            axes.plot(*zip(*finite, strict=True), "o", color=SMOOTH_COLOUR, label="loss")
        else:
            window = max(1, len(losses) // 20)
            axes.plot(*zip(*finite, strict=True), color=RAW_COLOUR, linewidth=1, label="loss per step")
            smooth = [
                (s, v) for s, v in zip(steps, running_mean(losses, window), strict=True) if v is not None
            ]
            axes.plot(
                *zip(*smooth, strict=True),
                color=SMOOTH_COLOUR,
                linewidth=2,
                label=f"running mean of {window} step{'s' if window != 1 else ''}",
            )
            # above the plot, right of the title: never over the curve
            axes.legend(loc="lower right", bbox_to_anchor=(1, 1), ncols=2, frameon=False, borderaxespad=0.2)
        axes.set_title(title, loc="left")
        axes.set_xlabel("training step")
        axes.set_ylabel("training loss (MSE)")
        axes.grid(True, color="#dddddd", linewidth=0.8)
        axes.set_axisbelow(True)
        if steps:
            axes.set_xlim(0.5, max(steps) + 0.5)
    return figure


def loss_curve_png(losses: list[float], title: str = "training loss") -> bytes:
    """The loss curve of `loss_curve_figure` as PNG bytes."""
    return figure_png(loss_curve_figure(losses, title))


def scores_figure(groups: list[tuple[str, dict[str, Any]]]) -> Figure:
    """Bars of DINO, CLIP-T and CLIP-I per (name, scores) group, each bar with its value, the paper's
    Stencil DINO and CLIP-T as dashed lines."""
    import matplotlib
    from matplotlib.figure import Figure

    keys = list(SCORE_NAMES)
    with matplotlib.rc_context(_style()):
        width = max(5.5, 1.0 + 1.5 * len(groups))
        figure = Figure(figsize=(width, 4.2), dpi=DPI, layout="constrained")
        axes = figure.subplots()
        bar = 0.27
        for k, key in enumerate(keys):
            positions = [g + (k - 1) * bar for g in range(len(groups))]
            values = [float(scores.get(key) or 0.0) for _, scores in groups]
            bars = axes.bar(positions, values, bar * 0.95, color=SCORE_COLOURS[key], label=SCORE_NAMES[key])
            # on a white box: a dashed paper line through a value never hides it
            axes.bar_label(
                bars,
                fmt="%.2f",
                padding=2,
                fontsize=FONT_PT - 1,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5},
                zorder=5,
            )
        for key, value in PAPER_SCORES.items():
            axes.axhline(
                value,
                color=SCORE_COLOURS[key],
                linestyle="--",
                linewidth=1.2,
                label=f"paper {SCORE_NAMES[key]} {value:.3f}",
            )
        axes.set_xticks(range(len(groups)), [name for name, _ in groups])
        axes.set_xlim(-0.5, len(groups) - 0.5)
        axes.set_ylim(0, 1.12)
        axes.set_ylabel("score (higher is better)")
        axes.set_xlabel("subject")
        axes.set_title("DreamBench scores per subject")
        axes.grid(True, axis="y", color="#dddddd", linewidth=0.8)
        axes.set_axisbelow(True)
        figure.legend(loc="outside lower center", ncols=3, frameon=False)
    return figure


def figure_png(figure: Figure) -> bytes:
    """`figure` rendered by the Agg canvas into PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()
