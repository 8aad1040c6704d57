"""TensorBoard output: the tag list against a golden file (read back with TensorBoard's
event accumulator), the values behind the tags, the custom-scalars layout written
once, write_audit, rank-0-only writing."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from gradscope.record import LayerRecord, Record
from gradscope.stats import Stats, tensor_stats
from gradscope.tensorboard import DashboardWriter, exponent_histogram, layout, write_audit
from gradscope.watching import Scope

GOLDEN = Path(__file__).parent / "golden" / "tensorboard_tags.txt"


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


def accumulate(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def tag_lines(acc) -> list[str]:
    tags = acc.Tags()
    lines = []
    for kind in ("scalars", "histograms", "tensors", "images"):
        lines += [f"{kind} {tag}" for tag in tags.get(kind, [])]
    return sorted(lines)


def test_tag_list_matches_golden(tmp_path: Path) -> None:
    watched_run(tmp_path)
    lines = tag_lines(accumulate(tmp_path))
    if os.environ.get("GRADSCOPE_OVERWRITE_GOLDEN"):
        GOLDEN.write_text("\n".join(lines) + "\n")
    expected = GOLDEN.read_text().splitlines()
    if importlib.util.find_spec("matplotlib") is None:
        # the depth-profile image needs the optional `plot` extra; every other tag is written without it
        expected = [line for line in expected if not line.startswith("images ")]
    assert lines == expected


def test_scalar_values_and_points_per_step(tmp_path: Path) -> None:
    scope = watched_run(tmp_path)
    acc = accumulate(tmp_path)
    norms = acc.Scalars("gradscope/global_grad_norm")
    assert [e.step for e in norms] == list(range(12))
    ring = {s: n for r in scope.recent for s, n in r.global_norms}
    for event in norms:
        if event.step in ring:
            assert event.value == pytest.approx(ring[event.step], rel=1e-6)
    # one point per sampled step for per-layer scalars; values from the flush's record
    std = acc.Scalars("gradscope/activation_std/1")
    assert [e.step for e in std] == list(range(12))
    last = scope.recent[-1]
    assert std[-1].value == pytest.approx(last.record.layer("1").activation.std, rel=1e-6)
    # update ratios: tiny lr -> ~1e-7 * |g| / |w|, far below 1e-4
    ratios = acc.Scalars("gradscope/update_ratio/0")
    assert len(ratios) == 12 and all(0 < e.value < 1e-4 for e in ratios)
    # the clip line is AutoClip's p10 at each flush: never above the median line
    clip = acc.Scalars("gradscope/clip_threshold")
    median = acc.Scalars("gradscope/clip_threshold_median")
    assert all(c.value <= m.value for c, m in zip(clip, median, strict=True))


def test_custom_scalars_layout_written_once(tmp_path: Path) -> None:
    watched_run(tmp_path)
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (events,) = tmp_path.glob("events.out.tfevents.*")
    configs = [
        v for e in EventFileLoader(str(events)).Load() for v in e.summary.value if v.tag == "custom_scalars__config__"
    ]
    assert len(configs) == 1
    from tensorboard.plugins.custom_scalar import layout_pb2

    parsed = layout_pb2.Layout()
    parsed.ParseFromString(configs[0].tensor.string_val[0])
    (category,) = parsed.category
    assert category.title == "gradscope"
    titles = [chart.title for chart in category.chart]
    assert titles == list(layout(("fp16",))["gradscope"])
    global_chart = next(c for c in category.chart if c.title.startswith("global gradient norm"))
    assert "^gradscope/clip_threshold$" in global_chart.multiline.tag


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
    acc = accumulate(tmp_path)
    scalars = {tag: acc.Scalars(tag)[0].value for tag in acc.Tags()["scalars"]}
    # overflow over activation and gradient values together: 10 of 200
    assert scalars["gradscope/fp16_overflow_frac/fc"] == pytest.approx(10 / 200)
    assert scalars["gradscope/fp16_underflow_frac/fc"] == pytest.approx(0.25)
    assert scalars["gradscope/fp16_headroom/fc"] == pytest.approx(math.log2(65504 / 1e5), rel=1e-6)
    assert "gradscope/findings/text_summary" in acc.Tags()["tensors"]


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
    acc = accumulate(tmp_path)
    history = scope.report().analysis["regularisation"]["validation"]["history"]
    assert [e["step"] for e in history] == [4, 8, 12]
    validation = acc.Scalars("gradscope/validation_loss")
    assert [e.step for e in validation] == [4, 8, 12]
    for event, evaluation in zip(validation, history, strict=True):
        assert event.value == pytest.approx(evaluation["loss"], rel=1e-6)
    # gap = validation loss - mean training loss of the 4 steps before the evaluation
    losses = dict(acc.Scalars("gradscope/loss") and [(e.step, e.value) for e in acc.Scalars("gradscope/loss")])
    gaps = acc.Scalars("gradscope/train_validation_gap")
    for event in gaps:
        train = sum(losses[t] for t in range(event.step - 4, event.step)) / 4
        val = next(e.value for e in validation if e.step == event.step)
        assert event.value == pytest.approx(val - train, rel=1e-5, abs=1e-6)
    charts = layout(("fp16",))["gradscope"]
    assert charts["train vs validation loss"][1] == ["^gradscope/loss$", "^gradscope/validation_loss$"]
    assert charts["train/validation gap"][1] == ["^gradscope/train_validation_gap$"]
