"""Learning-rate findings of watch: update-ratio (one per run, per optimizer family, aware of
the current learning rate) and learning-rate-too-high (a diverging run, named within a few steps)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradscope
from gradscope.learning_rate import UPDATE_RATIO_LOW, LayerRatios, LearningRateMonitor
from gradscope.optimizers import ADAPTIVE, SGD_LIKE, class_expression, family
from gradscope.report import Finding, Severity


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


def train(model, opt, steps, data, scheduler=None, loss_fn=nn.functional.cross_entropy, every=1):
    """Train under watch; returns (report, alerts, losses)."""
    alerts: list[Finding] = []
    losses = []
    with gradscope.watch(model, every=every, raise_on=(), on_finding=alerts.append) as scope:
        for step in range(steps):
            x, y = data(step)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            losses.append(float(loss.detach()))
            scope.step(opt, loss=loss)
            opt.step()
            if scheduler is not None:
                scheduler.step()
    return scope.report(), alerts, losses


def mlp_data(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, 20, generator=g), torch.randint(0, 5, (32,), generator=g)


_G = torch.Generator().manual_seed(0)
IMAGES, LABELS = torch.randn(64, 3, 8, 8, generator=_G), torch.randint(0, 4, (64,), generator=_G)


def image_data(step: int):
    i = (step % 4) * 16  # four fixed batches: the loss goes down
    return IMAGES[i : i + 16], LABELS[i : i + 16]


def codes(findings) -> list[str]:
    return [f.code for f in findings]


# -- learning-rate-too-high ---------------------------------------------------------------


def test_lr_far_too_high_is_named_within_two_steps_of_the_divergence() -> None:
    model = mlp()
    report, alerts, losses = train(model, torch.optim.SGD(model.parameters(), lr=20.0), 10, mlp_data)
    named = [a for a in alerts if a.code == "learning-rate-too-high"]
    assert len(named) == 1  # rate-limited
    finding = named[0]
    # The loss first rises at step 1 (1.64 -> 4.98); step 0's update ratio (0.9 of the weights'
    # norm) arrives with the flush of step 1: the alert fires there, at step 1.
    assert finding.evidence["step"] == 1
    assert losses[1] > losses[0]
    assert losses[finding.evidence["step"]] < 10 * losses[0]  # long before 10^9x its start
    assert finding.severity is Severity.ERROR
    assert finding.evidence["median_update_ratio"] > 0.1
    # before the first non-finite value (the loss is NaN from step 7)
    first_nan = next(i for i, v in enumerate(losses) if not math.isfinite(v))
    assert finding.evidence["step"] < first_nan - 3
    assert codes(alerts).index("learning-rate-too-high") < codes(alerts).index("nonfinite")
    # the fix: an lr from the observed ratio (20 x 1e-3 / 0.9 ≈ 0.02), in the user's class, warm-up, clipping
    suggested = finding.evidence["suggested_learning_rate"]
    assert suggested == pytest.approx(20.0 * 1e-3 / finding.evidence["median_update_ratio"], rel=0.5)
    assert f"torch.optim.SGD(model.parameters(), lr={suggested:g})" in finding.fix.code
    assert "LinearLR" in finding.fix.code and "clip the global gradient norm" in finding.fix.summary
    # one norm before the divergence (step 0's): no threshold is made up from it
    assert finding.evidence["clip"] is None and "clip_grad_norm_" not in finding.fix.code
    # the final report keeps it
    assert "learning-rate-too-high" in report.codes()


def test_lr_far_too_high_with_sparse_sampling_is_named_at_the_first_sample_after_it() -> None:
    """every=4: step 0's update ratio reaches the host at the flush of step 4, where the loss and
    norm of steps 1-4 are seen too: the finding is at step 4, still long before the first NaN."""
    model = mlp()
    _, alerts, losses = train(model, torch.optim.SGD(model.parameters(), lr=20.0), 9, mlp_data, every=4)
    finding = next(a for a in alerts if a.code == "learning-rate-too-high")
    assert finding.evidence["step"] == 4
    assert finding.evidence["median_update_ratio_step"] == 0
    assert all(math.isfinite(v) for v in losses[:5])


def test_the_same_run_at_a_sane_lr_gets_no_learning_rate_finding() -> None:
    model = mlp()
    report, alerts, losses = train(model, torch.optim.SGD(model.parameters(), lr=0.05), 10, mlp_data)
    assert not {"learning-rate-too-high", "update-ratio"} & (set(codes(alerts)) | report.codes())
    assert all(math.isfinite(v) for v in losses)


def test_divergence_with_the_rate_fixed_as_advised_stays_finite() -> None:
    model = mlp()
    _, alerts, _ = train(model, torch.optim.SGD(model.parameters(), lr=20.0), 3, mlp_data)
    finding = next(a for a in alerts if a.code == "learning-rate-too-high")
    model = mlp()
    scope: dict = {"model": model, "torch": torch}
    exec(finding.fix.code, scope)
    opt = scope["optimizer"]
    assert isinstance(opt, torch.optim.SGD)
    report, alerts, losses = train(model, opt, 10, mlp_data)
    assert "learning-rate-too-high" not in codes(alerts)
    assert all(math.isfinite(v) for v in losses)


def test_loss_that_can_be_negative_is_not_read_as_growth() -> None:
    monitor = LearningRateMonitor()
    # a log-likelihood-style loss going from -3 to -1 is "worse" but not a ratio to read
    out = monitor.observe(1, {0: {"fc": 0.5}}, [(0, 1.0), (1, 1.2)], [(0, -3.0), (1, -1.0)])
    assert "learning-rate-too-high" not in codes(out)


# -- update-ratio ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [lambda p: torch.optim.AdamW(p, lr=1e-3), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)],
    ids=["AdamW", "SGD-momentum"],
)
def test_update_ratio_is_silent_on_a_healthy_cnn(make) -> None:
    model = cnn()
    report, alerts, losses = train(model, make(model.parameters()), 40, image_data)
    assert losses[-1] < losses[0]
    assert "update-ratio" not in set(codes(alerts)) | report.codes()
    ratios = report.analysis["training"]["update_ratio"]
    # BatchNorm gains move less than 1e-3 per step on average (Adam: ≈ c·lr/rms(w), rms = 1): silent by design
    assert ratios["1"]["kind"] == "norm" and ratios["1"]["geometric_mean"] < 1e-2


def test_update_ratio_is_silent_on_a_decayed_schedule() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.3)  # 0.3^25 ≈ 1e-13 at the end
    report, alerts, _ = train(model, opt, 25, mlp_data, scheduler=sched)
    ratios = report.analysis["training"]["update_ratio"]
    assert ratios["4"]["last"] < UPDATE_RATIO_LOW  # the late steps are tiny...
    assert "update-ratio" not in set(codes(alerts)) | report.codes()  # ...by the schedule's design


def test_a_schedule_decayed_before_watch_started_is_not_too_small() -> None:
    """Watch attached late: the schedule's initial_lr tells decay from a small lr."""
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    for _ in range(20):  # lr 1e-3 -> 1e-9 before watching
        opt.step()
        sched.step()
    report, alerts, _ = train(model, opt, 12, mlp_data, scheduler=sched)
    assert "update-ratio" not in set(codes(alerts)) | report.codes()
    # the same small lr without a schedule behind it is too small
    model = mlp()
    report, _, _ = train(model, torch.optim.AdamW(model.parameters(), lr=1e-9), 12, mlp_data)
    assert "update-ratio" in report.codes()


@pytest.mark.parametrize(
    ("make", "expression"),
    [
        (lambda p: torch.optim.AdamW(p, lr=1e-8), "torch.optim.AdamW(model.parameters(), lr="),
        (lambda p: torch.optim.SGD(p, lr=1e-6, momentum=0.9), "torch.optim.SGD(model.parameters(), lr="),
        (lambda p: torch.optim.RMSprop(p, lr=1e-8), "torch.optim.RMSprop(model.parameters(), lr="),
    ],
)
def test_one_update_ratio_finding_per_run_in_the_users_optimizer_class(make, expression: str) -> None:
    model = mlp()
    report, alerts, _ = train(model, make(model.parameters()), 12, mlp_data)
    found = [f for f in report.findings if f.code == "update-ratio"]
    assert len(found) == 1 and len([a for a in alerts if a.code == "update-ratio"]) == 1
    finding = found[0]
    assert finding.layers == ["0", "2", "4"] and finding.evidence["too_small"] == ["0", "2", "4"]
    assert "'0', '2', '4'" in finding.message
    assert expression in finding.fix.code
    assert "init" not in finding.fix.code  # never re-initialise during training
    # the snippet runs, and its lr brings the largest ratio to about 1e-3 (the ratio is proportional to lr)
    scope = {"model": model, "torch": torch}
    exec(finding.fix.code, scope)
    new_lr = scope["optimizer"].param_groups[0]["lr"]
    old_lr = finding.evidence["per_layer"]["0"]["lr_peak"]
    best = max(finding.evidence["per_layer"][n]["max_at_peak_lr"] for n in finding.layers)
    assert 1e-4 < best * new_lr / old_lr < 1e-2


def test_only_the_layers_that_are_off_get_their_own_parameter_group() -> None:
    model = mlp()
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 1e-9},  # frozen in effect: its updates round to 0
            {"params": [*model[2].parameters(), *model[4].parameters()]},
        ],
        lr=0.05,
    )
    report, _, _ = train(model, opt, 12, mlp_data)
    finding = next(f for f in report.findings if f.code == "update-ratio")
    assert finding.layers == ["0"]
    scope = {"model": model, "torch": torch}
    exec(finding.fix.code, scope)
    groups = scope["optimizer"].param_groups
    assert len(groups) == 2
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model[0].parameters()}
    assert groups[0]["lr"] == pytest.approx(0.05) and groups[1]["lr"] > 1e-6


def test_norm_gains_are_judged_only_when_extreme() -> None:
    gain = LayerRatios(kind="norm")
    weight = LayerRatios(kind="weight")
    for step in range(12):
        gain.add(step, 5e-6, 1e-3, None)  # small, by design for a gain of 1
        weight.add(step, 5e-6, 1e-3, None)
    assert not gain.too_small() and weight.too_small()
    frozen = LayerRatios(kind="norm")
    for step in range(12):
        frozen.add(step, 1e-9, 1e-3, None)
    assert frozen.too_small()


def test_optimizer_family_and_class() -> None:
    p = [nn.Parameter(torch.zeros(2))]
    assert family(torch.optim.SGD(p, lr=0.1)) == SGD_LIKE
    for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RMSprop, torch.optim.Adagrad):
        assert family(cls(p, lr=0.1)) == ADAPTIVE

    class MyAdam(torch.optim.Adam):
        pass

    assert family(MyAdam(p, lr=0.1)) == ADAPTIVE  # from its betas
    assert class_expression(MyAdam(p)) == f"{__name__}.MyAdam"
    assert class_expression(torch.optim.Adam(p)) == "torch.optim.Adam"


def test_without_the_optimizer_the_snippet_sets_the_rate_in_place() -> None:
    """scope.step() without the optimizer: no class is made up (never a default AdamW)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    with gradscope.watch(model, every=1, raise_on=(), on_finding=lambda f: None) as scope:
        for step in range(12):
            x, y = mlp_data(step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            scope.step()
            opt.step()
    finding = next(f for f in scope.report().findings if f.code == "update-ratio")
    assert "AdamW" not in finding.fix.code and finding.evidence["optimizer"] is None
    exec(finding.fix.code, {"optimizer": opt})
    assert opt.param_groups[0]["lr"] > 1e-6


def test_adam_with_a_far_too_high_lr_is_named_at_step_1_and_a_sane_one_is_silent() -> None:
    model = mlp()
    _, alerts, losses = train(model, torch.optim.Adam(model.parameters(), lr=1.0), 6, mlp_data)
    finding = next(a for a in alerts if a.code == "learning-rate-too-high")
    assert finding.evidence["step"] == 1 and losses[1] > 10 * losses[0]
    # Adam's first step moves each element by lr (sign of g): ratio ≈ lr / rms(w) ≫ 0.1
    assert finding.evidence["median_update_ratio"] > 1
    assert "torch.optim.Adam(model.parameters(), lr=" in finding.fix.code
    model = mlp()
    report, alerts, _ = train(model, torch.optim.Adam(model.parameters(), lr=1e-3), 12, mlp_data)
    assert not {"learning-rate-too-high", "update-ratio"} & (set(codes(alerts)) | report.codes())


def test_a_divergence_that_returns_after_clearing_is_named_at_its_own_step() -> None:
    """learning-rate-too-high holds at step 2, clears when loss and norm fall back, and
    holds again at step 8: the second appearance names step 8 and its own numbers, not
    the first episode's (demos/training_nan.py announced "step 10: …" at step 36); the
    final report keeps the run's first."""
    monitor = LearningRateMonitor()
    ratios = {0: {"fc": 0.5}}
    first = monitor.observe(2, ratios, [(0, 1.0), (1, 1.0), (2, 40.0)], [(0, 1.0), (1, 1.0), (2, 8.0)])
    (found,) = [f for f in first if f.code == "learning-rate-too-high"]
    assert found.evidence["step"] == 2
    calm = monitor.observe(5, {}, [(3, 1.0), (4, 1.0), (5, 1.0)], [(3, 1.0), (4, 1.0), (5, 1.0)])
    assert "learning-rate-too-high" not in codes(calm)
    again = monitor.observe(8, {}, [(6, 1.0), (7, 1.0), (8, 90.0)], [(6, 1.0), (7, 1.0), (8, 20.0)])
    (returned,) = [f for f in again if f.code == "learning-rate-too-high"]
    assert returned.evidence["step"] == 8 and returned.message.startswith("step 8: ")
    assert returned.evidence["loss_growth"] == pytest.approx(20.0)
    persisting = monitor.observe(9, {}, [(9, 95.0)], [(9, 21.0)])
    assert [f for f in persisting if f.code == "learning-rate-too-high"] == [returned]  # same episode, same object
    assert [f.evidence["step"] for f in monitor.final_findings() if f.code == "learning-rate-too-high"] == [2]


class _ArgmaxGate(nn.Module):
    """A gate whose score reaches the loss only through ``argmax``: its weight never
    gets a gradient (a router that picks its expert without weighting by it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(20, 32)
        self.gate = nn.Linear(32, 2)
        self.experts = nn.ModuleList([nn.Linear(32, 5), nn.Linear(32, 5)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        pick = self.gate(h).argmax(dim=1, keepdim=True)  # non-differentiable: no gradient to the gate
        return torch.where(pick == 0, self.experts[0](h), self.experts[1](h))


@pytest.mark.parametrize("make_opt", [torch.optim.Adam, torch.optim.SGD])
def test_a_weight_that_never_gets_a_gradient_is_not_advised_a_learning_rate(make_opt) -> None:
    """Its update ratio is exactly 0 at any learning rate: the finding says the graph
    is cut and shows how to find where, instead of a 20000x learning rate; its fix
    code, run in the training loop's context, names the weight."""
    model = _ArgmaxGate()
    opt = make_opt(model.parameters(), lr=1e-2)
    report, _, _ = train(model, opt, 14, mlp_data)
    finding = next(f for f in report.findings if f.code == "update-ratio")
    assert finding.layers == ["gate"]
    assert finding.evidence["no_gradient"] == ["gate"] and finding.evidence["too_small"] == []
    assert "gets no gradient" in finding.message and "learning rate changes that" in finding.message
    assert "learning rate (" not in finding.fix.summary and "lr" not in finding.fix.code
    x, y = mlp_data(0)
    loss = nn.functional.cross_entropy(model(x), y)
    printed: list[object] = []
    exec(finding.fix.code, {"model": model, "torch": torch, "loss": loss, "print": printed.append})
    assert printed == [["gate.weight", "gate.bias"]]


def test_no_gradient_and_a_too_small_rate_get_each_their_own_advice() -> None:
    """One layer cut from the loss and one at a rate whose updates round away: the
    learning-rate group covers only the second."""
    model = _ArgmaxGate()
    opt = torch.optim.SGD(
        [
            {"params": model.inp.parameters(), "lr": 1e-9},  # has a gradient, updates round to 0
            {"params": [*model.gate.parameters(), *model.experts.parameters()]},
        ],
        lr=0.05,
    )
    report, _, _ = train(model, opt, 14, mlp_data)
    finding = next(f for f in report.findings if f.code == "update-ratio")
    assert finding.evidence["too_small"] == ["inp"] and finding.evidence["no_gradient"] == ["gate"]
    assert "barely learn" in finding.message and "gets no gradient" in finding.message
    namespace: dict[str, object] = {"model": model, "torch": torch}
    setup = finding.fix.code.split("\n\n# which weights")[0]  # the learning-rate part
    exec(setup, namespace)
    groups = namespace["optimizer"].param_groups  # type: ignore[attr-defined]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.inp.parameters()}


def test_a_frozen_layer_is_not_an_update_ratio_finding() -> None:
    model = mlp()
    model[0].requires_grad_(False)  # frozen on purpose: no update, no gradient, nothing to say
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    report, _, _ = train(model, opt, 14, mlp_data)
    assert not [f for f in report.findings if f.code == "update-ratio"]


def test_a_weight_whose_gradient_is_exactly_zero_and_only_decays_is_named() -> None:
    """A gradient that exists but is exactly 0 (the gate enters the loss times 0) and
    AdamW's decay: the weight shrinks by lr·λ per step, an update ratio of ~1e-3
    that looks healthy, yet it learns nothing; it is named for its missing gradient."""
    model = _ArgmaxGate()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, y) + 0.0 * model.gate.weight.sum()

    report, _, _ = train(model, opt, 14, mlp_data, loss_fn=loss_fn)
    finding = next(f for f in report.findings if f.code == "update-ratio")
    assert finding.evidence["no_gradient"] == ["gate"]
    ratio = finding.evidence["per_layer"]["gate"]["geometric_mean"]
    assert ratio == pytest.approx(1e-2 * 0.1, rel=0.05)  # lr·λ: decay alone, inside the healthy band
