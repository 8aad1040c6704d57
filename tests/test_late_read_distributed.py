"""The late read under torch.distributed: 2 gloo ranks on the CPU, DDP.

With ``read_late`` a flush issues its packed all-reduces asynchronously and is
read at the next flush (or close), a point every rank reaches together.  The
report every rank ends with must equal the immediate read's, and the ranks
must agree with each other.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_distributed import in_gloo_group, run_ranks
from torch import nn

import gradscope

pytestmark = pytest.mark.slow

WORLD = 2
STEPS = 24
SPIKE_STEP = 21  # a sampled step with every=1 and every=3, off the diagnosis cadence


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Sigmoid(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def _rows(step: int, rank: int) -> torch.Tensor:
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(300 + step))
    return x[rank * 8 : (rank + 1) * 8]


def _watched(rank: int, every: int, late: bool) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_model())
    alerts: list[list[Any]] = []
    scope = gradscope.watch(model, every=every, raise_on=(), on_finding=lambda f: alerts.append([scope.steps, f.code]))
    scope.read_late = late
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    with scope:
        for step in range(STEPS):
            opt.zero_grad()
            loss = model(_rows(step, rank)).pow(2).mean()
            if step == SPIKE_STEP:
                loss = loss * 1.0e4  # the global gradient norm jumps 10,000x
            loss.backward()
            scope.step(opt, loss=loss.detach())
            opt.step()
        in_flight = scope._pending_flush is not None
    report = scope.report().to_dict()
    return {"report": report, "alerts": alerts, "in_flight_before_close": in_flight}


NAN_STEP = 5  # rank 1 alone sees a NaN loss here


def _nan_on_one_rank(rank: int, late: bool) -> dict[str, Any]:
    """raise_on nonfinite with a NaN loss only rank 1 sees: where every rank stops, with which record."""
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    reached = -1
    try:
        with gradscope.watch(model, every=1, on_finding=lambda f: None) as scope:
            scope.read_late = late
            for step in range(12):
                opt.zero_grad()
                loss = model(_rows(step, rank)).pow(2).mean()
                loss.backward()
                seen = loss.detach() * float("nan") if rank == 1 and step == NAN_STEP else loss.detach()
                scope.step(opt, loss=seen)
                opt.step()
                reached = step
    except gradscope.GradscopeError as error:
        return {"reached": reached, "record": error.record, "message": str(error)}
    return {"reached": reached, "record": None, "message": ""}


def _results(rank: int) -> dict[str, Any]:
    result: dict[str, Any] = {
        f"{every}-{late}": _watched(rank, every, late) for every in (1, 3) for late in (False, True)
    }
    result["nan"] = {str(late): _nan_on_one_rank(rank, late) for late in (False, True)}
    return result


def _worker(rank: int, port: int, out_dir: str) -> None:
    in_gloo_group(rank, port, out_dir, lambda: _results(rank))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    return run_ranks(_worker, (), tmp_path_factory.mktemp("late_ddp"), "late-read")


@pytest.mark.parametrize("every", [1, 3])
def test_late_read_under_ddp_equals_the_immediate_read_on_every_rank(
    ranks: dict[int, dict[str, Any]], every: int
) -> None:
    for rank in range(WORLD):
        immediate, late = ranks[rank][f"{every}-False"], ranks[rank][f"{every}-True"]
        assert late["in_flight_before_close"] and not immediate["in_flight_before_close"]
        codes = {f["code"] for f in immediate["report"]["findings"]}
        assert "gradient-spike" in codes
        assert late["report"]["findings"] == immediate["report"]["findings"]
        assert late["report"]["layers"] == immediate["report"]["layers"]
        assert late["report"]["run"] == immediate["report"]["run"]
        assert late["report"] == immediate["report"]
    # Every rank holds the same reduced numbers.
    assert ranks[0][f"{every}-True"]["report"]["layers"] == ranks[1][f"{every}-True"]["report"]["layers"]
    assert ranks[0][f"{every}-True"]["report"]["findings"] == ranks[1][f"{every}-True"]["report"]["findings"]


def test_under_ddp_a_late_alert_comes_at_the_next_flush(ranks: dict[int, dict[str, Any]]) -> None:
    # every=3: the spike of step 21 is read at the next flush, step() 24 -- here the
    # last step is 23, so at close (scope.steps == 24); read at once it comes in step() 21.
    for rank in range(WORLD):
        immediate = [seen for seen, code in ranks[rank]["3-False"]["alerts"] if code == "gradient-spike"]
        late = [seen for seen, code in ranks[rank]["3-True"]["alerts"] if code == "gradient-spike"]
        assert immediate == [SPIKE_STEP]
        assert late == [STEPS]
        immediate_1 = [seen for seen, code in ranks[rank]["1-False"]["alerts"] if code == "gradient-spike"]
        late_1 = [seen for seen, code in ranks[rank]["1-True"]["alerts"] if code == "gradient-spike"]
        assert immediate_1 == [SPIKE_STEP] and late_1 == [SPIKE_STEP + 1]


def test_under_ddp_a_nan_one_rank_sees_stops_every_rank_one_step_later_with_one_record(
    ranks: dict[int, dict[str, Any]],
) -> None:
    for rank in range(WORLD):
        immediate, late = ranks[rank]["nan"]["False"], ranks[rank]["nan"]["True"]
        # Read at once, every rank raises in step() 5; read late, in step() 6 (the next flush).
        assert immediate["reached"] == NAN_STEP - 1 and late["reached"] == NAN_STEP
        for outcome in (immediate, late):
            record = outcome["record"]
            assert record is not None and record["step"] == NAN_STEP and record["role"] == "loss"
        # The reduced loss is NaN on every rank: the same record as read at once, plus when it was read.
        assert {k: v for k, v in late["record"].items() if k != "read"} == immediate["record"]
        assert "one flush late" in late["record"]["read"] and "read" not in immediate["record"]
        assert f"found at step {NAN_STEP}, read one flush late" in late["message"]
    assert ranks[0]["nan"]["True"]["record"] == ranks[1]["nan"]["True"]["record"]
