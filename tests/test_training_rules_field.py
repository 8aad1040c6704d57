"""Training rules from field trials (/tmp/field_watch):

* parameters that become trainable after watch starts (a backbone unfrozen mid-run, a
  head added with ``add_module`` + ``add_param_group``) are in the every-step global
  norm and the per-step non-finite check (``gradscope.watching.step_norms``): the norm
  was 7-24% below ``clip_grad_norm_``'s and a NaN in the unfrozen weight's gradient was
  stopped a step late, after its update;
* a layer a param group holds but that the step does not update (requires_grad False,
  or no ``.grad``: torch's optimizers skip it) is no updated layer for ``update-ratio``
  nor for ``learning-rate-too-high`` (``gradscope.optimizers.layer_learning_rates``,
  ``gradscope.learning_rate``): linear probing got "barely learn" for its frozen
  backbone, and 3 frozen side layers (ratio 0) hid a divergence from the median;
* ``learning-rate-too-high`` reads every step's loss and norm of a flush, not the last
  one (``gradscope.learning_rate.Divergence``): the same finding at any ``every``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import gradscope
from gradscope.errors import GradscopeError
from gradscope.learning_rate import LOSS_GROWTH, LearningRateMonitor
from gradscope.optimizers import layer_learning_rates
from gradscope.report import Finding


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logger = logging.getLogger("gradscope")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


def regression(step: int, n_in: int = 16, n_out: int = 4, rows: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(rows, n_in, generator=g), torch.randn(rows, n_out, generator=g)


def train_step(model: nn.Module, opt: Any, scope: Any, step: int) -> None:
    """One watched MSE step on ``regression(step)``, scope.step before optimizer.step."""
    x, y = regression(step)
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    scope.step(opt, loss=loss)
    opt.step()


def clip_norm(model: nn.Module) -> float:
    """``clip_grad_norm_``'s total norm over every parameter with a gradient (inf: no clipping)."""
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf))


def watched_norms(scope: Any) -> dict[int, float]:
    """Step -> the watch's global gradient norm, from every flush kept."""
    return {step: norm for flush in scope.recent for step, norm in flush.global_norms}


def lr_findings(scope: Any) -> list[Finding]:
    return [f for f in scope.report().findings if f.code == "learning-rate-too-high"]


# -- 1. parameters that become trainable after watch starts ---------------------------


def probe(seed: int = 0) -> tuple[nn.Linear, nn.Sequential]:
    """(backbone, model): 16 -> 64 (frozen) -> ReLU -> 4, every parameter in the optimizer."""
    torch.manual_seed(seed)
    backbone = nn.Linear(16, 64)
    model = nn.Sequential(backbone, nn.ReLU(), nn.Linear(64, 4))
    backbone.requires_grad_(False)
    return backbone, model


@pytest.mark.parametrize("every", [1, 3])
def test_a_backbone_unfrozen_mid_run_is_in_every_steps_global_norm(every: int) -> None:
    """Unfrozen at step 2: from then on the watch's norm is clip_grad_norm_'s (it left the
    backbone out, 0.92056 vs 0.98890), at sampled and unsampled steps alike."""
    backbone, model = probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    hand, head_only = [], []
    with gradscope.watch(model, every=every, raise_on=()) as scope:
        for step in range(7):
            if step == 2:
                backbone.requires_grad_(True)
            x, y = regression(step)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            hand.append(clip_norm(model))
            head_only.append(float(torch.nn.utils.get_total_norm([p.grad for p in model[2].parameters()])))
            scope.step(opt, loss=loss)
            opt.step()
    seen = watched_norms(scope)
    assert sorted(seen) == list(range(7))
    for step, expected in enumerate(hand):
        # float32 sums of squares in another order than torch's: 1e-6 relative
        assert seen[step] == pytest.approx(expected, rel=1e-5), step
    # the backbone's share is material: without it the norm is > 3% lower
    assert all(hand[s] > 1.03 * head_only[s] for s in range(2, 7))


@pytest.mark.parametrize("every", [1, 4])
def test_a_nan_in_an_unfrozen_weights_gradient_stops_at_its_step_before_the_update(every: int) -> None:
    """The NaN is only in the unfrozen backbone's weight gradient (step 3): stopped at
    step 3, before optimizer.step() (the weights stay finite); it was found at step 4 in
    the weights the NaN update had made."""
    backbone, model = probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    steps_done = []
    with pytest.raises(GradscopeError) as caught:
        with gradscope.watch(model, every=every) as scope:
            for step in range(6):
                if step == 2:
                    backbone.requires_grad_(True)
                if step == 3:
                    backbone.weight.register_hook(lambda g: g * math.nan)
                train_step(model, opt, scope, step)
                steps_done.append(step)
    assert str(caught.value).startswith("step 3: ")
    assert caught.value.record.get("step") == 3 and caught.value.record.get("layer") == "0"
    assert steps_done == [0, 1, 2]
    assert bool(torch.isfinite(backbone.weight).all())


class TwoHeads(nn.Module):
    """6 -> 16 (tanh) -> 3, and a second head once ``head2`` is added (multi-task)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 16)
        self.head = nn.Linear(16, 3)

    def add_second_head(self, opt: torch.optim.Optimizer) -> None:
        """A head added mid-run, and its parameters to the optimizer (a new task)."""
        self.add_module("head2", nn.Linear(16, 3))
        opt.add_param_group({"params": self.head2.parameters()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        out = self.head(h)
        if hasattr(self, "head2"):
            out = out + self.head2(h)
        return out


@pytest.mark.parametrize("every", [1, 3])
def test_a_head_added_mid_run_joins_the_global_norm_at_the_next_flush(every: int) -> None:
    """add_module + add_param_group at step 2: from the next sampled step on the watch's
    norm is clip_grad_norm_'s (it stayed 22-24% low for the rest of the run)."""
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hand = []
    with gradscope.watch(model, every=every) as scope:
        for step in range(7):
            if step == 2:
                model.add_second_head(opt)
            x, y = regression(step, 6, 3, 8)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            hand.append(clip_norm(model))
            scope.step(opt, loss=loss)
            opt.step()
    seen = watched_norms(scope)
    first_flush = -(-2 // every) * every  # the first sampled step at or after step 2
    for step in range(first_flush, 7):
        assert seen[step] == pytest.approx(hand[step], rel=1e-5), step


def test_the_parameter_list_is_scanned_only_after_a_registration_and_its_hooks_leave_with_the_scope(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A scan walks every module: at every=1 it ran each step.  Now torch's global
    registration hooks mark a change, the sampled step after it scans once, and the
    hooks are gone when the scope closes (no process-wide leftover)."""
    from torch.nn.modules import module as modules

    from gradscope.watching.step_norms import StepNorms

    scans: list[int] = []
    original = StepNorms.rescan

    def counted(self: StepNorms) -> Any:
        scans.append(len(scans))
        return original(self)

    monkeypatch.setattr(StepNorms, "rescan", counted)
    before = (len(modules._global_parameter_registration_hooks), len(modules._global_module_registration_hooks))
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradscope.watch(model, every=1) as scope:
        assert len(modules._global_parameter_registration_hooks) == before[0] + 1
        for step in range(8):
            if step == 5:
                model.add_second_head(opt)
            x, y = regression(step, 6, 3, 8)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            scope.step(opt)
            opt.step()
    assert len(scans) == 2  # the first step, and the step after the registration
    after = (len(modules._global_parameter_registration_hooks), len(modules._global_module_registration_hooks))
    assert after == before


# -- 2. frozen layers held by the optimizer ---------------------------------------------


def test_learning_rates_are_of_the_layers_the_step_updates() -> None:
    """A param group holds three weights: one with a gradient (updated), one frozen, one
    that requires a gradient but got none this step (an expert no token was routed to):
    torch's optimizers skip the last two, so only the first has a learning rate."""
    trained, frozen, unused = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    frozen.requires_grad_(False)
    opt = torch.optim.Adam([*trained.parameters(), *frozen.parameters(), *unused.parameters()], lr=3e-4)
    trained(torch.ones(1, 2)).sum().backward()
    weights = {"trained": trained.weight, "frozen": frozen.weight, "unused": unused.weight}
    assert layer_learning_rates(opt, weights) == {"trained": (3e-4, None)}
    monitor = LearningRateMonitor()
    assert monitor.observe_optimizer(0, opt, weights, {n: "Linear" for n in weights}) == {"trained"}


def test_frozen_layers_held_by_the_optimizer_leave_the_median_update_ratio() -> None:
    """Two updated layers at 0.3 and 0.5, three held but frozen (ratio 0): the median of the
    updated layers is 0.4 (>= 0.1), with the loss 3x its minimum: learning-rate-too-high.
    Counting the frozen ones made the median 0 and hid it."""
    layers = {n: nn.Linear(2, 2) for n in ("a", "b", "f0", "f1", "f2")}
    for n in ("f0", "f1", "f2"):
        layers[n].requires_grad_(False)
    for n in ("a", "b"):
        layers[n](torch.ones(1, 2)).sum().backward()
    opt = torch.optim.SGD([p for layer in layers.values() for p in layer.parameters()], lr=0.5)
    monitor = LearningRateMonitor()
    weights = {n: layer.weight for n, layer in layers.items()}
    monitor.observe_optimizer(0, opt, weights, {n: "Linear" for n in weights})
    ratios = {0: {"a": 0.3, "b": 0.5, "f0": 0.0, "f1": 0.0, "f2": 0.0}}
    found = monitor.observe(1, ratios, [(0, 1.0), (1, 2.0)], [(0, 1.0), (1, 3.0)])
    (finding,) = [f for f in found if f.code == "learning-rate-too-high"]
    assert finding.evidence["median_update_ratio"] == pytest.approx(0.4, abs=1e-12)
    assert finding.evidence["loss_growth"] == pytest.approx(3.0, abs=1e-12)
    # the frozen layers are not samples of the update-ratio rule either
    assert [monitor.layers[n].samples for n in ("a", "b", "f0", "f1", "f2")] == [1, 1, 0, 0, 0]


def probing_run(make_opt: Callable[..., torch.optim.Optimizer]) -> Any:
    """Linear probing: Linear(16, 64) x3 frozen, the 4-way head trained, every parameter
    handed to the optimizer; 12 sampled steps (the patience of update-ratio is 10)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    for layer in list(model)[:6]:
        layer.requires_grad_(False)
    opt = make_opt(model.parameters())
    with gradscope.watch(model, every=1) as scope:
        for step in range(12):
            train_step(model, opt, scope, step)
    return scope.report()


@pytest.mark.parametrize(
    "make_opt",
    [lambda p: torch.optim.Adam(p, lr=1e-3), lambda p: torch.optim.SGD(p, lr=0.05)],
    ids=["Adam", "SGD"],
)
def test_linear_probing_gets_no_update_ratio_finding_for_its_frozen_backbone(make_opt: Any) -> None:
    """The frozen layers were judged at ratio 0 with the group's lr: "barely learn"."""
    report = probing_run(make_opt)
    assert "update-ratio" not in report.codes()
    per_layer = report.analysis["training"]["update_ratio"]
    assert per_layer["6"]["samples"] >= 10  # the head is judged
    assert all(per_layer[n]["samples"] == 0 for n in ("0", "2", "4") if n in per_layer)


class SideBranch(nn.Module):
    """A wide MLP at SGD lr 0.01 (loss 0.78 -> ~1800 in 12 steps) plus ``frozen`` frozen
    Linear layers on a side branch that adds 0 to the output."""

    def __init__(self, frozen: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 4096)
        self.b = nn.Linear(4096, 2)
        self.side = nn.ModuleList([nn.Linear(16, 16) for _ in range(frozen)]).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.b(torch.relu(self.a(x)))
        for layer in self.side:
            out = out + 0.0 * layer(x).sum()
        return out


def side_branch_run(frozen: int) -> tuple[list[Finding], list[Finding]]:
    """(learning-rate-too-high findings, update-ratio findings) of 12 steps."""
    model = SideBranch(frozen)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, every=1, raise_on=()) as scope:
        for step in range(12):
            x, y = regression(step, 16, 2, 8)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            scope.step(opt, loss=loss)
            opt.step()
    findings = scope.report().findings
    return lr_findings(scope), [f for f in findings if f.code == "update-ratio"]


def test_frozen_side_layers_held_by_the_optimizer_do_not_hide_a_divergence() -> None:
    """With 3 frozen side layers the run gets the finding the same run without them gets,
    with the same median (they changed no number of the run), and they are not listed."""
    bare, _ = side_branch_run(0)
    with_side, ratio = side_branch_run(3)
    assert len(bare) == 1 and len(with_side) == 1
    assert with_side[0].evidence["step"] == bare[0].evidence["step"]
    assert with_side[0].evidence["median_update_ratio"] == pytest.approx(
        bare[0].evidence["median_update_ratio"], rel=1e-6
    )
    assert not any(n.startswith("side") for f in ratio for n in f.layers)


# -- 3. learning-rate-too-high at any every --------------------------------------------


def test_divergence_reads_the_worst_step_of_a_flush_against_the_minimum_up_to_it() -> None:
    """Losses 4, 1, 3 in one flush: step 3 is 3x the minimum up to it (1, step 2); step 1's
    4 is no growth (nothing lower before it).  The last step alone said 3 here; a loss
    that jumped and came back (1, 8, 1.5) is 8x at step 2, where the last step said 1.5x."""
    monitor = LearningRateMonitor()
    d = monitor.divergence
    d.observe([(1, 2.0), (2, 1.0), (3, 5.0)], [(1, 4.0), (2, 1.0), (3, 3.0)])
    assert d.loss_growth() == pytest.approx(3.0, abs=1e-12)
    assert d.norm_growth() == pytest.approx(5.0, abs=1e-12)
    d.observe([(4, 1.0), (5, 30.0), (6, 1.0)], [(4, 1.0), (5, 8.0), (6, 1.5)])
    assert d.loss_growth() == pytest.approx(8.0, abs=1e-12)
    assert d.norm_growth() == pytest.approx(30.0, abs=1e-12)
    assert d.loss_peak == (5, pytest.approx(8.0)) and d.norm_peak == (5, pytest.approx(30.0))
    d.observe([], [])  # a flush without new steps (at close) keeps the last flush's peaks
    assert d.loss_growth() == pytest.approx(8.0, abs=1e-12)
    d.observe([(7, 1.0)], [(7, math.nan)])
    assert d.loss_growth() == math.inf and d.norm_growth() == pytest.approx(1.0, abs=1e-12)


def adam_far_too_high(every: int) -> tuple[list[Finding], list[float]]:
    """Adam lr 0.1 on a 16-64-64-4 MLP: the loss jumps 7x at step 1 and is back by step 4."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    losses = []
    with gradscope.watch(model, every=every, raise_on=()) as scope:
        for step in range(20):
            g = torch.Generator().manual_seed(step)
            x = torch.randn(64, 16, generator=g)
            y = torch.sin(x[:, :4]) + 0.1 * torch.randn(64, 4, generator=g)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            losses.append(float(loss.detach()))
            scope.step(opt, loss=loss)
            opt.step()
    return lr_findings(scope), losses


def test_learning_rate_too_high_is_the_same_finding_at_every_rate() -> None:
    """every = 1, 2, 5, 10: the run is the same, and so is the finding: the loss growth of
    step 1 (its loss over step 0's, by hand from the host losses), the median ratio of
    step 0 (Adam's first step: ~lr/rms(w)); named at the first flush after step 1.
    At every=5 and 10 the last loss of the flush (0.45, back at its minimum) hid it."""
    seen = {}
    for every in (1, 2, 5, 10):
        findings, losses = adam_far_too_high(every)
        assert len(findings) == 1, every
        seen[every] = findings[0].evidence
        growth = losses[1] / losses[0]
        assert growth >= LOSS_GROWTH and max(losses[1:4]) == losses[1]
        assert seen[every]["loss_growth"] == pytest.approx(growth, rel=1e-6)
    for every, evidence in seen.items():
        assert evidence["step"] == every  # the first flush after step 1 (step 1 itself at every=1)
        assert evidence["loss_growth_step"] == 1 and evidence["median_update_ratio_step"] == 0
    medians = [seen[e]["median_update_ratio"] for e in seen]
    assert max(medians) == pytest.approx(min(medians), rel=1e-6) and min(medians) >= 0.1
