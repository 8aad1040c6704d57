"""A watched run that goes non-finite at step k is reported from its statistics
before k: the layer table, the diagnosis, its advice and the clip threshold
never read the diverged steps (NaN/inf or the blow-up's numbers), and after k
only the nonfinite finding speaks in the live alerts."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import pytest
import torch
from torch import nn

from gradscope.render import render
from gradscope.report import Report
from gradscope.training import clip_advice
from gradscope.watching import Scope
from gradscope.watching.norms import NormHistogram

STEPS = 50


def make_problem() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    x = torch.randn(64, 8, generator=generator)
    return model, x, x @ torch.randn(8, 1, generator=generator)


class Run:
    """One watched run of the diverging MLP, with the numbers the test knows on its own."""

    def __init__(self, every: int, lr_growth: float, raise_on: tuple[str, ...] = (), late: bool = False) -> None:
        model, x, y = make_problem()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.norms: list[float] = []  # the global gradient norm of each step, as clip_grad_norm_ computes it
        self.losses: list[float] = []
        self.finite: list[bool] = []  # every gradient element of the step finite
        self.absmax: list[dict[str, float]] = []  # each step's activation absmax per Linear layer
        self.alerts: list[str] = []
        current: dict[str, float] = {}

        def hook(name: str):
            def record(module: nn.Module, args: Any, out: torch.Tensor) -> None:
                current[name] = float(out.detach().abs().max())

            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        capture = _Capture(self.alerts)
        logger = logging.getLogger("gradscope")
        logger.addHandler(capture)
        try:
            scope = Scope(model, every=every, raise_on=raise_on)
            scope.read_late = late  # CUDA's default: each flush is read by the next one
            with scope:
                for step in range(STEPS):
                    for group in opt.param_groups:
                        group["lr"] = 0.01 * lr_growth**step
                    opt.zero_grad()
                    current.clear()
                    loss = nn.functional.mse_loss(model(x), y)
                    loss.backward()
                    grads = [p.grad.detach() for p in model.parameters()]
                    # float64: the run's last finite steps have norms above float32's 1.8e19
                    # limit for a sum of squares, which are no NaN/Inf (gradscope.watching.overflow)
                    self.norms.append(math.sqrt(sum(float(g.double().square().sum()) for g in grads)))
                    self.finite.append(all(bool(torch.isfinite(g).all()) for g in grads))
                    self.losses.append(float(loss.detach()))
                    self.absmax.append(dict(current))
                    scope.step(opt, loss=loss)
                    opt.step()
        except Exception:
            pass  # raise_on stops the run: the report is still built
        finally:
            logger.removeHandler(capture)
            for handle in handles:
                handle.remove()
        self.scope = scope
        self.report: Report = scope.report()
        self.every = every
        self.late = late


class _Capture(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def measurable_norms(run: Run, k: int) -> list[float]:
    """The norms of the steps before ``k`` as the watch can know them: a norm whose
    float32 square overflowed is measured again when its step is read at once (not
    a sampled step read one flush late: its gradients are gone), else it stays inf."""
    limit = math.sqrt(torch.finfo(torch.float32).max)
    return [
        math.inf if run.late and step % run.every == 0 and norm >= limit else norm
        for step, norm in enumerate(run.norms[:k])
    ]


def first_nonfinite_step(run: Run) -> int:
    pairs = enumerate(zip(run.finite, run.losses, strict=True))
    return next(i for i, (ok, loss) in pairs if not (ok and math.isfinite(loss)))


def numbers(value: Any) -> list[float]:
    """Every number in a JSON value (json_safe writes non-finite floats as strings)."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return [float(value)]
    return []


@pytest.fixture(
    scope="module",
    params=[(1, (), False), (10, (), False), (10, ("nonfinite",), False), (10, (), True), (1, (), True)],
    ids=["every1", "every10", "every10-stops", "every10-read-late", "every1-read-late"],
)
def diverged(request: pytest.FixtureRequest) -> Run:
    logging.getLogger("gradscope").setLevel(logging.WARNING)
    every, raise_on, late = request.param
    return Run(every=every, lr_growth=1.15, raise_on=raise_on, late=late)


def test_the_run_diverges_where_the_report_says(diverged: Run) -> None:
    k = first_nonfinite_step(diverged)
    assert 10 < k < STEPS - 5  # the constructed run has a history before it and steps after it
    nonfinite = [f for f in diverged.report.findings if f.code == "nonfinite"]
    assert len(nonfinite) == 1 and nonfinite[0].evidence["step"] == k
    coverage = diverged.report.run["statistics"]
    assert coverage["diverged_at"] == k
    sampled_before = len([s for s in range(k) if s % diverged.every == 0])
    assert coverage["sampled_steps"] == sampled_before
    ran = diverged.scope.steps  # raise_on stops the run at step k
    assert ran == (k + 1 if "nonfinite" in diverged.scope.raise_on else STEPS)
    assert coverage["excluded_sampled_steps"] == len([s for s in range(k, ran) if s % diverged.every == 0])


def test_the_same_layer_is_named_at_every_rate() -> None:
    runs = [Run(every=e, lr_growth=1.15) for e in (1, 10)]
    first = [r.report.analysis["training"]["first_nonfinite"] for r in runs]
    assert first[0]["step"] == first[1]["step"]
    assert first[0].get("layer") == first[1].get("layer")


def test_layer_statistics_stop_before_the_divergence(diverged: Run) -> None:
    k = first_nonfinite_step(diverged)
    sampled = [s for s in range(k) if s % diverged.every == 0]
    for layer in diverged.report.record.layers:
        if layer.type != "Linear":
            continue
        expected = max(diverged.absmax[s][layer.name] for s in sampled)
        assert layer.activation is not None
        assert layer.activation.absmax == pytest.approx(expected, rel=1e-5)
        for stats in layer.stats.values():
            assert stats.nonfinite_count == 0


def test_no_finding_reads_a_diverged_number(diverged: Run) -> None:
    k = first_nonfinite_step(diverged)
    finite_before = max(n for n in measurable_norms(diverged, k) if math.isfinite(n))
    for finding in diverged.report.to_dict()["findings"]:
        values = numbers(finding["evidence"])
        if finding["code"] == "nonfinite":
            continue  # it names the non-finite value itself
        assert all(math.isfinite(v) for v in values), finding["code"]
        assert "max_norm=5.0" not in (finding["fix"] or {}).get("code", ""), finding["code"]
        # no global norm of the steps after k (they are NaN, or larger than any before it)
        norm_values = [v for key, v in finding["evidence"].items() if "norm" in key and isinstance(v, float)]
        assert all(v <= finite_before * (1 + 1e-6) for v in norm_values), finding["code"]
    training = diverged.report.to_dict()["analysis"]["training"]
    assert training["global_grad_norm_max"] == pytest.approx(finite_before, rel=1e-4)


def test_every_clip_threshold_is_the_autoclip_of_the_norms_before_the_divergence(diverged: Run) -> None:
    k = first_nonfinite_step(diverged)
    history = NormHistogram()
    for norm in measurable_norms(diverged, k):
        history.add(norm)
    expected = clip_advice(history)
    assert expected is not None
    clip = diverged.report.analysis["training"]["clip"]
    assert clip["threshold"] == expected["threshold"] and clip["norms_seen"] == history.count
    text = render(diverged.report, "table", width=120)
    thresholds = {float(v) for v in re.findall(r"max_norm=([0-9.e+-]+)", text)}
    assert thresholds == {float(f"{expected['threshold']:.4g}")}
    said = {float(v) for v in re.findall(r"clip the global (?:gradient )?norm at ([0-9.e+-]+)", text)}
    assert said and all(v == pytest.approx(expected["threshold"], rel=2e-3) for v in said)


def test_after_the_divergence_only_the_nonfinite_finding_speaks(diverged: Run) -> None:
    k = first_nonfinite_step(diverged)
    alerts = [line for line in diverged.alerts if line.startswith("gradscope step ")]
    later = [line for line in alerts if int(line.split()[2].rstrip(":")) >= k]
    assert later and all(" nonfinite " in line for line in later), later
    others = [line for line in alerts if " nonfinite " not in line]
    assert others and all(int(line.split()[2].rstrip(":")) < k for line in others)  # none appears or clears later


def test_the_report_says_which_steps_its_statistics_cover(diverged: Run) -> None:
    k = first_nonfinite_step(diverged)
    text = render(diverged.report, "table", width=120)
    assert f"stats  steps before {k}" in text
    loss_scale = text[text.index("Loss scale") :].split("\n\n")[0] if "Loss scale" in text else ""
    if loss_scale:
        assert f"before step {k}" in loss_scale and "nan" not in loss_scale and "inf" not in loss_scale


def test_a_healthy_run_covers_every_step() -> None:
    healthy = Run(every=10, lr_growth=1.0)
    assert all(math.isfinite(n) for n in healthy.norms)
    coverage = healthy.report.run["statistics"]
    assert coverage == {
        "steps": "all",
        "sampled_steps": STEPS // 10,
        "diverged_at": None,
        "excluded_sampled_steps": 0,
        "cleared_episodes": [],
    }
    text = render(healthy.report, "table", width=120)
    assert "stats " not in text and "diverged" not in text
    assert healthy.report.analysis["training"]["clip"]["norms_seen"] == STEPS


def test_one_finding_per_run_level_code(diverged: Run) -> None:
    # the update ratio is one finding per run whose layers move (DESIGN.md), not one per layer set seen
    codes = [f.code for f in diverged.report.findings]
    for code in ("update-ratio", "learning-rate-too-high", "gradient-spike", "nonfinite"):
        assert codes.count(code) <= 1, codes
    if diverged.every == 1:  # enough update ratios for the rule; its layers moved during the run
        assert "update-ratio" in codes
