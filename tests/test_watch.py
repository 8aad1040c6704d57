"""gradscope.watch: sampling, global norms, update ratios, loud non-finite failures,
GradScaler handling, gradient accumulation, rate-limited alerts, hook removal."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn
from watch_steps import NanInBackward, batch, blowup_model, train

import gradscope
from gradscope.errors import GradscopeError
from gradscope.stats import Stats, tensor_stats
from gradscope.watching import Scope
from gradscope.watching.alerts import AlertTracker
from gradscope.watching.scaling import divide_stats
from gradscope.watching.scope import DIAGNOSE_EVERY_STEPS


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def test_global_norm_every_step_and_layer_stats_on_sampled_steps() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    expected_norms = []
    expected_wgrad_norm0 = {}
    with Scope(model, every=3, raise_on=(), diagnose=False) as scope:
        for step in range(7):
            x, y = batch(step)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            grads = [p.grad for p in model.parameters()]
            expected_norms.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))))
            if step % 3 == 0:
                expected_wgrad_norm0[step] = float(model[0].weight.grad.double().norm())
            scope.step(opt, loss=loss)
            opt.step()
    flushes = {r.step: r for r in scope.recent}
    # Sampled steps 0, 3, 6; the close flushes nothing new (step 6 was the last).
    assert sorted(flushes) == [0, 3, 6]
    seen = [n for r in scope.recent for _, n in r.global_norms]
    assert [s for r in scope.recent for s, _ in r.global_norms] == list(range(7))
    assert seen == pytest.approx(expected_norms, rel=1e-5)
    for step, norm in expected_wgrad_norm0.items():
        # exact per-parameter norms on every sampled step
        assert flushes[step].param_grad_norms["0.weight"] == pytest.approx(norm, rel=1e-5)
    # Weight and weight-gradient statistics come with the diagnosis, at most every
    # DIAGNOSE_EVERY_STEPS steps: here at step 0 only (3 and 6 are too close).
    assert DIAGNOSE_EVERY_STEPS > 6
    wgrad = flushes[0].record.layer("0").weight_grad
    assert math.sqrt(wgrad.count) * wgrad.rms == pytest.approx(expected_wgrad_norm0[0], rel=1e-5)
    assert flushes[3].record.layer("0").weight_grad is None and flushes[6].record.layer("0").weight is None
    assert flushes[3].record.layer("0").activation is not None
    # the whole-run record merges 3 sampled steps of 8x16 activations
    report = scope.report()
    assert report.record.layer("1").activation.count == 3 * 8 * 16
    assert report.analysis["training"]["sampled_steps"] == 3
    assert no_hooks(model)


def test_unsampled_steps_do_not_sync_with_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync on an unsampled step")

    with Scope(model, every=4, raise_on=()) as scope:
        for step in range(9):
            x, y = batch(step)
            opt.zero_grad()
            sampled = step % 4 == 0
            with monkeypatch.context() as m:
                if not sampled:
                    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
                        m.setattr(torch.Tensor, name, forbidden)
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                scope.step(opt, loss=loss)
                opt.step()
    assert scope.report().analysis["training"]["steps"] == 9
    assert scope.report().analysis["training"]["sampled_steps"] == 3


def test_update_ratio_matches_sgd_closed_form() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)  # plain SGD: Δw = -lr * grad
    expected = {}
    with Scope(model, every=2, raise_on=(), diagnose=False) as scope:
        for step in range(5):
            x, y = batch(step)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if step % 2 == 0:
                w, g = model[0].weight.detach().double(), model[0].weight.grad.double()
                expected[step] = float(lr * g.norm() / w.norm())
            scope.step(opt)
            opt.step()
    got = {step: ratios["0"] for r in scope.recent for step, ratios in r.update_ratios.items()}
    assert sorted(got) == [0, 2, 4]
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_ratio_of_large_weights_is_the_sgd_ratio_on_their_sample(dtype: torch.dtype) -> None:
    """Weights above 2,048 elements are compared on a 1,024-element sample
    (update_ratio.weight_sample), copied for every layer at once before the
    step: the ratio is lr·‖g‖/‖w‖ over exactly those elements, for each layer,
    whatever the dtype (float64 takes the unfused path)."""
    from gradscope.watching.update_ratio import weight_sample

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(256, 64), nn.Tanh(), nn.Linear(64, 96)).to(dtype)
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    expected: dict[int, dict[str, float]] = {}
    with Scope(model, every=1, raise_on=(), diagnose=False) as scope:
        for step in range(3):
            x, y = torch.randn(32, 256, dtype=dtype), torch.randn(32, 96, dtype=dtype)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            expected[step] = {}
            for name in ("0", "2"):
                w, g = model[int(name)].weight.detach(), model[int(name)].weight.grad
                assert weight_sample(w).numel() == 1024  # the sampled path, not the whole weight
                ws, gs = weight_sample(w).double(), weight_sample(g).double()
                expected[step][name] = float(lr * gs.norm() / ws.norm())
            scope.step(opt)
            opt.step()
    got = {step: ratios for r in scope.recent for step, ratios in r.update_ratios.items()}
    assert sorted(got) == [0, 1, 2]
    for step, layers in expected.items():
        for name, value in layers.items():
            assert got[step][name] == pytest.approx(value, rel=1e-5), (step, name)


def test_update_ratio_finding_when_far_from_1e_3_for_long() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1e-7)  # ratio ~1e-7: far below 1e-4
    alerts = []
    with Scope(model, every=1, raise_on=(), diagnose=False, on_finding=alerts.append) as scope:
        for step in range(12):
            x, y = batch(step)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            scope.step(opt)
            opt.step()
    ratio_alerts = [a for a in alerts if a.code == "update-ratio"]
    assert len(ratio_alerts) == 1  # rate-limited: it persists, it alerts once
    finding = next(f for f in scope.report().findings if f.code == "update-ratio")
    assert finding.layers == ["0"]
    assert finding.evidence["update_ratio"] < 1e-4
    # the ratio of step k is resolved at step k+1, so step 0's arrives with step 1; "too small"
    # needs 10 samples (steps 0..9, judged at step 9), seen at the flush of step 10
    assert finding.evidence["first_step"] == 10
    assert finding.evidence["first_outside_step"] == 9
    assert finding.evidence["optimizer"] == "torch.optim.SGD"
    assert "torch.optim.SGD(model.parameters(), lr=" in finding.fix.code


@pytest.mark.parametrize("every", [1, 4])
def test_first_nonfinite_raises_with_its_record(every: int) -> None:
    """At a sampled step (every=1) and an unsampled one (every=4: step 5), the run
    stops at the step that went non-finite, before optimizer.step, with one name."""
    model = blowup_model(at=5)
    completed: list[int] = []
    with pytest.raises(GradscopeError) as info:
        with gradscope.watch(model, every=every) as scope:
            train(model, scope, 12, completed=completed)
    assert completed == list(range(5))  # stopped at step 5's scope.step, before its optimizer.step
    record = info.value.record
    assert (record["step"], record["layer"], record["role"]) == (5, "1", "activation")
    assert record["origin"] == "produced" and record["dtype"] == "float32"
    if every == 1:
        assert record["nonfinite_count"] == 8 * 16 and record["has_inf"]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad update never ran
    assert no_hooks(model)
    report = scope.report()
    assert report.findings[0].code == "nonfinite"
    assert report.findings[0].severity.value == "error"
    assert report.analysis["training"]["first_nonfinite"]["step"] == 5


def test_nonfinite_loss_with_finite_activations() -> None:
    model = mlp()
    with pytest.raises(GradscopeError) as info:
        with Scope(model, every=1, diagnose=False) as scope:
            x, _ = batch(0)
            loss = torch.log(model(x).abs().sum() * -1.0)  # log of a negative number: NaN
            scope.step(loss=loss)
    record = info.value.record
    assert (record["role"], record["step"], record["layer"]) == ("loss", 0, None)
    assert record["origin"] == "produced" and "loss function" in record["source"]
    assert scope.report().analysis["training"]["loss_last"] != scope.report().analysis["training"]["loss_last"]  # NaN


def test_received_nonfinite_names_the_producer() -> None:
    model = blowup_model(at=0)
    with Scope(model, every=1, raise_on=(), diagnose=False) as scope:
        x, y = batch(0)
        nn.functional.mse_loss(model(x), y).backward()
        scope.step()
    first = scope.first_nonfinite
    assert first["layer"] == "1" and first["origin"] == "produced"


def test_nonfinite_gradient_located_in_backward_order() -> None:
    torch.manual_seed(0)
    # 0 Linear, 1 NanInBackward, 2 Tanh, 3 Linear: forward finite; backward of layer 1
    # turns ∂ℓ/∂h of layer 0 into NaN, which layer 0 then propagates to its weight gradient.
    model = nn.Sequential(nn.Linear(6, 16), NanInBackward(), nn.Tanh(), nn.Linear(16, 3))
    with pytest.raises(GradscopeError) as info:
        with Scope(model, every=1, diagnose=False) as scope:
            x, y = batch(0)
            nn.functional.mse_loss(model(x), y).backward()
            scope.step()
    record = info.value.record
    assert record["role"] == "gradient" and record["layer"] == "0"
    assert record["origin"] == "produced" and record["source"] == "the backward of 1"
    assert record["has_nan"]


def test_gradient_spike_and_autoclip_threshold() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    norms = []
    with Scope(model, every=5, raise_on=(), diagnose=False) as scope:
        for step in range(60):
            x, y = batch(step % 7)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if step == 40:
                loss = loss * 1000.0  # the gradient norm jumps 1000x at step 40
            loss.backward()
            norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
            if step == 40:
                spike_param_norms = {n: float(p.grad.norm()) for n, p in model.named_parameters()}
            scope.step(opt)
            opt.step()
    report = scope.report()
    spike = next(f for f in report.findings if f.code == "gradient-spike")
    assert spike.evidence["step"] == 40 and spike.evidence["spike_steps"] == [40]
    recent_median = math.exp(statistics.median(math.log(n) for n in norms[:40]))
    assert spike.evidence["ratio_to_median"] == pytest.approx(norms[40] / recent_median, rel=1e-5)
    assert spike.evidence["ratio_to_median"] > 100
    assert spike.evidence["first_step"] == 40  # the flush that saw it
    largest = spike.evidence["largest_parameter_norms"]  # step 40 was sampled: per-parameter norms
    assert max(largest.values()) == pytest.approx(max(spike_param_norms.values()), rel=1e-5)
    # AutoClip: 10th percentile (nearest rank) of all 60 norms, within the bin error
    ordered = sorted(norms)
    p10 = ordered[math.ceil(0.10 * len(ordered)) - 1]
    median = ordered[math.ceil(0.50 * len(ordered)) - 1]
    clip = report.analysis["training"]["clip"]
    assert clip["threshold"] == pytest.approx(p10, rel=clip["relative_error"])
    assert clip["median_threshold"] == pytest.approx(median, rel=clip["relative_error"])
    assert f"max_norm={clip['threshold']:.4g}" in spike.fix.code


def test_divide_stats_is_exact_for_powers_of_two() -> None:
    x = torch.randn(1000) * 3.0
    x[:10] = 0.0
    for scale in (2.0**10, 2.0**16):
        got = divide_stats(Stats(tensor_stats(x * scale).double()), scale)
        want = Stats(tensor_stats(x).double())
        assert torch.equal(got.vector[9:], want.vector[9:])  # histogram identical
        assert got.mean == pytest.approx(want.mean, rel=1e-6)
        assert got.std == pytest.approx(want.std, rel=1e-6)
        assert got.absmax == pytest.approx(want.absmax, rel=1e-7)


def test_grad_scaler_unscaled_statistics_and_skipped_steps() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plain, dl_dout = [], []
    with Scope(model, every=1, diagnose=False) as scope:  # raise_on nonfinite: not for scaler overflows
        for step in range(6):
            x, y = batch(step)
            opt.zero_grad()
            out = model(x)
            loss = nn.functional.mse_loss(out, y)
            # ∂ℓ/∂out of the mean squared error, unscaled: 2 (out - y) / numel
            dl_dout.append(float((2 * (out.detach() - y) / y.numel()).pow(2).mean().sqrt()))
            if step == 2:
                loss = loss * float("inf")  # overflow: the scaler skips the step and halves its scale
            scaler.scale(loss).backward()
            plain.append(float(model[0].weight.grad.norm()) / scaler.get_scale())
            scope.step(opt, scaler=scaler)
            scaler.step(opt)
            scaler.update()
    training = scope.report().analysis["training"]
    assert training["skipped_steps"] == 1
    assert training["loss_scale"] == 2.0**9
    assert "unscaled" in scope.report().run["gradients"]
    flush = {r.step: r for r in scope.recent}
    for step in (3, 4, 5):
        assert flush[step].param_grad_norms["0.weight"] == pytest.approx(plain[step], rel=1e-5)
        assert flush[step].record.layer("2").gradient.rms == pytest.approx(dl_dout[step], rel=1e-5)
    # Weight-gradient statistics (taken with the diagnosis, here at step 0) are unscaled too.
    wgrad = flush[0].record.layer("0").weight_grad
    assert math.sqrt(wgrad.count) * wgrad.rms == pytest.approx(plain[0], rel=1e-5)
    assert scope.first_nonfinite is None  # a scaler overflow is not a failure
    assert flush[2].record.layer("2").gradient is None  # the skipped step's gradients are left out
    assert not any(f.code == "nonfinite" for r in scope.recent for f in r.alerts)


def test_gradient_accumulation_merges_micro_batches_per_optimizer_step() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Scope(model, every=1, raise_on=(), diagnose=False) as scope:
        for step in range(2):
            opt.zero_grad()
            for micro in range(3):
                x, y = batch(3 * step + micro)
                (nn.functional.mse_loss(model(x), y) / 3).backward()
            scope.step(opt)
            opt.step()
    last = scope.recent[-1].record
    assert [layer.name for layer in last.layers] == ["0", "1", "2"]  # no "0#2": one call site per micro-batch
    assert last.layer("1").activation.count == 3 * 8 * 16
    assert last.layer("1").gradient.count == 3 * 8 * 16
    # the accumulated gradient, once (weight statistics come with the diagnosis: step 0)
    assert scope.recent[0].record.layer("0").weight_grad.count == 16 * 6


def test_attach_hooks_the_optimizer_and_removes_the_hooks() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scope = gradscope.watch(model, every=2).attach(opt)
    for step in range(4):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    report = scope.close()
    assert report.analysis["training"]["steps"] == 4
    assert report.analysis["training"]["update_ratio"]["0"]["samples"] == 2
    assert no_hooks(model)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert scope.close() is report  # idempotent
    with pytest.raises(GradscopeError):
        scope.step(opt)


def test_hooks_removed_after_exception_in_forward() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(RuntimeError):
        with gradscope.watch(model) as scope:
            scope.step(opt)
            model(torch.randn(2, 5))  # wrong width
    assert no_hooks(model)
    assert not opt._optimizer_step_post_hooks


def test_watching_does_not_change_training() -> None:
    def train(watched: bool) -> list[torch.Tensor]:
        model = mlp(seed=3)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        scope = gradscope.watch(model, every=2) if watched else None
        for step in range(6):
            x, y = batch(step)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if scope is not None:
                scope.step(opt, loss=loss)
            opt.step()
        if scope is not None:
            scope.close()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train(False), train(True), strict=True):
        assert torch.equal(a, b)


def test_alerts_fire_once_per_code_and_layer_until_cleared() -> None:
    from gradscope.report import Finding, Severity

    tracker = AlertTracker()

    def f(layer: str) -> Finding:
        return Finding("dead-units", Severity.WARNING, [layer], "m", {"frac": 0.9})

    kinds = lambda alerts: [(a.kind, a.finding.layers[0]) for a in alerts]  # noqa: E731
    assert kinds(tracker.observe(0, [f("a")])) == [("appeared", "a")]
    assert tracker.observe(1, [f("a")]) == []  # persists: silent
    assert kinds(tracker.observe(2, [f("a"), f("b")])) == [("appeared", "b")]
    assert kinds(tracker.observe(3, [])) == [("cleared", "a"), ("cleared", "b")]
    assert kinds(tracker.observe(4, [f("a")])) == [("appeared", "a")]  # a again: alerts again
    history = tracker.histories[("dead-units", "a")].evolution()
    assert history["first_step"] == 0 and history["last_step"] == 4
    assert history["flushes_seen"] == 4 and history["alerts"] == 2
    assert [h["step"] for h in history["history"]] == [0, 1, 2, 4]


def test_bad_arguments_are_refused() -> None:
    model = mlp()
    with pytest.raises(GradscopeError):
        gradscope.watch(model, every=0)
    with pytest.raises(GradscopeError):
        gradscope.watch(model, raise_on=("typo",))
    assert no_hooks(model)


def test_norm_histogram_percentiles_within_stated_error() -> None:
    from gradscope.watching.norms import PERCENTILE_RELATIVE_ERROR, NormHistogram

    g = torch.Generator().manual_seed(0)
    values = torch.exp(torch.randn(50_000, generator=g, dtype=torch.float64) * 3.0).tolist()  # 8 decades
    history = NormHistogram()
    for v in values:
        history.add(v)
    history.add(float("nan"))
    history.add(0.0)
    assert history.count == len(values) and history.nonfinite == 1 and history.zeros == 1
    ordered = sorted(values)
    for q in (1, 10, 50, 90, 99.9):
        exact = ordered[math.ceil(q / 100 * len(ordered)) - 1]  # nearest rank
        assert history.percentile(q) == pytest.approx(exact, rel=PERCENTILE_RELATIVE_ERROR)
    assert len(history.counts) == 2048  # fixed size, whatever the run length


def test_spike_detector_quiet_on_lognormal_noise_and_loud_on_a_jump() -> None:
    from gradscope.watching.norms import SpikeDetector

    g = torch.Generator().manual_seed(1)
    noise = torch.exp(torch.randn(5_000, generator=g, dtype=torch.float64) * 0.3).tolist()  # ~35% wiggle
    detector = SpikeDetector()
    assert [s for s in (detector.observe(i, v) for i, v in enumerate(noise)) if s is not None] == []
    spike = detector.observe(5_000, 20.0)  # 20x the typical norm of 1
    assert spike is not None and spike.ratio == pytest.approx(20.0, rel=0.1) and spike.z > 6


def test_paused_forwards_are_not_recorded() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Scope(model, every=1, raise_on=(), diagnose=False) as scope:
        for step in range(2):
            x, y = batch(step)
            with scope.paused(), torch.no_grad():
                model(torch.randn(100, 6))  # an evaluation forward
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            scope.step(opt)
            opt.step()
    assert scope.report().record.layer("1").activation.count == 2 * 8 * 16


def _wide_model() -> nn.Sequential:
    """Weights of 64 x 512 = 32768 elements: more than 2 x WATCH_SAMPLE, so watch
    reads their statistics (extremes included) from a strided sample."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 64), nn.Tanh(), nn.Linear(64, 3))


@pytest.mark.parametrize("parameter", ["0.weight", "0.bias"])
def test_nan_in_a_parameter_gradient_off_the_sample_is_found_by_its_exact_norm(parameter: str) -> None:
    """Weight-gradient statistics are sampled (exact_parameter_extremes=False), but
    the per-parameter gradient norms are exact: a single NaN that no sample sees
    (element 1 of the weight: the sample takes every 11th element from 0; bias
    gradients have no statistics at all) is still reported at its layer and step."""
    model = _wide_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(GradscopeError) as info:
        with gradscope.watch(model, every=1) as scope:
            for step in range(3):
                x, y = torch.randn(4, 512), torch.randn(4, 3)
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                if step == 2:
                    grad = dict(model.named_parameters())[parameter].grad
                    grad.view(-1)[1] = float("nan")
                scope.step(opt)
                opt.step()
    record = info.value.record
    assert (record["step"], record["layer"], record["role"]) == (2, "0", "weight_grad")
    assert record["parameter"] == parameter and record["has_nan"] and record["origin"] == "produced"
    if parameter == "0.weight":
        wgrad = scope.recent[-1].record.layer("0").weight_grad
        assert wgrad is not None and not wgrad.extremes_exact  # the sample did miss it
        assert wgrad.nonfinite_count == 0


def test_activation_extremes_stay_exact_while_weight_extremes_are_sampled() -> None:
    model = _wide_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 512)
    x[5, 7] = 1e4  # one large input element: its activation's absmax must be exact
    with gradscope.watch(model, every=1, raise_on=()) as scope:
        opt.zero_grad()
        out = model(x)
        nn.functional.mse_loss(out, torch.zeros_like(out)).backward()
        scope.step(opt)
    layer = scope.recent[-1].record.layer("0")
    h = model[0](x).detach()  # no optimizer step was taken: the same weights
    assert layer.activation.extremes_exact and layer.activation.count == h.numel()
    assert layer.activation.max == float(h.max()) and layer.activation.min == float(h.min())
    weight = layer.weight
    assert not weight.extremes_exact and weight.extreme_samples == weight.hist_samples < weight.count
    # A sampled maximum can only fall short of the true one.
    assert weight.absmax <= float(model[0].weight.detach().abs().max())


def test_light_tier_records_parametrised_layers_and_norms_on_sampled_steps_only() -> None:
    model = mlp()  # Linear, Tanh, Linear
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Scope(model, every=3, raise_on=(), diagnose=False, tier="light") as scope:
        for step in range(7):
            x, y = batch(step)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            expected = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())))
            scope.step(opt, loss=loss)
            if step % 3 == 0:
                norms = dict(scope.recent[-1].global_norms)
                assert norms == {step: pytest.approx(expected, rel=1e-5)}  # this step's norm, no other
            opt.step()
    assert [s for r in scope.recent for s, _ in r.global_norms] == [0, 3, 6]
    assert [s for r in scope.recent for s, _ in r.losses] == list(range(7))  # losses stay per step
    assert [layer.name for layer in scope.report().record.layers] == ["0", "2"]  # no Tanh
    assert scope.report().analysis["training"]["tier"] == "light"
    assert no_hooks(model)


def test_unknown_tier_is_refused() -> None:
    with pytest.raises(GradscopeError, match="unknown tier 'fast'"):
        gradscope.watch(mlp(), tier="fast")


class _PostLN(nn.Module):
    """A Linear read directly by a LayerNorm, then a post-LN residual block
    ``LayerNorm(h + Linear(h))`` (BERT's)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.inner = nn.Linear(8, 8)
        self.post = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.lin(x))
        self.residual_sum = (h + self.inner(h)).detach()  # what the post-LN divides by the std of
        return self.post(h + self.inner(h))


def test_a_normalisation_reading_a_residual_sum_has_its_input_recorded() -> None:
    """The depth diagnosis scales gradients by the std a normalisation divides by;
    a watch records that input where it is not the output recorded just before
    (a residual sum), exactly, and not where the norm reads a layer directly."""
    torch.manual_seed(0)
    model = _PostLN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Scope(model, every=1, raise_on=(), diagnose=False) as scope:
        for _ in range(2):
            x = torch.randn(16, 8)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            scope.step(opt)
            opt.step()
        record = scope.recent[-1].record
        assert record.layer("norm").input is None  # its input is lin's output, recorded as lin's activation
        recorded = record.layer("post").input
        assert recorded is not None and recorded.count == 16 * 8
        assert recorded.std == pytest.approx(float(model.residual_sum.double().std(unbiased=False)), rel=1e-9)


def test_a_forward_after_the_last_step_is_not_a_training_step() -> None:
    """A final prediction with gradients on (or micro-batches whose step never came)
    was flushed at close as an eleventh sampled step of ten, its rows merged into the
    training statistics (layer 0 counted 2,240 activations instead of 640)."""
    import gradscope

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, every=1, raise_on=(), on_finding=lambda f: None) as scope:
        for _ in range(10):
            opt.zero_grad()
            loss = model(torch.randn(4, 8)).pow(2).mean()
            loss.backward()
            scope.step(opt, loss=loss)
            opt.step()
        model(torch.randn(100, 8))  # a prediction, gradients on
    report = scope.report()
    assert report.analysis["training"]["sampled_steps"] == 10
    assert report.record.layer("0").activation.count == 10 * 4 * 16
    assert any("after the last step()" in note for note in report.record.notes)


def test_a_step_an_exception_cut_short_is_not_a_sampled_step() -> None:
    """An exception in the first forward: the summary read '0 steps (every=1, 1 sampled)'."""
    import gradscope

    class Fails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("the model's own error")

    model = nn.Sequential(nn.Linear(8, 8), Fails())
    with pytest.raises(RuntimeError, match="own error"):
        with gradscope.watch(model, every=1, on_finding=lambda f: None) as scope:
            model(torch.randn(4, 8))
    training = scope.report().analysis["training"]
    assert (training["steps"], training["sampled_steps"]) == (0, 0)
