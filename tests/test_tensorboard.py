"""TensorBoard output: every run's tags and the custom-scalars layout against a golden file
(read back with TensorBoard's event multiplexer), the values behind the tags, the
bounded worst-layer series, the heatmaps (drawn off the training thread, at the first
bad step, marking the bad cell), write_audit, rank-0-only writing."""

from __future__ import annotations

import io
import json
import math
import os
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from gradscope.dashboards import charts as ch
from gradscope.record import LayerRecord, Record
from gradscope.render.heatmap import NONFINITE, heatmap_image
from gradscope.stats import Stats, tensor_stats
from gradscope.tensorboard import DashboardWriter, exponent_histogram, layout, write_audit
from gradscope.watching import Scope

GOLDEN = Path(__file__).parent / "golden" / "tensorboard_tags.json"


def watched_run(logdir: Path, steps: int = 12) -> Scope:
    """A deterministic run: a tiny lr so an update-ratio alert fires at step 10."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1e-7)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    xv, yv = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    with Scope(model, every=1, log_dir=str(logdir), raise_on=(), diagnose=False, on_finding=lambda f: None) as scope:
        for step in range(steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            scope.step(opt, loss=loss)
            opt.step()
            if step % 4 == 3:  # a held-out evaluation every 4 steps
                model.eval()
                with torch.no_grad(), scope.paused():
                    scope.validation(nn.functional.mse_loss(model(xv), yv))
                model.train()
    return scope


def multiplexer(logdir: Path):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    guidance = {"scalars": 0, "histograms": 0, "tensors": 0, "images": 0}
    mux = EventMultiplexer(size_guidance=guidance)
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    return mux


def run_tags(mux) -> dict[str, dict[str, list[str]]]:
    """run -> kind -> sorted tags, for the kinds gradscope writes."""
    out = {}
    for run, tags in sorted(mux.Runs().items()):
        kinds = {kind: sorted(tags.get(kind, [])) for kind in ("scalars", "histograms", "tensors", "images")}
        out[run] = {kind: names for kind, names in kinds.items() if names}
    return out


def written_layout(logdir: Path) -> list[dict]:
    """The custom-scalars layout as TensorBoard reads it back: categories, charts, regexes."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2

    (events,) = logdir.glob("events.out.tfevents.*")
    configs = [
        v for e in EventFileLoader(str(events)).Load() for v in e.summary.value if v.tag == "custom_scalars__config__"
    ]
    assert len(configs) == 1  # add_custom_scalars may be called only once per writer
    parsed = layout_pb2.Layout()
    parsed.ParseFromString(configs[0].tensor.string_val[0])
    return [
        {
            "category": c.title,
            "charts": [{"title": chart.title, "tags": list(chart.multiline.tag)} for chart in c.chart],
        }
        for c in parsed.category
    ]


def test_tags_and_layout_match_golden(tmp_path: Path) -> None:
    watched_run(tmp_path)
    actual = {"runs": run_tags(multiplexer(tmp_path)), "layout": written_layout(tmp_path)}
    if os.environ.get("GRADSCOPE_OVERWRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(actual, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    expected = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert actual["layout"] == expected["layout"]
    assert actual["runs"] == expected["runs"]


def test_layout_puts_training_first_and_the_heatmaps_lead_the_images(tmp_path: Path) -> None:
    watched_run(tmp_path)
    categories = written_layout(tmp_path)
    first = categories[0]
    assert first["category"].startswith("1 · training")
    assert [c["tags"] for c in first["charts"]] == [[f"^{ch.LOSS}$"], [f"^{ch.GRAD_NORM}$"]]
    tags = run_tags(multiplexer(tmp_path))
    assert tags["."]["images"] == sorted([ch.HEATMAP_GRADIENT, ch.HEATMAP_ACTIVATION])
    # the Scalars tab groups tags by their first path component: numbered by question
    groups = {tag.split("/")[0] for run in tags.values() for tag in run.get("scalars", [])}
    assert groups == {ch.TRAINING, ch.GRADIENTS, ch.ACTIVATIONS, ch.range_group("fp16"), ch.UPDATES, ch.WEIGHTS}


def test_scalar_values_and_points_per_step(tmp_path: Path) -> None:
    scope = watched_run(tmp_path)
    mux = multiplexer(tmp_path)
    norms = mux.Scalars(ch.TRAINING_RUN, ch.GRAD_NORM)
    assert [e.step for e in norms] == list(range(12))
    ring = {s: n for r in scope.recent for s, n in r.global_norms}
    for event in norms:
        if event.step in ring:
            assert event.value == pytest.approx(math.log10(ring[event.step]), abs=1e-6)
    # per-layer: one point per sampled step in the layer's slot run, log10 of the record's value
    last = scope.recent[-1]
    found = {
        run: tag
        for run in ch.SLOT_RUNS
        for tag in mux.Runs().get(run, {}).get("scalars", [])
        if tag == f"{ch.ACT_STD}/1"
    }
    (run,) = found
    std = mux.Scalars(run, f"{ch.ACT_STD}/1")
    assert [e.step for e in std] == list(range(12))
    assert std[-1].value == pytest.approx(math.log10(last.record.layer("1").activation.std), abs=1e-5)
    # update ratios: tiny lr -> ~1e-7 * |g| / |w|, far below 1e-4: log10 < -4
    ratio_runs = [r for r in ch.SLOT_RUNS if f"{ch.UPDATE_RATIO}/0" in mux.Runs().get(r, {}).get("scalars", [])]
    ratios = mux.Scalars(ratio_runs[0], f"{ch.UPDATE_RATIO}/0")
    assert len(ratios) == 12 and all(e.value < -4 for e in ratios)
    reference = mux.Scalars(ch.REFERENCE_RUN, f"{ch.UPDATE_RATIO}/{ch.REFERENCE_SERIES}")
    assert {e.value for e in reference} == {-3.0}
    # the clip line is AutoClip's p10 at each flush: never above the median line
    clip = mux.Scalars(ch.CLIP_RUN, ch.GRAD_NORM)
    median = mux.Scalars(ch.CLIP_MEDIAN_RUN, ch.GRAD_NORM)
    assert clip and all(c.value <= m.value for c, m in zip(clip, median, strict=True))


def test_per_layer_charts_name_at_most_five_layers_and_the_worst(tmp_path: Path) -> None:
    """A 12-layer stack whose layer 7 is scaled x1000: every ∂ℓ/∂h series written is one of
    at most 5 named layers or the median, and layer 7's output std is named."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(12):
        linear = nn.Linear(8, 8)
        if i == 7:
            with torch.no_grad():
                linear.weight.mul_(1000.0)
        layers.append(linear)
    model = nn.Sequential(*layers)
    x = torch.randn(4, 8)
    with Scope(model, log_dir=str(tmp_path), raise_on=(), diagnose=False, on_finding=lambda f: None) as scope:
        for _ in range(3):
            loss = model(x).pow(2).mean()
            loss.backward()
            scope.step(loss=loss)
            model.zero_grad()
    tags = run_tags(multiplexer(tmp_path))
    for chart in (ch.GRAD_RMS, ch.ACT_STD, ch.WEIGHT_GRAD, ch.headroom_tag("fp16")):
        series = [t for run in ch.SLOT_RUNS for t in tags.get(run, {}).get("scalars", []) if t.startswith(chart + "/")]
        assert 1 <= len(series) <= ch.WORST_SERIES, (chart, series)
        assert tags[ch.MEDIAN_RUN]["scalars"].count(f"{chart}/{ch.MEDIAN_SERIES}") == 1
    named_std = [t for run in ch.SLOT_RUNS for t in tags.get(run, {}).get("scalars", []) if t.startswith(ch.ACT_STD)]
    assert f"{ch.ACT_STD}/7" in named_std


def nan_at_step_run(logdir: Path, bad_step: int = 5, steps: int = 8) -> Scope:
    """Layer "2"'s weight gets an inf before the forward of ``bad_step``: its output is
    the first non-finite activation; the run goes on (raise_on=())."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(16, 4)
    with Scope(model, log_dir=str(logdir), raise_on=(), diagnose=False, on_finding=lambda f: None) as scope:
        for step in range(steps):
            if step == bad_step:
                with torch.no_grad():
                    model[2].weight[0, 0] = math.inf
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            scope.step(opt, loss=loss)
            opt.step()
    return scope


def test_first_bad_step_heatmap_is_drawn_off_thread_and_marks_the_bad_cell(tmp_path: Path) -> None:
    scope = nan_at_step_run(tmp_path, bad_step=5)
    heatmaps = scope._writer.heatmaps
    # drawn at the first step (the cadence's first slot), at the bad step (forced), at close
    assert heatmaps.drawn[0] == 0 and 5 in heatmaps.drawn and heatmaps.drawn[-1] == 7
    assert heatmaps.draw_threads and threading.get_ident() not in heatmaps.draw_threads
    assert not heatmaps.alive and not [t for t in threading.enumerate() if t.name == "gradscope-heatmaps"]
    history = scope.report().run["history"]
    row = history["layers"].index("2")
    column = history["steps"].index(5)
    assert [row, column] in history["nonfinite"]["activation"]
    # the image written at step 5 shows the history up to step 5, with layer 2's cell red
    images = multiplexer(tmp_path).Images(".", ch.HEATMAP_ACTIVATION)
    at_bad = next(e for e in images if e.step == 5)
    image = Image.open(io.BytesIO(at_bad.encoded_image_string)).convert("RGB")
    upto = {
        **history,
        "steps": history["steps"][: column + 1],
        "activation_rms_log10": [r[: column + 1] for r in history["activation_rms_log10"]],
        "nonfinite": {q: [c for c in cells if c[1] <= column] for q, cells in history["nonfinite"].items()},
    }
    expected, geometry = heatmap_image(upto, "activation")
    assert image.size == expected.size
    x0, y0, x1, y1 = geometry.cell_box(row, geometry.column(column))
    assert image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == NONFINITE
    # the rows before layer 2 are finite at that step
    xa, ya, xb, yb = geometry.cell_box(0, geometry.column(column))
    assert image.getpixel(((xa + xb) // 2, (ya + yb) // 2)) != NONFINITE


def test_custom_scalars_layout_written_once(tmp_path: Path) -> None:
    watched_run(tmp_path)
    categories = written_layout(tmp_path)
    assert [c["category"] for c in categories] == list(layout(("fp16",)))
    global_chart = next(c for c in categories[0]["charts"] if c["title"].startswith("global gradient norm"))
    assert global_chart["tags"] == [f"^{ch.GRAD_NORM}$"]


def test_exponent_histogram_counts_binades() -> None:
    x = torch.tensor([0.0, 0.75, 1.0, 1.5, 3.0, -3.5, 8.0, float("nan")])
    hist = exponent_histogram(Stats(tensor_stats(x)))
    # floor(log2|x|): 0.75 -> -1; 1, 1.5 -> 0; 3, 3.5 -> 1; 8 -> 3. Zero and NaN excluded.
    assert hist["bucket_limits"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert hist["bucket_counts"] == [1.0, 2.0, 2.0, 0.0, 1.0]
    assert hist["num"] == 6 and hist["min"] == -1.0 and hist["max"] == 4.0
    assert hist["sum"] == -1 + 0 + 0 + 1 + 1 + 3
    assert hist["sum_squares"] == 1 + 0 + 0 + 1 + 1 + 9


def test_write_audit_and_fp16_scalars(tmp_path: Path) -> None:
    layer = LayerRecord(name="fc", module="fc", type="Linear", index=0)
    act = torch.full((100,), 1.0)
    act[:10] = 1e5  # 10% beyond fp16's max (65504)
    grad = torch.full((100,), 1e-3)
    grad[:25] = 1e-9  # 25% below fp16's smallest subnormal 2^-24 ~ 5.96e-8
    layer.stats = {"activation": Stats(tensor_stats(act)), "gradient": Stats(tensor_stats(grad))}
    from gradscope.report import Report

    report = Report(record=Record(layers=[layer]), run={"formats": ["fp16"]})
    write_audit(report, tmp_path)
    mux = multiplexer(tmp_path)
    slot = ch.SLOT_RUNS[0]  # the only layer is the worst of every chart
    scalars = {tag: mux.Scalars(slot, tag)[0].value for tag in mux.Runs()[slot]["scalars"]}
    # overflow over activation and gradient values together: 10 of 200
    assert scalars[f"{ch.overflow_tag('fp16')}/fc"] == pytest.approx(10 / 200)
    assert scalars[f"{ch.underflow_tag('fp16')}/fc"] == pytest.approx(0.25)
    assert scalars[f"{ch.headroom_tag('fp16')}/fc"] == pytest.approx(math.log2(65504 / 1e5), rel=1e-6)
    assert scalars[f"{ch.GRAD_RMS}/fc"] == pytest.approx(math.log10(grad.pow(2).mean().sqrt().item()), abs=1e-5)
    assert "gradscope/findings/text_summary" in mux.Runs()["."]["tensors"]
    # headroom is negative here (overflow): the reference line at 0 is drawn with it
    reference = mux.Scalars(ch.REFERENCE_RUN, f"{ch.headroom_tag('fp16')}/{ch.REFERENCE_SERIES}")
    assert [e.value for e in reference] == [0.0]


def test_only_rank_zero_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    writer = DashboardWriter.for_rank_zero(tmp_path / "rank1")
    assert not writer.enabled
    writer.close()
    assert not (tmp_path / "rank1").exists()
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    writer = DashboardWriter.for_rank_zero(tmp_path / "rank0")
    assert writer.enabled
    writer.close()
    assert list((tmp_path / "rank0").glob("events.out.tfevents.*"))


def test_validation_loss_and_gap_scalars(tmp_path: Path) -> None:
    scope = watched_run(tmp_path)
    mux = multiplexer(tmp_path)
    history = scope.report().analysis["regularisation"]["validation"]["history"]
    assert [e["step"] for e in history] == [4, 8, 12]
    # the validation loss is the loss chart's second run: its own colour
    validation = mux.Scalars(ch.VALIDATION_RUN, ch.LOSS)
    assert [e.step for e in validation] == [4, 8, 12]
    for event, evaluation in zip(validation, history, strict=True):
        assert event.value == pytest.approx(evaluation["loss"], rel=1e-6)
    # gap = validation loss - mean training loss of the 4 steps before the evaluation
    losses = {e.step: e.value for e in mux.Scalars(ch.TRAINING_RUN, ch.LOSS)}
    gaps = mux.Scalars(ch.TRAINING_RUN, ch.GAP)
    assert gaps
    for event in gaps:
        train = sum(losses[t] for t in range(event.step - 4, event.step)) / 4
        val = next(e.value for e in validation if e.step == event.step)
        assert event.value == pytest.approx(val - train, rel=1e-5, abs=1e-6)
