"""The late read of a watched run's flushes (issue 14 item 4), run on the CPU.

On CUDA a flush only launches its device side (packing, a non-blocking copy into
pinned memory, an event) and its host side runs one flush later.  The CPU
reads at once by default; ``scope.read_late = True`` runs the very code CUDA
runs (``gradscope.host_copy`` only skips the event, which on the CPU has
always landed).  What must hold: the final report equals the immediate read's,
alerts and errors of flush N come later but carry step N, close() loses
nothing, a flush is one host read and its launch reads nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradscope.host_copy
import gradscope.watching.scope as scope_module
from gradscope.errors import GradscopeError
from gradscope.report import Finding
from gradscope.watching.options import DIAGNOSE_EVERY_STEPS
from gradscope.watching.scope import Scope
from tests.test_no_sync import host_sync_forbidden

SPIKE_STEP = 25  # not on the diagnosis cadence (a flush of its own, not a full one)
assert SPIKE_STEP % DIAGNOSE_EVERY_STEPS != 0


def _model() -> nn.Module:
    """A real small network with a vanishing-gradient diagnosis (sigmoids, tiny init)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(12, 12), nn.Sigmoid()]
    layers.append(nn.Linear(12, 3))
    model = nn.Sequential(*layers)
    for module in model:
        if isinstance(module, nn.Linear) and module.out_features == 12:
            nn.init.normal_(module.weight, std=0.05)
    return model


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(16, 12, generator=g), torch.randn(16, 3, generator=g)


def _train(
    scope: Scope,
    model: nn.Module,
    steps: int,
    *,
    spike_at: int | None = None,
    after_step: Callable[[int], None] | None = None,
) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        x, y = _batch(step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if step == spike_at:
            loss = loss * 1000.0  # the global gradient norm jumps 1000x
        loss.backward()
        scope.step(opt, loss=loss.detach())
        opt.step()
        if after_step is not None:
            after_step(step)


def _run(late: bool, every: int, steps: int, **kwargs: Any) -> tuple[dict[str, Any], list[tuple[int, Finding]]]:
    """The run's final report (as JSON) and each alert with the step() count when it came."""
    model = _model()
    alerts: list[tuple[int, Finding]] = []
    scope = Scope(model, every=every, raise_on=(), on_finding=lambda f: alerts.append((scope.steps, f)))
    scope.read_late = late
    _train(scope, model, steps, **kwargs)
    report = scope.close()
    return json.loads(json.dumps(report.to_dict())), alerts


@pytest.mark.parametrize("every", [1, 4])
def test_the_final_report_equals_the_immediate_read(every: int) -> None:
    immediate, _ = _run(False, every, 34, spike_at=SPIKE_STEP - SPIKE_STEP % every)
    late, _ = _run(True, every, 34, spike_at=SPIKE_STEP - SPIKE_STEP % every)
    codes = {f["code"] for f in immediate["findings"]}
    assert {"gradient-spike", "vanishing-gradient"} <= codes  # the runs have something to report
    assert late["findings"] == immediate["findings"]
    assert late["run"] == immediate["run"]
    assert late["layers"] == immediate["layers"]  # every layer's merged statistics, bit for bit
    assert late["summary"] == immediate["summary"] and late["analysis"] == immediate["analysis"]
    assert late == immediate


def test_alerts_of_a_flush_come_at_the_next_step_with_their_own_step() -> None:
    _, immediate = _run(False, 1, 30, spike_at=SPIKE_STEP)
    _, late = _run(True, 1, 30, spike_at=SPIKE_STEP)
    spike_now = [(seen, f) for seen, f in immediate if f.code == "gradient-spike"]
    spike_late = [(seen, f) for seen, f in late if f.code == "gradient-spike"]
    # scope.steps counts step() calls already finished: the alert of step 25 comes
    # inside step() 25 when read at once, inside step() 26 when read late.
    assert [seen for seen, _ in spike_now] == [SPIKE_STEP]
    assert [seen for seen, _ in spike_late] == [SPIKE_STEP + 1]
    assert spike_late[0][1].evidence["step"] == SPIKE_STEP == spike_now[0][1].evidence["step"]
    assert spike_late[0][1].message == spike_now[0][1].message
    # The diagnosis runs on full flushes, read late too: one step() later.
    vanishing_now = [seen for seen, f in immediate if f.code == "vanishing-gradient"]
    vanishing_late = [seen for seen, f in late if f.code == "vanishing-gradient"]
    assert vanishing_now == [0] and vanishing_late == [1]


def test_raise_on_raises_at_the_next_step_naming_the_spike_step() -> None:
    model = _model()
    scope = Scope(model, every=1, raise_on=("gradient-spike",), on_finding=lambda f: None)
    scope.read_late = True
    reached: list[int] = []
    with pytest.raises(GradscopeError) as info:
        _train(scope, model, 40, spike_at=SPIKE_STEP, after_step=reached.append)
    scope.close(raise_pending=False)
    assert reached[-1] == SPIKE_STEP  # step 25 returned; step() 26 raised
    message = str(info.value)
    assert message.startswith(f"step {SPIKE_STEP}: the global gradient norm jumped")
    assert f"found at step {SPIKE_STEP}, read one flush late" in message and f"by step {SPIKE_STEP + 1}" in message
    assert info.value.record["code"] == "gradient-spike" and info.value.record["evidence"]["step"] == SPIKE_STEP


def test_close_reads_the_flush_still_in_flight() -> None:
    model = _model()
    scope = Scope(model, every=1, raise_on=(), on_finding=lambda f: None)
    scope.read_late = True
    _train(scope, model, 3)
    assert scope._pending_flush is not None and scope._pending_flush.step == 2
    assert [result.step for result in scope.recent] == [0, 1]  # step 2 not read yet
    report = scope.close()
    assert scope._pending_flush is None
    assert [result.step for result in scope.recent] == [0, 1, 2]
    assert report.run["steps"] == 3
    assert report.record.steps == 3  # three sampled steps merged into the run's statistics
    history = report.run["history"]
    assert history["steps"] == [0, 1, 2] and len(history["grad_norm"]) == 3
    assert report.analysis["training"]["global_grad_norm_last"] == pytest.approx(history["grad_norm"][2])


def test_report_and_pause_read_the_flush_in_flight() -> None:
    model = _model()
    scope = Scope(model, every=1, raise_on=(), on_finding=lambda f: None)
    scope.read_late = True
    _train(scope, model, 2)
    assert scope._pending_flush is not None
    assert scope.report().record.steps == 2  # what close() would say now: step 1 included
    assert scope._pending_flush is None
    _train(scope, model, 1)
    with scope.paused():
        assert scope._pending_flush is None and scope.recent[-1].step == 2
    scope.close()


def test_one_host_read_per_flush_and_none_while_launching(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    copies: list[int] = []
    real_copy = gradscope.host_copy.copy_to_host

    def counted(vector: torch.Tensor, buffers: gradscope.host_copy.HostBuffers) -> gradscope.host_copy.HostCopy:
        copies.append(vector.numel())
        return real_copy(vector, buffers)

    real_launch = scope_module.launch
    launches: list[int] = []

    def guarded_launch(scope: Scope, step: int, **kwargs: Any) -> Any:
        launches.append(step)
        with host_sync_forbidden(monkeypatch):  # .item(), .tolist(), .cpu(), .numpy(), bool(tensor) raise
            return real_launch(scope, step, **kwargs)

    monkeypatch.setattr(gradscope.host_copy, "copy_to_host", counted)
    monkeypatch.setattr(scope_module, "launch", guarded_launch)
    scope = Scope(model, every=2, raise_on=(), on_finding=lambda f: None)
    scope.read_late = True
    _train(scope, model, 12)
    scope.close()
    assert launches == [0, 2, 4, 6, 8, 10, 11]  # six sampled steps and the last flush, at close
    assert len(copies) == len(launches)  # one transfer each: statistics, norms, losses, flags together
    assert min(copies[:-1]) > 13 * 12 * 2  # sampled steps: the statistics rows travel in it too


def test_the_host_buffer_is_reused_and_read_as_a_clone() -> None:
    buffers = gradscope.host_copy.HostBuffers()
    first = buffers.take(torch.device("cpu"), 10)
    second = buffers.take(torch.device("cpu"), 700)
    assert first.data_ptr() == second.data_ptr()  # preallocated (1024 elements), reused
    grown = buffers.take(torch.device("cpu"), 5000)
    assert grown.numel() == 5000 and grown.data_ptr() != first.data_ptr()
    copy = gradscope.host_copy.copy_to_host(torch.arange(4.0), buffers)
    assert copy.ready() and copy.wait().tolist() == [0.0, 1.0, 2.0, 3.0]


def test_a_nan_read_late_names_its_step_and_what_was_not_measured() -> None:
    class NanAt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return x * float("nan") if self.calls == 4 else x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), NanAt(), nn.Tanh(), nn.Linear(12, 3))
    scope = Scope(model, every=1, diagnose=False, on_finding=lambda f: None)
    scope.read_late = True
    reached: list[int] = []
    with pytest.raises(GradscopeError) as info:
        _train(scope, model, 8, after_step=reached.append)
    scope.close(raise_pending=False)
    record = info.value.record
    assert reached[-1] == 3  # the NaN of step 3 stops training at step() 4
    assert record["step"] == 3 and record["layer"] == "1" and record["role"] == "activation"
    assert "one flush late" in record["read"] and "weights were not measured" in record["read"]
    assert "by step 4" in str(info.value)


@pytest.fixture
def copies_never_land(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device far behind the host: no copy has landed until someone waits for it."""
    monkeypatch.setattr(gradscope.host_copy.HostCopy, "ready", lambda self: False)


@pytest.mark.usefixtures("copies_never_land")
def test_a_copy_not_landed_is_read_at_the_next_flush() -> None:
    # every=4: full flushes (read at once) at 0, 12, 24, 36; step 28 is sampled, not full.
    _, immediate = _run(False, 4, 40, spike_at=28)
    _, late = _run(True, 4, 40, spike_at=28)
    assert [seen for seen, f in immediate if f.code == "gradient-spike"] == [28]
    # Not at step() 29..31 (the copy "has not landed"): at the next flush, step() 32, which waits.
    assert [seen for seen, f in late if f.code == "gradient-spike"] == [32]


@pytest.mark.usefixtures("copies_never_land")
def test_a_nonfinite_step_between_flushes_reads_the_earlier_flush_first() -> None:
    """The per-step check finds a NaN at unsampled step 6 while the flush of step 4
    is still in flight: the NaN is alerted at its own step, the flush is read
    before it, and the run's report is the immediate read's."""

    def run(late: bool) -> tuple[dict[str, Any], list[tuple[int, str]]]:
        model = _model()
        seen: list[tuple[int, str]] = []
        scope = Scope(model, every=4, raise_on=(), on_finding=lambda f: seen.append((scope.steps, f.code)))
        scope.read_late = late
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(16):
            x, y = _batch(step)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            scope.step(opt, loss=loss.detach() * float("nan") if step == 6 else loss.detach())
            opt.step()
        report = scope.close()
        return json.loads(json.dumps(report.to_dict())), seen

    immediate, seen_now = run(False)
    late, seen_late = run(True)
    assert ("nonfinite" in {f["code"] for f in immediate["findings"]}) and (6, "nonfinite") in seen_now
    assert (6, "nonfinite") in seen_late  # found by the per-step check at its own step, in both modes
    assert late == immediate


def test_a_validation_sees_the_training_loss_of_the_flush_in_flight() -> None:
    def run(late: bool) -> list[dict[str, Any]]:
        model = _model()
        scope = Scope(model, every=1, raise_on=(), on_finding=lambda f: None)
        scope.read_late = late
        evaluations: list[dict[str, Any]] = []

        def evaluate(step: int) -> None:
            if step % 3 == 2:
                evaluations.append(scope.validation(1.0 + 0.01 * step))

        _train(scope, model, 9, after_step=evaluate)
        scope.close()
        return evaluations

    immediate, late = run(False), run(True)
    assert [e["train_loss"] for e in immediate] == [e["train_loss"] for e in late]
    assert all(e["train_loss"] is not None for e in late)  # step 2's loss, read late, counted at its evaluation
    assert late == immediate


def test_a_full_flush_is_read_late_with_its_own_weights() -> None:
    """A flush on the diagnosis cadence is only launched at its step (its weights
    measurement reduced on the device and packed with it; launches run with host
    reads forbidden in test_one_host_read_per_flush_and_none_while_launching), read
    at the next step(), and reports the weights of its own step, not those of the
    step that read it."""
    model = _model()
    scope = Scope(model, every=1, raise_on=(), on_finding=lambda f: None)
    scope.read_late = True
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # the last layer's weight: the one the updates move most in this (vanishing) model
    name, weight = [(n, p) for n, p in model.named_parameters() if p.dim() == 2][-1]
    before: dict[int, float] = {}
    last = 2 * DIAGNOSE_EVERY_STEPS
    for step in range(last + 2):
        x, y = _batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        before[step] = float(weight.detach().double().norm())
        scope.step(opt)
        if step == last:
            assert scope._pending_flush is not None and scope._pending_flush.step == last
            assert scope._pending_flush.weights is not None  # launched with its weights, not read yet
        opt.step()
    report = scope.close()
    trajectory = {int(s): n for s, n in report.analysis["regularisation"]["weights"][name]["trajectory"]}
    assert sorted(trajectory) == [0, DIAGNOSE_EVERY_STEPS, last]
    for step, norm in trajectory.items():
        assert norm == pytest.approx(before[step], rel=1e-6), step
        assert abs(norm - before[step + 1]) > 1e-5 * norm  # not the weights of the step that read it
