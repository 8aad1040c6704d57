"""The dashboards' pieces: the layout (one tag per chart, question order), the per-chart
choice of the worst layers (bounded, sticky, named), and the heatmap thread (off the
training thread, bounded cadence, joined at close, never raising)."""

from __future__ import annotations

import io
import math
import re
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from gradscope.dashboards import charts as ch
from gradscope.dashboards.heatmaps import HeatmapWorker
from gradscope.dashboards.runs import run_directory
from gradscope.dashboards.selection import WorstSeries
from gradscope.render.heatmap import NONFINITE, heatmap_image


def test_layout_puts_training_first_and_gives_each_chart_one_exact_tag() -> None:
    layout = ch.layout(("fp16", "bf16"))
    categories = list(layout)
    assert categories[0].startswith("1 · training")
    assert [c.split(" ")[0] for c in categories] == ["1", "2", "3", "4", "4", "5", "6"]
    first = list(layout[categories[0]])
    assert first == ["loss (training, validation)", "global gradient norm, log10, and the AutoClip clip threshold"]
    tags = [chart.tag for chart in ch.charts(("fp16", "bf16"))]
    assert len(tags) == len(set(tags))
    # what each chart's series are written as: the tag itself, or <tag>/<layer>, /median of all
    written = {
        c.tag: [c.series_tag("blocks.3"), c.series_tag(ch.MEDIAN_SERIES)] if c.per_series else [c.tag]
        for c in ch.charts(("fp16", "bf16"))
    }
    for chart in ch.charts(("fp16", "bf16")):
        kind, regexes = layout[chart.category][chart.title]
        assert kind == "Multiline" and len(regexes) == 1
        # the regex matches its own series and no other chart's
        matched = [t for series in written.values() for t in series if re.search(regexes[0], t)]
        assert matched == written[chart.tag]
        assert "(" not in "".join(written[chart.tag])  # TensorBoard parses "tag (run)" greedily
    # overflow and underflow are separate charts; log-scale quantities say log10 in the tag
    assert ch.overflow_tag("fp16") != ch.underflow_tag("fp16")
    for tag in (ch.GRAD_NORM, ch.GRAD_RMS, ch.WEIGHT_GRAD, ch.ACT_STD, ch.UPDATE_RATIO, ch.WEIGHT_NORM):
        assert tag.endswith("_log10")
    assert ch.headroom_tag("fp16").endswith("_binades")


def test_worst_series_names_at_most_the_limit_and_the_worst() -> None:
    chart = next(c for c in ch.charts() if c.tag == ch.GRAD_RMS)
    pick = WorstSeries(chart, limit=3)
    values = {f"l{i}": -2.0 for i in range(20)}
    values["l7"] = 3.0  # 5 decades above the median
    values["l12"] = -9.0  # 7 decades below
    values["l3"] = math.nan  # non-finite: the worst of all
    named, median = pick.choose(values)
    assert median == -2.0
    assert named == ["l3", "l12", "l7"]


def test_worst_series_keep_their_lines_unless_a_newcomer_is_worse_by_the_margin() -> None:
    chart = next(c for c in ch.charts() if c.tag == ch.GRAD_RMS)  # margin: one decade
    pick = WorstSeries(chart, limit=2)
    base = {f"l{i}": 0.0 for i in range(10)}
    pick.choose({**base, "l1": 3.0, "l2": 2.0})
    # l5 is now a little worse than l2 (half a decade): no flapping
    named, _ = pick.choose({**base, "l1": 3.0, "l2": 2.0, "l5": 2.5})
    assert named == ["l1", "l2"]
    # l5 two decades worse than l2: it takes l2's place
    named, _ = pick.choose({**base, "l1": 3.0, "l2": 2.0, "l5": 4.5})
    assert sorted(named) == ["l1", "l5"] and len(pick.named) == 2


def test_headroom_ranks_the_lowest_and_update_ratio_the_farthest_from_1e_3() -> None:
    headroom = next(c for c in ch.charts() if c.tag == ch.headroom_tag("fp16"))
    named, _ = WorstSeries(headroom, 1).choose({"a": 10.0, "b": -1.0, "c": 4.0})
    assert named == ["b"]
    ratio = next(c for c in ch.charts() if c.tag == ch.UPDATE_RATIO)
    named, _ = WorstSeries(ratio, 1).choose({"a": -3.2, "b": -7.0, "c": -1.5})
    assert named == ["b"]


def test_run_directories_stay_inside_the_log_directory() -> None:
    assert run_directory("layer/features.0") == "layer/features.0"
    assert run_directory("layer/relu#2") == "layer/relu#2"
    assert ".." not in run_directory("layer/..").split("/")
    assert run_directory("layer/a/b") == "layer/a/b"  # a sub-directory, never outside


def bad_history(bad_layer: int = 2, bad_column: int = 6) -> dict:
    layers, columns = 4, 10
    return {
        "steps": list(range(columns)),
        "layers": [f"fc{i}" for i in range(layers)],
        "gradient_rms_log10": [[-float(i)] * columns for i in range(layers)],
        "activation_rms_log10": [[0.0] * columns for _ in range(layers)],
        "nonfinite": {"gradient": [[bad_layer, bad_column]], "activation": []},
        "loss": [1.0] * columns,
        "grad_norm": [1.0] * columns,
        "clip_threshold": None,
    }


class Sink:
    def __init__(self) -> None:
        self.images: list[tuple[str, bytes, int, int, int, int]] = []

    def __call__(self, tag: str, png: bytes, width: int, height: int, step: int) -> None:
        self.images.append((tag, png, width, height, step, threading.get_ident()))


def test_heatmaps_are_drawn_on_another_thread_and_joined_at_close() -> None:
    sink = Sink()
    worker = HeatmapWorker(sink, {"gradient": "g", "activation": "a"})
    assert worker.request(bad_history(), step=6, force=True)
    worker.close()
    assert not worker.alive
    assert [img[0] for img in sink.images] == ["g", "a"]
    assert all(img[5] != threading.get_ident() for img in sink.images)  # never the caller's thread
    assert worker.draw_threads and threading.get_ident() not in worker.draw_threads
    # the drawn gradient heatmap marks the bad cell at its pixels
    _, geometry = heatmap_image(bad_history(), "gradient")
    image = Image.open(io.BytesIO(sink.images[0][1])).convert("RGB")
    x0, y0, x1, y1 = geometry.cell_box(2, 6)
    assert image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == NONFINITE
    assert (sink.images[0][2], sink.images[0][3]) == image.size
    assert not [t for t in threading.enumerate() if t.name == "gradscope-heatmaps"]


def test_cadence_is_bounded_and_forced_requests_always_pass() -> None:
    now = [0.0]
    worker = HeatmapWorker(Sink(), {"gradient": "g"}, budget=0.02, min_interval=5.0, clock=lambda: now[0])
    try:
        assert worker.request(bad_history(), 0)
        now[0] = 1.0
        assert not worker.due() and not worker.request(bad_history(), 1)
        assert worker.request(bad_history(), 1, force=True)  # the first bad step
        worker.last_seconds = 0.5  # a drawing of 0.5 s: next one no sooner than 0.5 / 2% = 25 s later
        now[0] = 7.0
        assert not worker.due()
        now[0] = 26.5
        assert worker.due()
    finally:
        worker.close()
    assert not worker.due(force=True)  # closed: nothing more is accepted


def test_a_stale_request_is_replaced_and_the_caller_never_waits() -> None:
    release = threading.Event()
    drawn_steps: list[int] = []

    def slow_sink(tag: str, png: bytes, width: int, height: int, step: int) -> None:
        release.wait(10)
        drawn_steps.append(step)

    worker = HeatmapWorker(slow_sink, {"gradient": "g"})
    worker.request(bad_history(), 0, force=True)
    time.sleep(0.5)  # the worker is now stuck in the first drawing
    start = time.perf_counter()
    for step in (1, 2, 3):
        worker.request(bad_history(), step, force=True)
    assert time.perf_counter() - start < 0.5  # handing over never waits for the drawing
    release.set()
    worker.close()
    assert drawn_steps == [0, 3]  # steps 1 and 2 were stale when the worker got to them


def test_a_failing_drawing_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: object) -> None:
        raise OSError("disk full")

    worker = HeatmapWorker(broken, {"gradient": "g"})
    worker.request(bad_history(), 0, force=True)
    worker.close()
    assert worker.drawn == []
    assert any("drawing the heatmap failed" in r.message and "disk full" in r.message for r in caplog.records)


def test_runs_get_their_own_directories(tmp_path: Path) -> None:
    from gradscope.dashboards.runs import RunWriters

    runs = RunWriters(tmp_path)
    runs.scalar("layer/fc1", ch.GRAD_RMS, -2.0, 0)
    runs.scalar(ch.MEDIAN_RUN, ch.GRAD_RMS, -1.0, 0)
    runs.close()
    assert list((tmp_path / "layer" / "fc1").glob("events.out.tfevents.*"))
    assert list((tmp_path / ch.MEDIAN_RUN).glob("events.out.tfevents.*"))


def test_equally_bad_series_keep_forward_order_despite_float_rounding() -> None:
    """Two weights equally far from their median differ in the last bits of a float
    (the median's rounding): that is a tie, so the earlier layer is named first,
    whatever the rounding (the golden dashboard test depended on it)."""
    chart = next(c for c in ch.charts() if c.tag == ch.WEIGHT_NORM)  # badness: distance from the median
    pairs = []
    for i in range(1, 200):
        a, b = 0.1 * i + 0.0123, -0.37 * i
        m = (a + b) / 2
        if abs(b - m) > abs(a - m):  # the later one looks worse by rounding alone
            pairs.append((a, b))
    assert pairs  # rounding does make such pairs
    for a, b in pairs[:20]:
        named, _ = WorstSeries(chart, limit=1).choose({"first": a, "second": b})
        assert named == ["first"], (a, b)


def test_the_same_steps_at_the_same_step_are_drawn_once() -> None:
    """A run whose first bad step was its last drew its heatmaps twice at that step
    (once as the first bad step, once at close): image steps [0, 5, 5]."""
    sink = Sink()
    worker = HeatmapWorker(sink, {"gradient": "g"})
    history = bad_history()
    assert worker.request(history, 5, force=True)
    deadline = time.monotonic() + 30
    while not worker.drawn and time.monotonic() < deadline:  # the first drawing is done
        time.sleep(0.01)
    assert worker.request(history, 5, force=True)  # accepted, nothing new to draw
    worker.close()
    assert [img[4] for img in sink.images] == [5]
