"""Small charts drawn with Pillow (no plotting library): the loss curve written beside a run's weights."""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 320, 44


def loss_curve_png(losses: list[float], title: str = "training loss") -> bytes:
    """A PNG of `losses` per step (raw in light grey, a running mean in blue), with axis labels."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN + 16, 24, WIDTH - 16, HEIGHT - MARGIN
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    draw.text((left, 6), title, fill="black")
    values = [v for v in losses if math.isfinite(v)]
    if not values:
        draw.text((left + 10, top + 10), "no loss recorded", fill="black")
    else:
        low, high = min(values), max(values)
        span = (high - low) or 1.0
        count = len(losses)

        def point(index: int, value: float) -> tuple[float, float]:
            x = left + (right - left) * (index / max(1, count - 1))
            y = bottom - (bottom - top) * ((value - low) / span)
            return x, y

        raw = [point(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
        window = max(1, count // 20)
        smooth = []
        for i in range(count):
            chunk = [v for v in losses[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
            if chunk:
                smooth.append(point(i, sum(chunk) / len(chunk)))
        if len(raw) > 1:
            draw.line(raw, fill=(200, 200, 200), width=1)
            draw.line(smooth, fill=(30, 90, 200), width=2)
        else:
            x, y = raw[0]
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(30, 90, 200))
        draw.text((4, top - 4), f"{high:.4g}", fill="black")
        draw.text((4, bottom - 8), f"{low:.4g}", fill="black")
        draw.text((left, bottom + 6), "step 1", fill="black")
        draw.text((right - 60, bottom + 6), f"step {count}", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
