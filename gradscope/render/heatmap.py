"""A layer x step heatmap of a watched run's history, as a PNG drawn with Pillow.

Rows are layers in forward order (names on the left), columns optimizer steps
(ticks below), colours log10 of the RMS on a sequential scale in decades with a
labelled colour bar.  NaN/inf cells are drawn in red, a colour the scale never
uses, and said so in the legend; cells not measured stay blank (light grey).
The first bad step gets a red marker above its column.

Pillow comes with tensorboard (its image summaries need it); matplotlib is not
needed.  ``heatmap_image`` also returns the geometry, so a test can check that
a given cell lands on the pixels it should.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

QUANTITY_TITLES = {
    "gradient": ("log10 RMS of ∂ℓ/∂h per layer", "log10 RMS of dloss/dh per layer"),
    "activation": ("log10 RMS of activations per layer", "log10 RMS of activations per layer"),
}

BACKGROUND = (255, 255, 255)
MISSING = (232, 232, 232)  # not measured: blank, lighter than any scale colour
NONFINITE = (228, 26, 28)  # red: outside the scale below (blue -> green -> yellow)
TEXT = (20, 20, 20)
GRID = (150, 150, 150)

# A sequential scale from dark blue (small) to yellow (large): anchors chosen by
# hand to rise monotonically in lightness, so the order of decades reads without
# the colour bar and in greyscale; no red in it, which is kept for NaN/inf.
_ANCHORS = [
    (0.00, (38, 24, 95)),
    (0.25, (44, 92, 160)),
    (0.50, (33, 150, 140)),
    (0.75, (120, 200, 80)),
    (1.00, (250, 230, 40)),
]

# The widest decade span drawn: a dead layer (RMS 0, drawn at the float32 floor)
# would otherwise squeeze every other decade into one colour.
MAX_DECADES = 16

PLOT_WIDTH = 720  # columns share this width (at least MIN_CELL_W px each)
PLOT_MAX_HEIGHT = 640
MIN_CELL_W, MAX_CELL_W = 2, 40
MIN_ROW_H, MAX_ROW_H = 3, 20
FONT_SIZE = 13  # px: legible at TensorBoard's image card without zooming
LABEL_ROW_H = 15  # rows closer than this are labelled every k-th


def colour(t: float) -> tuple[int, int, int]:
    """The scale's colour at position t in [0, 1] (clamped)."""
    t = min(1.0, max(0.0, t))
    for (t0, c0), (t1, c1) in zip(_ANCHORS, _ANCHORS[1:], strict=False):
        if t <= t1:
            f = (t - t0) / (t1 - t0)
            return tuple(round(a + (b - a) * f) for a, b in zip(c0, c1, strict=True))  # type: ignore[return-value]
    return _ANCHORS[-1][1]


def _font(size: int) -> tuple[Any, bool]:
    """A TrueType font and whether it has the maths glyphs (DejaVu does; Pillow's
    built-in default does not, so titles fall back to ASCII)."""
    from PIL import ImageFont

    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size), True
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size), False
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default(), False


@dataclass(frozen=True)
class Geometry:
    """Where the cells are: cell (row i, column j) covers x in [x0 + j*cell_w,
    x0 + (j+1)*cell_w) and y in [y0 + i*row_h, y0 + (i+1)*row_h)."""

    x0: int
    y0: int
    cell_w: int
    row_h: int
    rows: int
    columns: int
    vmin: float
    vmax: float

    def cell_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        x = self.x0 + column * self.cell_w
        y = self.y0 + row * self.row_h
        return x, y, x + self.cell_w, y + self.row_h


def _scale(values: list[float]) -> tuple[float, float]:
    if not values:
        return -1.0, 0.0
    vmax = math.ceil(max(values))
    vmin = math.floor(min(values))
    vmin = max(vmin, vmax - MAX_DECADES)
    if vmin >= vmax:
        vmin = vmax - 1
    return float(vmin), float(vmax)


def _decade_label(exponent: int) -> str:
    return "1" if exponent == 0 else f"1e{exponent}"


def _step_ticks(steps: list[int], cell_w: int) -> list[int]:
    """Column indices to label: about one per 90 px, always the first and last."""
    n = len(steps)
    if n == 0:
        return []
    every = max(1, math.ceil(90 / cell_w))
    ticks = list(range(0, n, every))
    if n - 1 - ticks[-1] < every / 2 and len(ticks) > 1:
        ticks[-1] = n - 1
    elif ticks[-1] != n - 1:
        ticks.append(n - 1)
    return ticks


def heatmap_image(history: dict[str, Any], quantity: str) -> tuple[Any, Geometry]:
    """The heatmap as a PIL image and its cell geometry."""
    from PIL import Image, ImageDraw

    if quantity not in QUANTITY_TITLES:
        raise ValueError(f"quantity must be one of {', '.join(QUANTITY_TITLES)}, not {quantity!r}")
    layers: list[str] = list(history.get("layers") or [])
    steps: list[int] = list(history.get("steps") or [])
    grid: list[list[float | None]] = history.get(f"{quantity}_rms_log10") or [[] for _ in layers]
    bad = {(int(i), int(j)) for i, j in (history.get("nonfinite") or {}).get(quantity, [])}
    rows, columns = max(1, len(layers)), max(1, len(steps))

    font, maths = _font(FONT_SIZE)
    small, _ = _font(FONT_SIZE - 1)
    title_font, _ = _font(FONT_SIZE + 2)
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_w(text: str, f: Any = font) -> int:
        left, _, right, _ = draw_probe.textbbox((0, 0), text, font=f)
        return int(right - left)

    cell_w = max(MIN_CELL_W, min(MAX_CELL_W, PLOT_WIDTH // columns))
    row_h = max(MIN_ROW_H, min(MAX_ROW_H, PLOT_MAX_HEIGHT // rows))
    label_every = max(1, math.ceil(LABEL_ROW_H / row_h))
    label_w = max((text_w(name) for name in layers), default=0)
    margin = 10
    x0 = margin + min(label_w, 260) + 8
    y0 = 58  # title, subtitle and the first-bad-step marker above the plot
    plot_w, plot_h = columns * cell_w, rows * row_h
    bar_x = x0 + plot_w + 24
    bar_w = 16
    width = bar_x + bar_w + 8 + text_w("1e-10") + margin + 40
    legend_y = y0 + plot_h + 44
    height = max(legend_y + 24, y0 + 220)
    width = max(width, x0 + 420)

    values = [v for row in grid for v in row if v is not None and math.isfinite(v)]
    vmin, vmax = _scale(values)
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)

    title = QUANTITY_TITLES[quantity][0 if maths else 1]
    draw.text((margin, 6), f"{title} × optimizer step", font=title_font, fill=TEXT)
    draw.text((margin, 26), "rows: layers in forward order · colour: decades (bar at right)", font=small, fill=TEXT)

    # cells
    geometry = Geometry(x0, y0, cell_w, row_h, len(layers), len(steps), vmin, vmax)
    draw.rectangle((x0, y0, x0 + plot_w - 1, y0 + plot_h - 1), fill=MISSING)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value is None or not math.isfinite(value):
                continue
            box = geometry.cell_box(i, j)
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=colour((value - vmin) / (vmax - vmin)))
    for i, j in bad:
        if i < len(layers) and j < len(steps):
            box = geometry.cell_box(i, j)
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=NONFINITE)
    draw.rectangle((x0 - 1, y0 - 1, x0 + plot_w, y0 + plot_h), outline=GRID)

    # layer names: every row when rows are tall enough, else every k-th and every row with a NaN/inf
    bad_rows = {i for i, _ in bad}
    for i, name in enumerate(layers):
        if i % label_every and i not in bad_rows:
            continue
        shown = name if text_w(name) <= 260 else "…" + name[-30:]
        y = y0 + i * row_h + row_h / 2
        draw.text((x0 - 6, y), shown, font=font, fill=NONFINITE if i in bad_rows else TEXT, anchor="rm")

    # step ticks and the first bad step
    for j in _step_ticks(steps, cell_w):
        x = x0 + j * cell_w + cell_w // 2
        draw.line((x, y0 + plot_h, x, y0 + plot_h + 4), fill=TEXT)
        draw.text((x, y0 + plot_h + 6), str(steps[j]), font=small, fill=TEXT, anchor="mt")
    draw.text((x0 + plot_w / 2, y0 + plot_h + 22), "optimizer step", font=small, fill=TEXT, anchor="mt")
    bad_columns = sorted({j for _, j in bad})
    if bad_columns and bad_columns[0] < len(steps):
        j = bad_columns[0]
        x = x0 + j * cell_w + cell_w // 2
        draw.polygon([(x - 5, y0 - 11), (x + 5, y0 - 11), (x, y0 - 3)], fill=NONFINITE)
        label = f"first NaN/inf: step {steps[j]}"
        anchor = "rb" if x + 8 + text_w(label, small) > x0 + plot_w else "lb"
        draw.text((x + (-8 if anchor == "rb" else 8), y0 - 3), label, font=small, fill=NONFINITE, anchor=anchor)

    # colour bar in decades
    bar_top, bar_bottom = y0, y0 + max(120, min(plot_h, 320))
    span = bar_bottom - bar_top
    for k in range(span):
        t = 1.0 - k / max(1, span - 1)
        draw.line((bar_x, bar_top + k, bar_x + bar_w - 1, bar_top + k), fill=colour(t))
    draw.rectangle((bar_x - 1, bar_top - 1, bar_x + bar_w, bar_bottom), outline=GRID)
    decades = int(vmax - vmin)
    step_d = max(1, math.ceil(decades / max(1, span // 18)))
    for e in range(int(vmin), int(vmax) + 1, step_d):
        y = bar_bottom - 1 - (e - vmin) / (vmax - vmin) * (span - 1)
        draw.line((bar_x + bar_w, y, bar_x + bar_w + 4, y), fill=TEXT)
        draw.text((bar_x + bar_w + 6, y), _decade_label(e), font=small, fill=TEXT, anchor="lm")
    draw.text((bar_x + bar_w // 2, bar_top - 22), "RMS", font=small, fill=TEXT, anchor="mb")

    # legend
    lx = x0
    draw.rectangle((lx, legend_y, lx + 12, legend_y + 12), fill=NONFINITE)
    draw.text((lx + 18, legend_y + 6), "NaN/inf (outside the scale)", font=small, fill=TEXT, anchor="lm")
    lx += 18 + text_w("NaN/inf (outside the scale)", small) + 18
    draw.rectangle((lx, legend_y, lx + 12, legend_y + 12), fill=MISSING, outline=GRID)
    draw.text((lx + 18, legend_y + 6), "not measured", font=small, fill=TEXT, anchor="lm")
    return image, geometry


def heatmap_png(history: dict[str, Any], quantity: str) -> bytes:
    """The heatmap of ``quantity`` ("gradient" or "activation") as PNG bytes."""
    image, _ = heatmap_image(history, quantity)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()
