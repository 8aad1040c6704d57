"""The layer x step heatmap (gradscope.render.heatmap): the PNG decoded with Pillow,
the bad layer's row and the bad step's column marked on the right pixels."""

from __future__ import annotations

import io
import math

import pytest
from PIL import Image

from gradscope.render.heatmap import _ANCHORS, MISSING, NONFINITE, colour, heatmap_image, heatmap_png

BAD_LAYER, BAD_COLUMN = 5, 23


def history(layers: int = 8, columns: int = 40, bad: list[list[int]] | None = None) -> dict:
    """∂ℓ/∂h RMS falls one decade per 4 layers; a blow-up from BAD_COLUMN in the deep layers."""
    grid = [
        [-1.0 - i / 4 + (3.0 if j >= BAD_COLUMN and i >= BAD_LAYER else 0.0) for j in range(columns)]
        for i in range(layers)
    ]
    grid[1][3] = None  # not measured
    return {
        "steps": [10 * j for j in range(columns)],
        "layers": [f"blocks.{i}.fc" for i in range(layers)],
        "gradient_rms_log10": grid,
        "activation_rms_log10": [[0.0] * columns for _ in range(layers)],
        "nonfinite": {"gradient": bad if bad is not None else [[BAD_LAYER, BAD_COLUMN]], "activation": []},
        "loss": [1.0] * columns,
        "grad_norm": [1.0] * columns,
        "clip_threshold": None,
    }


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.convert("RGB")


def pixels_of(image: Image.Image, rgb: tuple[int, int, int], box: tuple[int, int, int, int]) -> int:
    x0, y0, x1, y1 = box
    return sum(1 for x in range(x0, x1) for y in range(y0, y1) if image.getpixel((x, y)) == rgb)


def reddish(image: Image.Image, box: tuple[int, int, int, int]) -> int:
    """Pixels of red text (anti-aliased: red dominant, not exactly NONFINITE)."""
    x0, y0, x1, y1 = box
    count = 0
    for x in range(x0, x1):
        for y in range(y0, y1):
            r, g, b = image.getpixel((x, y))
            count += r > 150 and g < 130 and b < 130 and r - g > 80
    return count


def test_bad_cell_is_red_exactly_where_its_row_and_column_are() -> None:
    h = history()
    image = decoded(heatmap_png(h, "gradient"))
    _, geo = heatmap_image(h, "gradient")
    assert (geo.rows, geo.columns) == (8, 40)
    # the bad cell is filled red, whole
    x0, y0, x1, y1 = geo.cell_box(BAD_LAYER, BAD_COLUMN)
    assert pixels_of(image, NONFINITE, (x0, y0, x1, y1)) == (x1 - x0) * (y1 - y0)
    # and it is the only red inside the plot area
    plot = (geo.x0, geo.y0, geo.x0 + geo.columns * geo.cell_w, geo.y0 + geo.rows * geo.row_h)
    assert pixels_of(image, NONFINITE, plot) == (x1 - x0) * (y1 - y0)
    # the bad layer's name, left of its row, is written in red (no other row's is)
    for row in range(geo.rows):
        _, ry0, _, ry1 = geo.cell_box(row, 0)
        red = reddish(image, (0, ry0, geo.x0 - 2, ry1))
        assert (red > 20) == (row == BAD_LAYER), row
    # the first-bad-step marker sits above the bad column
    above = [
        x for x in range(image.width) for y in range(geo.y0 - 12, geo.y0 - 2) if image.getpixel((x, y)) == NONFINITE
    ]
    marker_centre = (x0 + x1) / 2
    assert above and min(abs(x - marker_centre) for x in above) <= 1
    assert min(above) >= marker_centre - 6  # the triangle starts at the column, the label runs away from it


def test_missing_cell_is_blank_and_colours_follow_the_decades() -> None:
    h = history()
    image, geo = heatmap_image(h, "gradient")
    x0, y0, x1, y1 = geo.cell_box(1, 3)
    assert image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == MISSING
    # the scale spans the data's decades
    values = [v for row in h["gradient_rms_log10"] for v in row if v is not None]
    assert geo.vmin == math.floor(min(values)) and geo.vmax == math.ceil(max(values))

    def luminance(row: int, column: int) -> float:
        bx0, by0, bx1, by1 = geo.cell_box(row, column)
        r, g, b = image.getpixel(((bx0 + bx1) // 2, (by0 + by1) // 2))
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    # deeper layers have smaller RMS before the blow-up: darker; after it, brighter
    assert luminance(0, 0) > luminance(4, 0) > luminance(7, 0)
    assert luminance(7, 30) > luminance(4, 30)


def test_nonfinite_colour_is_outside_the_scale() -> None:
    def distance(a: tuple[int, ...], b: tuple[int, ...]) -> float:
        return math.dist(a, b)

    scale = [colour(k / 100) for k in range(101)]
    assert min(distance(c, NONFINITE) for c in scale) > 120
    assert min(distance(c, MISSING) for c in scale) > 60
    assert colour(0.0) == _ANCHORS[0][1] and colour(1.0) == _ANCHORS[-1][1]


def test_large_run_stays_legible_and_bounded() -> None:
    # 150 layers x 240 columns (a GPT-2-sized watch at the history's bound)
    bad = [[137, 200], [138, 201]]
    h = history(layers=150, columns=240, bad=bad)
    image, geo = heatmap_image(h, "gradient")
    # about TensorBoard's image card (~350-450 px) so its 16 px text stays readable there
    assert image.width <= 560 and image.height <= 700
    # 240 columns pooled pairwise to 120 drawn columns of >= 2 px; rows >= 3 px
    assert geo.pool == 2 and geo.columns == 120 and geo.cell_w >= 2 and geo.row_h >= 3
    for i, j in bad:
        x0, y0, x1, y1 = geo.cell_box(i, geo.column(j))
        assert image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == NONFINITE
    # pooling keeps the worst: the blow-up from BAD_COLUMN (+3 decades) is in the pooled column
    x0, y0, x1, y1 = geo.cell_box(60, geo.column(BAD_COLUMN))
    xa, ya, xb, yb = geo.cell_box(60, geo.column(BAD_COLUMN) - 1)
    assert image.getpixel((x0, y0)) != image.getpixel((xa, ya))
    # rows too thin to label each: the bad ones are still labelled (red text left of them)
    _, ry0, _, ry1 = geo.cell_box(137, 0)
    _, _, _, ry1b = geo.cell_box(138, 0)
    assert reddish(image, (0, ry0 - 6, geo.x0 - 8, ry1b + 6)) > 20


def test_activation_quantity_and_unknown_quantity() -> None:
    h = history()
    h["nonfinite"]["activation"] = [[2, 7]]
    image, geo = heatmap_image(h, "activation")
    x0, y0, x1, y1 = geo.cell_box(2, 7)
    assert image.getpixel((x0, y0)) == NONFINITE
    with pytest.raises(ValueError, match="quantity"):
        heatmap_png(h, "weights")


def test_empty_history_renders_a_blank_plot() -> None:
    empty = {"steps": [], "layers": [], "gradient_rms_log10": [], "activation_rms_log10": [], "nonfinite": {}}
    image = decoded(heatmap_png(empty, "gradient"))
    assert image.width > 100 and image.height > 100
