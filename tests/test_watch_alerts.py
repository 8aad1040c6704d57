"""Alerts with state: one line when a finding appears, escalates, moves or clears,
independent of the sampling rate and of the diagnosis cadence; every alert of a
step in one TensorBoard text entry; the run summary at close."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from gradscope.report import Finding, Severity
from gradscope.watching import Scope
from gradscope.watching.alerts import AlertTracker, first_sentence


class Peak(nn.Module):
    """An output whose absolute maximum is exactly ``target`` (detached: the rest of
    the network and the gradients never see it), to drive the fp16 range rule."""

    def __init__(self) -> None:
        super().__init__()
        self.target = 1.0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.detach()
        return h * (self.target / h.abs().max())


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.side = Peak()
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        self.side(h)
        return self.out(torch.tanh(h))


def target_at(step: int) -> float:
    """1 (healthy), then within one binade of fp16's 65504 (warning), then past it
    (error), then healthy again."""
    if 20 <= step < 40:
        return 4.0e4
    if 40 <= step < 60:
        return 1.0e5
    return 1.0


def run(every: int, steps: int = 70, log_dir: str | None = None) -> tuple[list[str], Scope]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # frozen weights: no update-ratio story
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("gradscope step"):
                lines.append(message)

    handler = Collect()
    logger = logging.getLogger("gradscope")
    logger.addHandler(handler)
    try:
        with Scope(model, every=every, log_dir=log_dir) as scope:
            for step in range(steps):
                model.side.target = target_at(step)
                g = torch.Generator().manual_seed(step)
                x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                scope.step(opt, loss=loss)
                opt.step()
    finally:
        logger.removeHandler(handler)
    return lines, scope


def test_alerts_are_the_same_at_every_5_and_every_10_and_escalate() -> None:
    five, scope5 = run(5)
    ten, _ = run(10)
    assert five == ten  # the same lines: the diagnosis cadence, not the sampling, decides
    overflow = [line for line in five if "fp16-overflow" in line]
    assert len(overflow) == 3, overflow
    appeared, escalated, cleared = overflow
    assert appeared.startswith("gradscope step 20: ▲ fp16-overflow [side] warning: ")
    assert "within one binade" in appeared and appeared.endswith("(details: scope.report())")
    assert escalated.startswith("gradscope step 40: ✖ fp16-overflow [side] escalated warning → error: ")
    assert cleared == "gradscope step 60: ✓ fp16-overflow [side] cleared (active since step 20)"
    assert all(len(line) <= 250 for line in five)
    counts = scope5._tracker.counts
    assert counts["escalated"] >= 1 and counts["cleared"] >= 1


def test_all_alerts_of_a_step_are_one_tensorboard_text_entry(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines, _ = run(10, log_dir=str(tmp_path))
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    tag = "gradscope/alerts/text_summary"
    assert tag in acc.Tags()["tensors"]
    events = acc.Tensors(tag)
    steps = [event.step for event in events]
    assert len(steps) == len(set(steps))  # one entry per step
    texts = {event.step: event.tensor_proto.string_val[0].decode() for event in events}
    by_step: dict[int, list[str]] = {}
    for line in lines:
        step = int(line.split()[2].rstrip(":"))
        by_step.setdefault(step, []).append(line)
    assert set(by_step) == set(texts)
    for step, step_lines in by_step.items():
        for line in step_lines:
            code = line.split()[4]  # "gradscope step N: <mark> <code> ..."
            assert f"`{code}`" in texts[step]
        assert texts[step].count("\n- ") + texts[step].startswith("- ") >= len(step_lines) - 1
    assert "escalated warning → error" in texts[40]
    assert all(str(tmp_path) in line for line in lines if "cleared" not in line)  # where the details are


def test_a_finding_not_re_evaluated_is_not_cleared() -> None:
    tracker = AlertTracker()
    warning = Finding("dead-units", Severity.WARNING, ["a"], "many dead units", {})
    error = Finding("dead-units", Severity.ERROR, ["a"], "most units dead", {})
    assert [a.kind for a in tracker.observe(0, {"training": [], "diagnosis": [warning]})] == ["appeared"]
    # flushes in between run the training rules only: the diagnosis finding stays active
    assert tracker.observe(5, {"training": [], "nonfinite": []}) == []
    assert [a.kind for a in tracker.observe(10, {"diagnosis": [error]})] == ["escalated"]
    assert tracker.observe(15, {"diagnosis": [warning]}) == []  # de-escalation is not news
    moved = tracker.observe(20, {"diagnosis": [Finding("dead-units", Severity.WARNING, ["a", "b"], "m", {})]})
    assert [(a.kind, a.previous) for a in moved] == [("moved", "a")]
    assert [a.kind for a in tracker.observe(30, {"diagnosis": []})] == ["cleared"]


def test_on_finding_does_not_silence_the_log(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Finding] = []
    torch.manual_seed(0)
    model = Net()
    with caplog.at_level(logging.WARNING, logger="gradscope"):
        with Scope(model, every=1, on_finding=seen.append) as scope:
            for step in range(21):
                model.side.target = 4.0e4 if step >= 20 else 1.0
                model(torch.randn(8, 6)).sum().backward()
                scope.step()
    assert [f.code for f in seen] == ["fp16-overflow"]
    logged = [r.getMessage() for r in caplog.records if "fp16-overflow" in r.getMessage()]
    assert logged and logged[0].startswith("gradscope step 20:")


def test_the_run_summary_is_printed_at_close(caplog: pytest.LogCaptureFixture, tmp_path) -> None:
    with caplog.at_level(logging.WARNING, logger="gradscope"):
        run(10, steps=50, log_dir=str(tmp_path))
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("gradscope run summary"))
    assert "50 steps (every=10, 5 sampled, tier full)" in summary
    assert "first non-finite: none" in summary and "gradient spikes: none" in summary
    assert "1 errors" in summary or "errors" in summary
    assert "fp16-overflow" in summary
    assert f"tensorboard --logdir {tmp_path}" in summary


def test_first_sentence_keeps_numbers_and_cuts_long_text() -> None:
    assert first_sentence("the output of side reaches 1e+05, which exceeds 65504. Keep it in fp32.") == (
        "the output of side reaches 1e+05, which exceeds 65504"
    )
    assert first_sentence("values of 1.5e3 and 2.5 here") == "values of 1.5e3 and 2.5 here"
    assert len(first_sentence("x" * 500)) == 110


def test_information_is_logged_at_info_and_a_move_names_few_layers(caplog: pytest.LogCaptureFixture) -> None:
    """A healthy fp32 BERT run printed six fp16-underflow *information* lines as
    warnings, one over 900 characters: a move listed every previous layer."""
    from gradscope.watching.alerts import Alert
    from gradscope.watching.announce import Announcer

    many = [f"bert.encoder.layer.{i}.attention.output.dense" for i in range(14)]
    info = Finding(code="fp16-underflow", severity=Severity.INFO, layers=many[:2], message="values would flush to zero")
    warning = Finding(code="exploding-gradient", severity=Severity.WARNING, layers=["a"], message="grows")
    announcer = Announcer(writer=None, on_finding=None)
    with caplog.at_level(logging.DEBUG, logger="gradscope"):
        announcer.announce(Alert("moved", 5, info, ", ".join(many)), "scope.report()")
        announcer.announce(Alert("appeared", 5, warning), "scope.report()")
    levels = [record.levelno for record in caplog.records]
    assert levels == [logging.INFO, logging.WARNING]
    moved = caplog.records[0].getMessage()
    assert "+11" in moved and many[5] not in moved and len(moved) < 400, moved


@pytest.mark.parametrize("every", [1, 5])
def test_raise_on_a_spike_stops_at_its_step_without_clearing_it(every: int, caplog: pytest.LogCaptureFixture) -> None:
    """raise_on=("gradient-spike",): at every=5 the run stopped at the next sampled
    step (25, three updates after the spike at 22, the spiky one included); at every=1
    the console said the spike had cleared, at its own step, right before stopping on it."""
    import gradscope
    from gradscope.errors import GradscopeError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    target = torch.randn(8, 1)
    weights_at: dict[int, torch.Tensor] = {}
    with caplog.at_level(logging.INFO, logger="gradscope"), pytest.raises(GradscopeError) as info:
        with gradscope.watch(model, every=every, raise_on=("gradient-spike",)) as scope:
            for step in range(40):
                x = torch.randn(32, 8)
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), x @ target) * (1000.0 if step == 22 else 1.0)
                loss.backward()
                weights_at[step] = model[0].weight.detach().clone()
                scope.step(opt, loss=loss)
                opt.step()
    assert "step 22" in str(info.value) and max(weights_at) == 22
    assert torch.equal(model[0].weight, weights_at[22])  # the spike's update was never applied
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("gradscope step")]
    assert any("gradient-spike" in line and "warning" in line for line in lines)
    assert not any("gradient-spike" in line and "cleared" in line for line in lines), lines
    assert scope.closed
