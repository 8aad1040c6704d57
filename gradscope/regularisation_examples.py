"""The lecture's regularisation slides as built-in examples (``gradscope demo weight-decay|l1|dropout|early-stopping``).

- ``weight-decay``: a 10-unit network (the slide's "10 units, weight decay 0.02"): the
  optimizer audit flags ``Adam(weight_decay=…)`` (L2 coupled into an adaptive step) and
  decayed biases; its parameter-group snippet, executed, clears both; trained with
  SGD and λ = 0.02, the decay multiplies the weights by 1 − ηλ per step and the weights
  end smaller than without it.
- ``l1``: a sparse regression with an L1 penalty in the loss (subgradient): weights
  pile up near zero, none exactly zero (``l1-not-sparse``); the proximal step
  ``S_ηλ`` (``gradscope.fix.soft_threshold_``) makes them exactly zero.
- ``dropout``: ``E[x'] = x`` in training within the binomial sampling error, the
  identity at inference; evaluation under ``torch.no_grad()`` without ``model.eval()``
  is ``train-mode-inference``, with ``model.eval()`` it is not.
- ``early-stopping``: a big network on 12 noisy points overfits; gradscope names the
  best step; with ``stop_on=("overfitting",)`` training stops there and the checkpoint
  kept at the best step has the best validation loss.

Each runner takes the examples' printer and returns an ``Outcome`` (see ``gradscope.examples``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradscope.examples import Outcome

REGULARISATION_EXAMPLES: dict[str, str] = {
    "weight-decay": "a 10-unit net with Adam(weight_decay): coupled L2 and decayed biases; AdamW groups; (1 − ηλ)",
    "l1": "L1 in the loss never reaches zero (l1-not-sparse); the soft-threshold step S_ηλ does",
    "dropout": "dropout's E[x'] = x in training, none at inference; a forgotten model.eval() (train-mode-inference)",
    "early-stopping": "a big net on 12 points overfits; gradscope names the best step and stops there",
}

_SECTIONS = ("findings", "summary")
SEED = 0


def _quiet(**kwargs: Any) -> dict[str, Any]:
    return dict(raise_on=(), on_finding=lambda finding: None, **kwargs)


def _ten_unit_problem() -> tuple[Any, Any]:
    """Two interleaved half-moons (200 points), the classic picture for a 10-unit net."""
    import torch

    g = torch.Generator().manual_seed(SEED)
    t = torch.rand(200, generator=g) * math.pi
    label = torch.arange(200) % 2
    x = torch.stack([torch.cos(t) + label, torch.sin(t) * (1 - 2 * label) + 0.5 * label], dim=1)
    return x + 0.15 * torch.randn(200, 2, generator=g), label


def _ten_unit_net() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(2, 10), nn.Tanh(), nn.Linear(10, 2))


def example_weight_decay(out: Any) -> Outcome:
    import torch
    from torch import nn

    from gradscope.auditing import audit
    from gradscope.examples import Outcome, _check, _verdict

    outcome = Outcome("weight-decay", {"weight-decay"})
    out.title("weight-decay: a 10-unit network, the lecture's θ ← (1 − ηλ)θ − η∂ℓ/∂θ")
    model = _ten_unit_net()
    x, y = _ten_unit_problem()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.02)
    out.text("optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.02)")
    before = audit(model, x, loss=lambda o: nn.functional.cross_entropy(o, y), optimizer=opt)
    out.report(before, _SECTIONS)
    outcome.before["adam"] = before
    _check(outcome, "before", before, present=outcome.expected)

    fix = next(f.fix for f in before.findings if f.code == "weight-decay" and f.fix and "AdamW" in f.fix.code)
    out.text("Fix: the finding's snippet, executed on this model:")
    out.text("\n".join("    " + line for line in fix.code.splitlines()))
    namespace: dict[str, Any] = {"torch": torch, "model": model}
    exec(compile(fix.code, "<gradscope fix>", "exec"), namespace)
    after = audit(model, x, loss=lambda o: nn.functional.cross_entropy(o, y), optimizer=namespace["optimizer"])
    out.text("After the fix:")
    out.report(after, _SECTIONS)
    outcome.after["adamw-groups"] = after
    _check(outcome, "after", after, absent=outcome.expected)

    lr, steps = 0.5, 300
    out.text(
        f"The slide: the same net trained {steps} steps with SGD(lr={lr}), without and with weight decay "
        f"λ = 0.02 (ηλ = {lr * 0.02:g}: each step first multiplies the weights by {1 - lr * 0.02:g})."
    )
    norms = {}
    for decay in (0.0, 0.02):
        net = _ten_unit_net()
        sgd = torch.optim.SGD(net.parameters(), lr=lr, weight_decay=decay)
        from gradscope.watching import watch

        with watch(net, every=25, **_quiet()) as scope:
            for _ in range(steps):
                sgd.zero_grad()
                loss = nn.functional.cross_entropy(net(x), y)
                loss.backward()
                scope.step(sgd, loss=loss)
                sgd.step()
        regularisation = scope.report().analysis["regularisation"]
        track = regularisation["weights"]["0.weight"]
        group = regularisation["optimizer"]["groups"][0]
        norms[decay] = (track["norm_first"], track["norm_last"])
        out.text(
            f"  λ={decay:<5g} 1−ηλ={group['decay_factor_per_step']:<5.4g} ‖W1‖ {track['norm_first']:.3g} → "
            f"{track['norm_last']:.3g}, decay's share of a step {track['decay_share'] or 0:.0%}"
        )
    if not norms[0.02][1] < norms[0.0][1]:
        outcome.problems.append("weight decay did not leave smaller weights than no decay")
    outcome.extra["norms"] = norms
    _verdict(out, outcome)
    return outcome


def sparse_regression(proximal: bool, steps: int = 200) -> tuple[Any, Any]:
    """y = X·w* + N(0, 0.5²), 8 of 64 inputs relevant; L1 λ = 0.1 in the loss or as S_ηλ."""
    import torch
    from torch import nn

    import gradscope.fix
    from gradscope.watching import watch

    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=g)
    w_true = torch.zeros(2, 64)
    w_true[:, :8] = torch.randn(2, 8, generator=g).sign()
    y = x @ w_true.T + 0.5 * torch.randn(256, 2, generator=g)
    linear = nn.Linear(64, 2)
    model = nn.Sequential(linear)
    lr, lam = 0.02, 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with watch(model, every=25, **_quiet()) as scope:
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if not proximal:
                loss = loss + lam * linear.weight.abs().sum() / 2
            loss.backward()
            scope.step(opt, loss=loss)
            opt.step()
            if proximal:
                gradscope.fix.soft_threshold_(model, lam=lr * lam / 2)
    return scope.report(), model


def example_l1(out: Any) -> Outcome:
    from gradscope.examples import Outcome, _check, _verdict

    outcome = Outcome("l1", {"l1-not-sparse"})
    out.title("l1: L1 by subgradient vs the soft-threshold (proximal) step S_ηλ")
    out.text("loss = mse(model(x), y) + λ·|W|: a sparse regression, 8 of 64 inputs matter.")
    before, _ = sparse_regression(proximal=False)
    out.report(before, _SECTIONS)
    outcome.before["subgradient"] = before
    _check(outcome, "before", before, present=outcome.expected)
    out.text("Fix: no L1 term in the loss; after each optimizer.step():")
    out.text("    gradscope.fix.soft_threshold_(model, lam=lr * l1_lambda)")
    after, model = sparse_regression(proximal=True)
    out.report(after, _SECTIONS)
    outcome.after["proximal"] = after
    _check(outcome, "after", after, absent=outcome.expected)
    for label, report in (("subgradient", before), ("proximal", after)):
        w = report.analysis["regularisation"]["weights"]["0.weight"]
        out.text(
            f"  {label:<12} exactly zero {w['zero_frac']:6.1%}   near zero (0 < |w| < "
            f"{w['near_zero_tolerance']:.2g}) {w['near_zero_frac']:6.1%}"
        )
    exact = (model[0].weight == 0).float().mean().item()
    reported = after.analysis["regularisation"]["weights"]["0.weight"]["zero_frac"]
    if exact < 0.5 or reported < 0.5:
        outcome.problems.append(f"the proximal step left only {exact:.0%} exact zeros")
    _verdict(out, outcome)
    return outcome


def example_dropout(out: Any) -> Outcome:
    import torch
    from torch import nn

    from gradscope.auditing import audit
    from gradscope.examples import Outcome, _check, _verdict
    from gradscope.watching import watch

    outcome = Outcome("dropout", {"train-mode-inference"})
    p = 0.5
    out.title(f"dropout: x' = 0 w.p. p, x/(1−p) otherwise (p = {p}); none at inference")
    torch.manual_seed(SEED)
    layer = nn.Sequential(nn.Linear(16, 256), nn.Dropout(p))
    for mode in ("train", "eval"):
        report = audit(layer, input_shape=(256, 16), loss="mean", mode=mode)
        x, x2 = report.record.layer("0").activation, report.record.layer("1").activation
        assert x is not None and x2 is not None  # both layers ran forward
        sigma = math.sqrt(p / (1 - p) * x.rms**2 / x.count) if mode == "train" else 0.0
        out.text(
            f"  {mode:<5}: mean(x) = {x.mean:+.5f}   mean(x') = {x2.mean:+.5f}   zeros {x2.zero_frac:5.1%}"
            + (f"   |Δ| ≤ 5σ = {5 * sigma:.5f} (σ² = p/(1−p)·E[x²]/n)" if mode == "train" else "   (identity)")
        )
        if mode == "train" and abs(x2.mean - x.mean) > 5 * sigma:
            outcome.problems.append("E[x'] = x failed beyond 5 sigma")
        if mode == "eval" and x2.mean != x.mean:
            outcome.problems.append("dropout was not the identity at inference")

    reports = {}
    for evaluate in ("forgotten", "eval"):
        torch.manual_seed(SEED)
        model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(p), nn.Linear(64, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(SEED)
        xs, ys, xv = torch.randn(64, 8, generator=g), torch.randn(64, 2, generator=g), torch.randn(64, 8, generator=g)
        with watch(model, every=5, **_quiet()) as scope:
            for step in range(20):
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(xs), ys)
                loss.backward()
                scope.step(opt, loss=loss)
                opt.step()
                if step % 5 == 4:
                    if evaluate == "eval":
                        model.eval()
                    with torch.no_grad():
                        model(xv)
                    model.train()
        reports[evaluate] = scope.report()
    out.text("Validation every 5 steps under torch.no_grad(), model left in training mode:")
    out.report(reports["forgotten"], _SECTIONS)
    outcome.before["forgotten"] = reports["forgotten"]
    _check(outcome, "before", reports["forgotten"], present=outcome.expected)
    out.text("Fix: model.eval() before validating, model.train() after:")
    out.report(reports["eval"], _SECTIONS)
    outcome.after["eval"] = reports["eval"]
    _check(outcome, "after", reports["eval"], absent=outcome.expected)
    _verdict(out, outcome)
    return outcome


def overfitting_run(stop: bool, steps: int = 300) -> tuple[Any, list[tuple[int, float]], Any]:
    """sin(2x) + noise, 12 training points, a 2 x 128 tanh MLP with Adam; validation every 10 steps.
    Keeps the checkpoint of the best validation loss, as gradscope's fix says."""
    import copy

    import torch
    from torch import nn

    from gradscope.errors import GradscopeError
    from gradscope.watching import watch

    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    xt = torch.rand(12, 1, generator=g) * 4 - 2
    xv = torch.rand(256, 1, generator=g) * 4 - 2
    yt = torch.sin(2 * xt) + 0.3 * torch.randn(12, 1, generator=g)
    yv = torch.sin(2 * xv) + 0.3 * torch.randn(256, 1, generator=g)
    model = nn.Sequential(nn.Linear(1, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    history: list[tuple[int, float]] = []
    best: tuple[float, Any] = (math.inf, None)
    stop_on = ("overfitting",) if stop else ()
    with watch(model, every=10, stop_on=stop_on, **_quiet()) as scope:
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
                        val = nn.functional.mse_loss(model(xv), yv).item()
                    model.train()
                    history.append((i + 1, val))
                    if val < best[0]:
                        best = (val, copy.deepcopy(model.state_dict()))
                    scope.validation(val)
        except GradscopeError:
            pass
    model.load_state_dict(best[1])
    model.eval()
    with torch.no_grad():
        restored = nn.functional.mse_loss(model(xv), yv).item()
    return scope.report(), history, restored


def example_early_stopping(out: Any) -> Outcome:
    from gradscope.examples import Outcome, _check, _verdict

    outcome = Outcome("early-stopping", {"overfitting"})
    out.title("early-stopping: 12 noisy points, a 2 x 128 MLP, validation on 256 held-out points")
    before, history, _ = overfitting_run(stop=False)
    out.report(before, _SECTIONS)
    outcome.before["300 steps"] = before
    _check(outcome, "before", before, present=outcome.expected)
    for step, val in history[:: max(1, len(history) // 8)]:
        out.text(f"  step {step:>3}  validation loss {val:.4f}")
    found = next((f for f in before.findings if f.code == "overfitting"), None)
    out.text("Fix: watch(..., stop_on=('overfitting',)) and keep the checkpoint of the best step:")
    stopped, stopped_history, restored = overfitting_run(stop=True)
    last = stopped_history[-1][0] if stopped_history else 0
    best_step = found.evidence["best_step"] if found else None
    best_loss = min(v for _, v in stopped_history)
    out.text(
        f"  stopped after step {last} instead of 300; best step {best_step}; the restored checkpoint's "
        f"validation loss {restored:.4f} (best seen {best_loss:.4f}, at the end of the full run "
        f"{history[-1][1]:.4f})"
    )
    outcome.extra["stopped_report"] = stopped  # still says overfitting: the fix is where training ended
    if not last < history[-1][0]:
        outcome.problems.append("stop_on did not stop training early")
    if not restored <= history[-1][1] or abs(restored - best_loss) > 1e-6 * max(1.0, best_loss):
        outcome.problems.append("the kept checkpoint is not the best one")
    if found is None or abs(found.evidence["best_step"] - min(history, key=lambda h: h[1])[0]) > 50:
        outcome.problems.append("the best step is not within the patience window of the true minimum")
    _verdict(out, outcome)
    return outcome


REGULARISATION_RUNNERS = {
    "weight-decay": example_weight_decay,
    "l1": example_l1,
    "dropout": example_dropout,
    "early-stopping": example_early_stopping,
}
