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
    "gradient": ("∂ℓ/∂h RMS per layer", "dloss/dh RMS per layer"),
    "activation": ("activation RMS per layer", "activation RMS per layer"),
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

# The colour scale covers the median's decade +-HALF_SPAN decades (cut to the
# data): a blow-up to 1e30 or a dead layer at 0 would otherwise squeeze the
# healthy layers' decades into one colour.  Cells beyond saturate at the ends,
# which the colour bar labels "<=" and ">=".
HALF_SPAN = 6

# TensorBoard shows an image scaled to its card, about 350-450 px wide by default:
# the image is ~500 px wide with 15-17 px text, so the text stays >= ~11 px there.
PLOT_WIDTH = 280  # columns share this width
MIN_CELL_W = 2  # narrower columns are pooled at drawing time (max / OR, as history merges)
MAX_CELL_W = 30
PLOT_MAX_HEIGHT = 520
MIN_ROW_H, MAX_ROW_H = 3, 24
FONT_SIZE = 16
LABEL_ROW_H = 18  # rows closer than this are labelled every k-th
LABEL_MAX_W = 150


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
    columns: int  # drawn columns (history columns pooled by ``pool``)
    vmin: float
    vmax: float
    pool: int = 1

    def column(self, history_column: int) -> int:
        """The drawn column showing a history column."""
        return history_column // self.pool

    def cell_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        x = self.x0 + column * self.cell_w
        y = self.y0 + row * self.row_h
        return x, y, x + self.cell_w, y + self.row_h


def _scale(values: list[float]) -> tuple[float, float]:
    """Decades drawn: the median's +-HALF_SPAN, cut to the data's range."""
    if not values:
        return -1.0, 0.0
    ordered = sorted(values)
    median = ordered[len(ordered) // 2]
    vmin = max(math.floor(ordered[0]), math.floor(median) - HALF_SPAN)
    vmax = min(math.ceil(ordered[-1]), math.ceil(median) + HALF_SPAN)
    if vmin >= vmax:
        vmin = vmax - 1
    return float(vmin), float(vmax)


def _pool(
    steps: list[int], grid: list[list[float | None]], bad: set[tuple[int, int]], factor: int
) -> tuple[list[int], list[list[float | None]], set[tuple[int, int]]]:
    """Merge every ``factor`` neighbouring columns as the history merges them: the
    largest value, non-finite when any was, the later step."""
    if factor <= 1:
        return steps, grid, bad
    pooled_steps = [steps[min(len(steps), j + factor) - 1] for j in range(0, len(steps), factor)]
    pooled = []
    for row in grid:
        out: list[float | None] = []
        for j in range(0, len(row), factor):
            chunk = [v for v in row[j : j + factor] if v is not None]
            out.append(max(chunk) if chunk else None)
        pooled.append(out)
    return pooled_steps, pooled, {(i, j // factor) for i, j in bad}


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
    pool = max(1, math.ceil(len(steps) / (PLOT_WIDTH // MIN_CELL_W)))
    steps, grid, bad = _pool(steps, grid, bad, pool)
    rows, columns = max(1, len(layers)), max(1, len(steps))

    font, maths = _font(FONT_SIZE)
    small, _ = _font(FONT_SIZE - 1)
    title_font, _ = _font(FONT_SIZE + 2)
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    widths: dict[tuple[str, int], int] = {}

    def text_w(text: str, f: Any = font) -> int:
        key = (text, id(f))
        if key not in widths:
            left, _, right, _ = draw_probe.textbbox((0, 0), text, font=f)
            widths[key] = int(right - left)
        return widths[key]

    def shown(name: str) -> str:
        """A layer name cut from the left to fit (the end names the layer best)."""
        if text_w(name) <= LABEL_MAX_W:
            return name
        while name and text_w("…" + name) > LABEL_MAX_W:
            name = name[1:]
        return "…" + name

    values = [v for row in grid for v in row if v is not None and math.isfinite(v)]
    vmin, vmax = _scale(values)
    below = bool(values) and min(values) < vmin
    above = bool(values) and max(values) > vmax

    cell_w = max(MIN_CELL_W, min(MAX_CELL_W, PLOT_WIDTH // columns))
    row_h = max(MIN_ROW_H, min(MAX_ROW_H, PLOT_MAX_HEIGHT // rows))
    label_every = max(1, math.ceil(LABEL_ROW_H / row_h))
    margin = 8
    x0 = margin + max((text_w(shown(name)) for name in layers), default=0) + 8
    y0 = 76  # title, subtitle and the first-bad-step marker above the plot
    plot_w, plot_h = columns * cell_w, rows * row_h
    bar_x, bar_w = x0 + plot_w + 18, 14
    tick_w = max(text_w(f"≥{_decade_label(int(e))}", small) for e in (vmin, vmax))
    legend = [(NONFINITE, "NaN/inf"), (MISSING, "not measured")]
    legend_w = sum(18 + text_w(label, small) + 16 for _, label in legend)
    bar_bottom = y0 + max(140, plot_h)
    width = max(bar_x + bar_w + 6 + tick_w + margin, margin + legend_w, x0 + 160)
    legend_y = max(y0 + plot_h + 46, bar_bottom + 8)
    height = legend_y + 26

    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    title = QUANTITY_TITLES[quantity][0 if maths else 1]
    draw.text((margin, 4), title, font=title_font, fill=TEXT)
    draw.text((margin, 28), "log10 colour · rows: layers, forward order", font=small, fill=TEXT)

    # cells
    geometry = Geometry(x0, y0, cell_w, row_h, len(layers), len(steps), vmin, vmax, pool)
    # One pixel per cell, scaled up in one call (drawing 30 000 rectangles one by one
    # holds the GIL ~10x longer: this runs beside the training thread).
    palette = [colour(k / 255) for k in range(256)]
    cells = bytearray()
    for i in range(len(layers)):
        row = grid[i] if i < len(grid) else []
        for j in range(len(steps)):
            value = row[j] if j < len(row) else None
            if (i, j) in bad:
                cells += bytes(NONFINITE)
            elif value is None or not math.isfinite(value):
                cells += bytes(MISSING)
            else:
                t = min(1.0, max(0.0, (value - vmin) / (vmax - vmin)))
                cells += bytes(palette[round(t * 255)])
    if layers and steps:
        small_image = Image.frombytes("RGB", (len(steps), len(layers)), bytes(cells))
        image.paste(small_image.resize((plot_w, plot_h), Image.Resampling.NEAREST), (x0, y0))
    else:
        draw.rectangle((x0, y0, x0 + plot_w - 1, y0 + plot_h - 1), fill=MISSING)
    draw.rectangle((x0 - 1, y0 - 1, x0 + plot_w, y0 + plot_h), outline=GRID)

    # layer names: bad rows first, then every k-th row, never two closer than LABEL_ROW_H
    bad_rows = sorted({i for i, _ in bad if i < len(layers)})
    placed: list[float] = []
    for i in bad_rows + [i for i in range(0, len(layers), label_every) if i not in bad_rows]:
        y = y0 + i * row_h + row_h / 2
        if any(abs(y - other) < LABEL_ROW_H for other in placed):
            continue
        placed.append(y)
        draw.text((x0 - 6, y), shown(layers[i]), font=font, fill=NONFINITE if i in bad_rows else TEXT, anchor="rm")
    for i in bad_rows:  # a red tick left of each bad row, even where its name did not fit
        y = y0 + i * row_h
        draw.rectangle((x0 - 5, y, x0 - 2, y + max(row_h, 3) - 1), fill=NONFINITE)

    # step ticks and the first bad step
    for j in _step_ticks(steps, cell_w):
        x = x0 + j * cell_w + cell_w // 2
        draw.line((x, y0 + plot_h, x, y0 + plot_h + 4), fill=TEXT)
        draw.text((x, y0 + plot_h + 6), str(steps[j]), font=small, fill=TEXT, anchor="mt")
    draw.text((x0 + plot_w / 2, y0 + plot_h + 25), "optimizer step", font=small, fill=TEXT, anchor="mt")
    bad_columns = sorted({j for _, j in bad})
    if bad_columns and bad_columns[0] < len(steps):
        j = bad_columns[0]
        x = x0 + j * cell_w + cell_w // 2
        draw.polygon([(x - 6, y0 - 13), (x + 6, y0 - 13), (x, y0 - 3)], fill=NONFINITE)
        label = f"first NaN/inf: step {steps[j]}"
        right = x + 9 + text_w(label, small) <= width - margin
        draw.text(
            (x + 9 if right else x - 9, y0 - 3), label, font=small, fill=NONFINITE, anchor="lb" if right else "rb"
        )

    # colour bar in decades; "<=" / ">=" where cells beyond the scale saturate
    span = bar_bottom - y0
    for k in range(span):
        draw.line((bar_x, y0 + k, bar_x + bar_w - 1, y0 + k), fill=colour(1.0 - k / max(1, span - 1)))
    draw.rectangle((bar_x - 1, y0 - 1, bar_x + bar_w, bar_bottom), outline=GRID)
    decades = int(vmax - vmin)
    every = max(1, math.ceil(decades / max(1, span // 22)))
    ticks = list(range(int(vmin), int(vmax) + 1, every))
    if ticks[-1] != int(vmax):
        ticks.append(int(vmax))
    for e in ticks:
        y = bar_bottom - 1 - (e - vmin) / (vmax - vmin) * (span - 1)
        prefix = "≤" if e == int(vmin) and below else "≥" if e == int(vmax) and above else ""
        draw.line((bar_x + bar_w, y, bar_x + bar_w + 4, y), fill=TEXT)
        draw.text((bar_x + bar_w + 6, y), prefix + _decade_label(e), font=small, fill=TEXT, anchor="lm")

    # legend
    lx = margin
    for fill, label in legend:
        draw.rectangle((lx, legend_y, lx + 13, legend_y + 13), fill=fill, outline=GRID)
        draw.text((lx + 19, legend_y + 7), label, font=small, fill=TEXT, anchor="lm")
        lx += 18 + text_w(label, small) + 16
    return image, geometry


def heatmap_png(history: dict[str, Any], quantity: str) -> bytes:
    """The heatmap of ``quantity`` ("gradient" or "activation") as PNG bytes."""
    image, _ = heatmap_image(history, quantity)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()
