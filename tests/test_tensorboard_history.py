"""The bounded layer x step history of a watched run (gradscope.watching.history):
values against closed form, the column bound, and the merge semantics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gradscope.record import LayerRecord, Record
from gradscope.stats import Stats, tensor_stats
from gradscope.watching.history import LOG10_FLOOR, MAX_COLUMNS, RunHistory


def stats_of(values: torch.Tensor) -> Stats:
    return Stats(tensor_stats(values))


def record(grad_rms: dict[str, float], act_rms: dict[str, float] | None = None, bad: set[str] = frozenset()) -> Record:
    """A record whose layers (in the given order) have ∂ℓ/∂h and activations of the given
    RMS (constant tensors: RMS = |value|); layers in ``bad`` get one NaN in ∂ℓ/∂h."""
    layers = []
    for index, (name, rms) in enumerate(grad_rms.items()):
        layer = LayerRecord(name=name, module=name, type="Linear", index=index)
        grad = torch.full((64,), rms)
        if name in bad:
            grad[0] = math.nan
        act = torch.full((64,), (act_rms or {}).get(name, 1.0))
        layer.stats = {"gradient": stats_of(grad), "activation": stats_of(act)}
        layers.append(layer)
    return Record(layers=layers)


def test_cells_are_log10_rms_in_forward_order() -> None:
    history = RunHistory()
    history.add_flush(0, record({"b": 1e-3, "a": 10.0}, {"b": 0.5, "a": 2.0}), [(0, 3.0)], [(0, 1.5)])
    out = history.to_dict()
    assert out["layers"] == ["b", "a"]  # forward index order, not alphabetical
    assert out["steps"] == [0]
    assert out["gradient_rms_log10"][0][0] == pytest.approx(-3.0, abs=1e-6)
    assert out["gradient_rms_log10"][1][0] == pytest.approx(1.0, abs=1e-6)
    assert out["activation_rms_log10"][0][0] == pytest.approx(math.log10(0.5), abs=1e-6)
    assert out["loss"] == [1.5] and out["grad_norm"] == [3.0]
    assert out["nonfinite"] == {"gradient": [], "activation": []}


def test_a_nonfinite_element_marks_the_cell_instead_of_a_value() -> None:
    history = RunHistory()
    history.add_flush(0, record({"a": 1.0, "b": 100.0}, bad={"b"}))
    out = history.to_dict()
    # the NaN makes b's moments non-finite: no value, the cell is marked instead
    assert out["gradient_rms_log10"][1][0] is None
    assert out["gradient_rms_log10"][0][0] == pytest.approx(0.0, abs=1e-6)
    assert out["nonfinite"]["gradient"] == [[1, 0]]
    assert out["nonfinite"]["activation"] == []


def test_zero_rms_is_drawn_at_the_floor_not_left_missing() -> None:
    history = RunHistory()
    history.add_flush(0, record({"dead": 0.0}))
    assert history.to_dict()["gradient_rms_log10"] == [[LOG10_FLOOR]]


def test_missing_layer_is_none_and_late_layers_join() -> None:
    history = RunHistory()
    history.add_flush(0, record({"a": 1.0}))
    history.add_flush(1, record({"a": 1.0, "b": 1.0}))
    out = history.to_dict()
    assert out["layers"] == ["a", "b"]
    assert out["gradient_rms_log10"][1] == [None, pytest.approx(0.0)]


def test_columns_stay_bounded_and_evenly_spaced_after_many_steps() -> None:
    history = RunHistory()
    one = record({"a": 1.0})
    for step in range(5000):
        history.add_flush(step, one, [(step, 1.0)], [(step, 1.0)])
        assert len(history.columns) <= MAX_COLUMNS
    out = history.to_dict()
    steps = out["steps"]
    assert MAX_COLUMNS // 2 <= len(steps) <= MAX_COLUMNS
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert steps[-1] == 4999
    # every column but the last covers the same number of flushes (the stride)
    widths = [c.flushes for c in history.columns]
    assert set(widths[:-1]) == {history.stride} and widths[-1] <= history.stride
    assert sum(widths) == 5000
    # 5000 flushes in at most 240 columns: a stride of 32 (5000/32 = 157 columns)
    assert history.stride == 32 and len(steps) == math.ceil(5000 / 32)
    assert len(out["gradient_rms_log10"][0]) == len(steps) == len(out["loss"]) == len(out["grad_norm"])


def test_merge_keeps_the_worst_value_the_nonfinite_cell_and_the_later_loss() -> None:
    history = RunHistory(max_columns=4)
    spike_step, bad_step = 5, 9
    for step in range(16):
        grad = {"a": 1e4 if step == spike_step else 1.0, "b": 1.0}
        loss = math.nan if step == bad_step else float(step)
        norm = 50.0 if step == spike_step else (math.inf if step == bad_step else 1.0)
        history.add_flush(step, record(grad, bad={"b"} if step == bad_step else set()), [(step, norm)], [(step, loss)])
    out = history.to_dict()
    # 16 flushes in 4 columns of 4: steps (..3], (3..7], (7..11], (11..15]
    assert out["steps"] == [3, 7, 11, 15]
    # max of log10 RMS: the one-flush spike of "a" at step 5 survives two halvings
    assert out["gradient_rms_log10"][0] == [
        pytest.approx(0.0),
        pytest.approx(4.0),
        pytest.approx(0.0),
        pytest.approx(0.0),
    ]
    # OR of non-finite: the NaN of b at step 9 marks the column covering step 9 only
    assert out["nonfinite"]["gradient"] == [[1, 2]]
    # loss: the later step's value, None where a merged loss was non-finite
    assert out["loss"] == [3.0, 7.0, None, 15.0]
    # global norm: the largest, None where one was non-finite
    assert out["grad_norm"] == [1.0, 50.0, None, 1.0]
    json.dumps(out, allow_nan=False)  # strict JSON: no NaN/inf slipped through


def test_first_bad_flush_is_reported_once() -> None:
    history = RunHistory()
    assert history.add_flush(0, record({"a": 1.0})) is False
    assert history.add_flush(1, record({"a": 1.0}), [(1, math.inf)]) is True
    assert history.add_flush(2, record({"a": 1.0}, bad={"a"})) is False
    assert history.first_bad_step == 1


def test_marks_from_unsampled_steps_land_in_the_covering_column() -> None:
    history = RunHistory()
    history.add_flush(0, record({"a": 1.0, "b": 1.0}))
    # the per-step check finds b's ∂ℓ/∂h non-finite at unsampled step 3; the next flush is at 4
    assert history.mark_nonfinite(3, "b", "gradient") is True
    assert history.to_dict()["nonfinite"]["gradient"] == [[1, 1]]  # a column of its own until then
    history.add_flush(4, record({"a": 1.0, "b": 1.0}), [(s, 1.0) for s in range(1, 5)])
    out = history.to_dict()
    assert out["steps"] == [0, 4]
    assert out["nonfinite"]["gradient"] == [[1, 1]]
    # an activation mark inside an existing column lands there; a repeat is not "first"
    assert history.mark_nonfinite(2, "a", "activation") is False
    assert history.to_dict()["nonfinite"]["activation"] == [[0, 1]]
    assert history.first_bad_step == 2


def test_clip_threshold_is_the_last_one_given() -> None:
    history = RunHistory()
    history.add_flush(0, record({"a": 1.0}), clip={"threshold": 2.5})
    history.add_flush(1, record({"a": 1.0}), clip=None)
    assert history.to_dict()["clip_threshold"] == 2.5


def test_to_dict_has_exactly_the_shared_shape() -> None:
    history = RunHistory()
    history.add_flush(0, record({"a": 1.0}))
    assert set(history.to_dict()) == {
        "steps",
        "layers",
        "gradient_rms_log10",
        "activation_rms_log10",
        "nonfinite",
        "loss",
        "grad_norm",
        "clip_threshold",
    }
