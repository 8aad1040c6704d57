"""Regularisation under ``gradscope.watch``, against closed forms: decoupled decay's (1 − ηλ) per step,
soft-thresholding's exact zeros, dropout's E[x'] = x, the forgotten ``model.eval()``, early stopping."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import gradscope
import gradscope.fix
from gradscope.errors import GradscopeError
from gradscope.watching.validation import MIN_DELTA, PATIENCE
from gradscope.watching.weights import L1_PILEUP_FRAC, SPARSITY_RTOL


def quiet(**kwargs):
    return dict(raise_on=(), on_finding=lambda f: None, **kwargs)


def zero_grad_steps(model: nn.Module, opt: torch.optim.Optimizer, scope, steps: int) -> None:
    x = torch.randn(4, model[0].in_features)
    for _ in range(steps):
        opt.zero_grad()
        (0.0 * model(x).sum()).backward()  # zero gradient: only the decay moves the weights
        scope.step(opt)
        opt.step()


def test_watch_reports_the_decoupled_decay_factor_and_measures_it() -> None:
    torch.manual_seed(0)
    lr, wd = 0.05, 0.4  # ηλ = 0.02: the lecture's "weight decay 0.02" per step
    model = nn.Sequential(nn.Linear(10, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    norm0 = model[0].weight.detach().norm().item()
    with gradscope.watch(model, **quiet()) as scope:
        zero_grad_steps(model, opt, scope, 31)
    regularisation = scope.report().analysis["regularisation"]
    (group,) = regularisation["optimizer"]["groups"]
    assert group["decay_factor_per_step"] == 1 - lr * wd
    assert group["applied"] == "decoupled"
    track = regularisation["weights"]["0.weight"]
    # measured at steps 0, 10, 20, 30 (before each step's update): ‖θ_t‖ = (1 − ηλ)^t ‖θ_0‖
    assert [p[0] for p in track["trajectory"]] == [0, 10, 20, 30]
    for step, norm in track["trajectory"]:
        assert norm == pytest.approx(norm0 * (1 - lr * wd) ** step, rel=1e-5)
    assert track["measured_norm_factor_per_step"] == pytest.approx(1 - lr * wd, rel=1e-6)
    # zero gradient: all of each step's change comes from the decay
    assert track["decay_share"] == 1.0


def test_watch_eta_lambda_above_one_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(6, 6))
    opt = torch.optim.SGD(model.parameters(), lr=1.5, weight_decay=1.0)
    with gradscope.watch(model, **quiet()) as scope:
        zero_grad_steps(model, opt, scope, 3)
    errors = [f for f in scope.report().findings if f.code == "weight-decay" and f.severity == "error"]
    assert len(errors) == 1 and errors[0].evidence["groups"][0]["eta_lambda"] == 1.5


def test_watch_reads_the_current_learning_rate_of_a_schedule() -> None:
    model = nn.Sequential(nn.Linear(6, 6))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.1)
    with gradscope.watch(model, **quiet()) as scope:
        x = torch.randn(4, 6)
        for _ in range(11):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            scope.step(opt)
            opt.step()
            schedule.step()
    (group,) = scope.report().analysis["regularisation"]["optimizer"]["groups"]
    assert group["lr"] == pytest.approx(0.1 * 0.1**2)  # read at step 10: two decays of the schedule
    assert group["eta_lambda"] == pytest.approx(0.001 * 0.5)


def test_soft_threshold_sparsity_is_exactly_what_gradscope_reports() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    lam = 0.05
    gradscope.fix.soft_threshold_(model, lam)
    with gradscope.watch(model, **quiet()) as scope:
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        opt.zero_grad()
        model(torch.randn(8, 64)).sum().backward()
        scope.step(opt)
        opt.step()
    weights = scope.report().analysis["regularisation"]["weights"]
    for name in ("0.weight", "2.weight"):
        p = dict(model.named_parameters())[name].detach()
        assert weights[name]["zero_frac"] == (p == 0).sum().item() / p.numel()
        tol = p.norm().item() / math.sqrt(p.numel()) * SPARSITY_RTOL
        assert weights[name]["near_zero_tolerance"] == pytest.approx(tol, rel=1e-6)
        near = ((p.abs() < tol) & (p != 0)).sum().item() / p.numel()
        assert weights[name]["near_zero_frac"] == near
    # Kaiming-uniform init of Linear(64, ·) is U(±1/8): P(|w| <= 0.05) = 0.4 before the threshold
    assert weights["0.weight"]["zero_frac"] == pytest.approx(0.4, abs=0.05)
    # survivors are uniform on (0, 0.075] in magnitude: few of them within 1% of the RMS of zero
    assert weights["0.weight"]["near_zero_frac"] < 0.01


def sparse_regression_run(proximal: bool, steps: int = 200) -> gradscope.Report:
    """y = X w* + noise with 8 of 64 inputs relevant; L1 (λ=0.1) by subgradient in the loss, or
    by its proximal step S_ηλ after optimizer.step()."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=g)
    w_true = torch.zeros(2, 64)
    w_true[:, :8] = torch.randn(2, 8, generator=g).sign()
    y = x @ w_true.T + 0.5 * torch.randn(256, 2, generator=g)
    model = nn.Sequential(nn.Linear(64, 2))
    lr, lam = 0.02, 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with gradscope.watch(model, every=25, **quiet()) as scope:
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if not proximal:
                loss = loss + lam * model[0].weight.abs().sum() / 2
            loss.backward()
            scope.step(opt, loss=loss)
            opt.step()
            if proximal:
                gradscope.fix.soft_threshold_(model, lr * lam / 2)
    return scope.report()


def test_l1_in_the_loss_is_not_sparse_and_the_proximal_step_is() -> None:
    subgradient = sparse_regression_run(proximal=False)
    (finding,) = [f for f in subgradient.findings if f.code == "l1-not-sparse"]
    assert finding.layers == ["0"] and finding.severity == "warning"
    stats = finding.evidence["parameters"]["0.weight"]
    assert stats["near_zero_frac"] >= L1_PILEUP_FRAC and stats["zero_frac"] == 0.0
    assert "soft_threshold_" in finding.fix.code
    proximal = sparse_regression_run(proximal=True)
    assert "l1-not-sparse" not in proximal.codes()
    weights = proximal.analysis["regularisation"]["weights"]["0.weight"]
    # most of the 2 x 56 irrelevant weights are exactly zero (the lasso keeps those whose noise
    # correlation, ~0.5/sqrt(256) = 0.03, exceeds λ/2 = 0.05), where the subgradient run had none
    assert weights["zero_frac"] >= 0.5


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 64), nn.BatchNorm1d(64))
        self.head = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


def dropout_run(evaluate: str, steps: int = 6) -> gradscope.Report:
    """Train; after each step evaluate under no_grad: "forgotten" (train mode), "eval" (model.eval()), "none"."""
    torch.manual_seed(0)
    model = DropoutNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    x, y, xv = torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g), torch.randn(16, 8, generator=g)
    alerts = []
    with gradscope.watch(model, raise_on=(), on_finding=alerts.append) as scope:
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            scope.step(opt, loss=loss)
            opt.step()
            # fork_rng: the evaluation's dropout masks do not change the training run's
            with torch.random.fork_rng():
                if evaluate == "forgotten":
                    with torch.no_grad():
                        model(xv)
                    with torch.inference_mode():
                        model(xv)
                elif evaluate == "eval":
                    model.eval()
                    with torch.no_grad():
                        model(xv)
                    model.train()
    report = scope.report()
    report.run["alerts"] = [f.code for f in alerts]
    return report


def test_forgotten_eval_is_train_mode_inference_once_per_run() -> None:
    report = dropout_run("forgotten")
    (finding,) = [f for f in report.findings if f.code == "train-mode-inference"]
    assert report.run["alerts"].count("train-mode-inference") == 1
    assert finding.layers == ["net.2", "net.4"]  # the Dropout and the BatchNorm, by name
    assert finding.evidence["forwards"] == 12  # 6 steps x (no_grad + inference_mode)
    assert finding.evidence["first_step"] == 1  # after the first optimizer step
    assert "model.eval()" in finding.fix.code
    assert "train-mode-inference" not in dropout_run("eval").codes()


def test_the_detection_records_nothing_into_training_statistics() -> None:
    # watch(record_no_grad=False), the default: the no-grad forward is not counted
    with_eval = dropout_run("forgotten")
    without = dropout_run("none")
    for layer in without.layers:
        other = with_eval.record.layer(layer.name)
        assert other.activation.count == layer.activation.count, layer.name
        assert other.activation.mean == layer.activation.mean, layer.name


def test_dropout_mean_matches_its_input_within_binomial_error() -> None:
    """x' = m·x/(1−p), m ~ Bernoulli(1−p): E[x'] = x and Var[mean(x')] = p/(1−p)·E[x²]/n."""
    torch.manual_seed(0)
    p = 0.3
    model = nn.Sequential(nn.Linear(16, 256), nn.Dropout(p))
    report = gradscope.audit(model, input_shape=(512, 16), loss="mean")
    before, after = report.record.layer("0").activation, report.record.layer("1").activation
    n = before.count
    assert after.count == n == 512 * 256
    sigma = math.sqrt(p / (1 - p) * before.rms**2 / n)
    assert abs(after.mean - before.mean) < 5 * sigma  # 5 sigma: a false alarm once in ~1.7 million runs
    assert after.zero_frac == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / n))
    # at inference dropout is the identity
    evaluated = gradscope.audit(model, input_shape=(512, 16), loss="mean", mode="eval")
    e_before, e_after = evaluated.record.layer("0").activation, evaluated.record.layer("1").activation
    assert e_after.mean == e_before.mean and e_after.zero_frac == e_before.zero_frac


def curve_run(
    n_train: int, steps: int = 300, stop_on: tuple[str, ...] = ()
) -> tuple[gradscope.Report, list, Exception | None]:
    """sin(2x) + N(0, 0.3²) noise; a 2x128 tanh MLP with Adam; validation on 256 held-out points every 10 steps."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    xt = torch.rand(n_train, 1, generator=g) * 4 - 2
    xv = torch.rand(256, 1, generator=g) * 4 - 2
    yt = torch.sin(2 * xt) + 0.3 * torch.randn(n_train, 1, generator=g)
    yv = torch.sin(2 * xv) + 0.3 * torch.randn(256, 1, generator=g)
    model = nn.Sequential(nn.Linear(1, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, stopped = [], None
    with gradscope.watch(model, every=10, stop_on=stop_on, **quiet()) as scope:
        try:
            for i in range(steps):
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(xt), yt)
                loss.backward()
                scope.step(opt, loss=loss)
                opt.step()
                if (i + 1) % 10 == 0:
                    model.eval()
                    with torch.no_grad():
                        val = nn.functional.mse_loss(model(xv), yv)
                    model.train()
                    losses.append((i + 1, val.item()))
                    scope.validation(val)
        except GradscopeError as exc:
            stopped = exc
    return scope.report(), losses, stopped


@pytest.mark.slow
def test_overfitting_names_the_best_step_and_a_healthy_run_has_none() -> None:
    report, losses, _ = curve_run(n_train=12)
    (finding,) = [f for f in report.findings if f.code == "overfitting"]
    true_best = min(losses, key=lambda item: item[1])[0]
    # within the patience window (PATIENCE evaluations of 10 steps) of the true minimum
    assert abs(finding.evidence["best_step"] - true_best) <= PATIENCE * 10
    assert finding.evidence["train_loss_last"] < finding.evidence["train_loss_at_best"]
    assert finding.evidence["last_loss"] > finding.evidence["best_loss"] * (1 + MIN_DELTA)
    assert f"after step {finding.evidence['best_step']}" in finding.fix.summary
    assert "weight decay" in finding.fix.summary  # none is set: strengthen that first
    validation = report.analysis["regularisation"]["validation"]
    assert validation["best_step"] == finding.evidence["best_step"]
    assert validation["last_gap"] > validation["gap_at_best"]  # the gap widened
    healthy, _, _ = curve_run(n_train=512)
    assert "overfitting" not in healthy.codes()


@pytest.mark.slow
def test_stop_on_overfitting_ends_training_at_the_finding(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gradscope"):
        report, losses, stopped = curve_run(n_train=12, stop_on=("overfitting",))
    # one alert, whose header names the evaluation's step, as its message does (the flush
    # at close announced it one step earlier in its header than in its message)
    (line,) = [r.getMessage() for r in caplog.records if "overfitting" in r.getMessage() and "step" in r.getMessage()
               and r.getMessage().startswith("gradscope step")]  # fmt: skip
    assert line.startswith(f"gradscope step {losses[-1][0]}:") and f"at step {losses[-1][0]}" in line
    assert isinstance(stopped, GradscopeError) and "stop_on includes 'overfitting'" in str(stopped)
    (finding,) = [f for f in report.findings if f.code == "overfitting"]
    # stopped at the evaluation that completed the finding: PATIENCE evaluations after the best
    assert losses[-1][0] == report.analysis["regularisation"]["stopped_at_step"]
    assert losses[-1][0] < 300
    assert len([s for s, _ in losses if s > finding.evidence["best_step"]]) >= PATIENCE


def test_stop_on_rejects_unknown_codes() -> None:
    with pytest.raises(GradscopeError, match="stop_on"):
        gradscope.watch(nn.Linear(2, 2), stop_on=("nonfinite",))


def test_near_zero_fraction_of_a_large_weight_is_sampled_within_binomial_error() -> None:
    """A 512 x 512 weight (above NEAR_ZERO_SAMPLE) with exactly 30 % of its elements
    at 1e-4 x RMS and 5 % exactly zero: the near-zero fraction read from the strided
    sample lies within 4 binomial standard errors of 0.30, the zero fraction is exact,
    and the norm is exact (1e-6 relative, against float64)."""
    from gradscope.watching.weights import NEAR_ZERO_SAMPLE, WeightWatch

    torch.manual_seed(0)
    layer = nn.Linear(512, 512, bias=False)
    n = layer.weight.numel()
    assert n > NEAR_ZERO_SAMPLE
    with torch.no_grad():
        flat = layer.weight.view(-1)
        order = torch.randperm(n)
        rms = float(flat.double().square().mean().sqrt())
        flat[order[: int(0.30 * n)]] = 1e-4 * rms
        flat[order[int(0.30 * n) : int(0.35 * n)]] = 0.0
    watch = WeightWatch(nn.Sequential(layer))
    watch.measure(step=0)
    track = watch.tracks["0.weight"]
    sigma = math.sqrt(0.30 * 0.70 / NEAR_ZERO_SAMPLE)
    assert abs(track.near_zero_frac - 0.30) < 4 * sigma
    assert track.zero_frac == pytest.approx((int(0.35 * n) - int(0.30 * n)) / n, abs=0.5 / n)
    exact_norm = float(layer.weight.detach().double().norm())
    assert track.trajectory[-1][1] == pytest.approx(exact_norm, rel=1e-6)
