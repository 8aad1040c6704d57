"""A non-finite batch caught and skipped is an episode, not the end of the watch.

README "first bad step": gradscope raises at ``scope.step`` before
``optimizer.step()``; a user who catches the error, zeroes the gradients and goes
on trains on unchanged weights.  The watch must then record the bad step
(report, summary, an alert that appears and then clears), leave its statistics
out of every aggregate, and resume at the next finite step with all its signals
(layer statistics, norm history and spikes, update ratios, weights over time),
and name a second bad step again.  A step the GradScaler skips is no
divergence at all.

The model is a small GPT-2 built from its config (no dropout: a skipped batch
then leaves the run exactly where it was), fed through ``inputs_embeds`` so a
batch can be poisoned with one NaN.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch
from torch import nn

from gradscope.errors import GradscopeError
from gradscope.report import Report
from gradscope.watching import Scope
from gradscope.watching.options import DIAGNOSE_EVERY_STEPS

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

STEPS = 30
# Batches with a NaN in their embeddings: sampled steps at every=1, unsampled at
# every=4 (read late, as on CUDA, a sampled step is found after its optimizer.step()
# has already taken the NaN: nothing to skip then, see Scope "Late read").
POISONED = (5, 25)
SPIKE = 19  # a batch whose loss is 1000x: its gradient norm spikes (no error, trained on)
VOCAB, SEQ, BATCH = 64, 16, 4


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=SEQ,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class Run:
    """A watched GPT-2 run whose poisoned batches are caught and skipped, with the
    numbers the test measures on its own (each step's lm_head output absmax)."""

    def __init__(self, every: int, late: bool = False) -> None:
        model = tiny_gpt2()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(1)
        self.every = every
        self.caught: list[tuple[int, dict[str, Any]]] = []
        self.absmax: dict[int, float] = {}  # step -> lm_head output absmax
        current: dict[str, float] = {}
        handle = model.lm_head.register_forward_hook(
            lambda m, a, out: current.__setitem__("absmax", float(out.detach().abs().max()))
        )
        capture = _Capture()
        logger = logging.getLogger("gradscope")
        old_level = logger.level
        logger.addHandler(capture)
        logger.setLevel(logging.INFO)
        try:
            scope = Scope(model, every=every)
            scope.read_late = late  # CUDA's default: each flush is read by the next step
            with scope:
                for step in range(STEPS):
                    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
                    opt.zero_grad()
                    embeds = model.transformer.wte(ids)
                    if step in POISONED:
                        embeds = embeds.clone()
                        embeds[1, 3, 5] = float("nan")
                    loss = model(inputs_embeds=embeds, labels=ids).loss * (1000.0 if step == SPIKE else 1.0)
                    loss.backward()
                    self.absmax[step] = current["absmax"]
                    try:
                        scope.step(opt, loss=loss)
                    except GradscopeError as error:  # the documented way to drop a bad batch
                        self.caught.append((scope.steps - 1, dict(error.record or {})))
                        opt.zero_grad()
                        continue
                    opt.step()
        finally:
            logger.removeHandler(capture)
            logger.setLevel(old_level)
            handle.remove()
        self.scope = scope
        self.report: Report = scope.report()
        self.alerts = [line for line in capture.lines if line.startswith("gradscope step ")]

    def sampled(self, steps: range | list[int]) -> list[int]:
        return [s for s in steps if s % self.every == 0]

    def finite_sampled(self) -> list[int]:
        return [s for s in self.sampled(range(STEPS)) if s not in POISONED]

    def cleared_at(self, bad: int) -> int:
        """The first sampled step after ``bad``: searched whole, finite, it ends the episode."""
        return next(s for s in range(bad + 1, STEPS) if s % self.every == 0)


@pytest.fixture(
    scope="module", params=[(1, False), (4, False), (4, True)], ids=["every1", "every4", "every4-read-late"]
)
def run(request: pytest.FixtureRequest) -> Run:
    every, late = request.param
    return Run(every, late)


def test_each_poisoned_batch_is_caught_and_named(run: Run) -> None:
    # The second bad step has the same guarantees as the first: caught before
    # optimizer.step(), at its own step, naming the layer where the NaN appeared.
    assert [step for step, _ in run.caught] == list(POISONED)
    for step, record in run.caught:
        assert record["step"] == step and record["layer"] == "transformer.drop" and record["role"] == "activation"
    first = run.report.analysis["training"]["first_nonfinite"]
    assert first["step"] == POISONED[0]
    (finding,) = [f for f in run.report.findings if f.code == "nonfinite"]
    assert finding.evidence["step"] == POISONED[0]
    assert finding.evidence["later_nonfinite_steps"] == [POISONED[1]]


def test_the_alert_appears_then_clears_for_each_episode(run: Run) -> None:
    said = [line for line in run.alerts if " nonfinite " in line]
    expected = []
    for bad in POISONED:
        expected += [(bad, "error"), (run.cleared_at(bad), "cleared")]
    got = [(int(line.split()[2].rstrip(":")), "cleared" if " cleared " in line else "error") for line in said]
    assert got == expected, said


def test_statistics_resume_after_the_episode_and_never_hold_the_bad_steps(run: Run) -> None:
    coverage = run.report.run["statistics"]
    merged = run.finite_sampled()
    bad_sampled = run.sampled(list(POISONED))
    assert coverage["diverged_at"] is None
    assert coverage["cleared_episodes"] == [[bad, run.cleared_at(bad)] for bad in POISONED]
    assert coverage["sampled_steps"] == len(merged)
    assert coverage["excluded_sampled_steps"] == len(bad_sampled)
    head = next(layer for layer in run.report.record.layers if layer.name == "lm_head")
    assert head.activation is not None
    # Counts are exact (gradscope.stats), and so are the extremes of activations.
    assert head.activation.count == len(merged) * BATCH * SEQ * VOCAB
    assert head.activation.absmax == pytest.approx(max(run.absmax[s] for s in merged), rel=1e-6)
    for layer in run.report.record.layers:
        for stats in (layer.activation, layer.gradient):
            assert stats is None or stats.nonfinite_count == 0, layer.name


def test_norm_history_spikes_and_clip_resume(run: Run) -> None:
    training = run.report.analysis["training"]
    # Every finite step's global norm, before and after the episodes (the bad ones are NaN).
    assert training["clip"]["norms_seen"] == STEPS - len(POISONED)
    assert training["nonfinite_norm_steps"] == len(POISONED)
    assert training["spike_steps"] == [SPIKE]
    read_at = next(s for s in range(SPIKE, STEPS) if s % run.every == 0)  # the flush that reads its norm
    assert any(line.startswith(f"gradscope step {read_at}:") and "gradient-spike" in line for line in run.alerts)
    assert "diverged" not in " ".join(run.report.record.notes)


def test_update_ratios_and_weights_over_time_resume(run: Run) -> None:
    ratios = run.report.analysis["training"]["update_ratio"]
    # A ratio per finite sampled step (the last one's arrives at close); the bad
    # sampled step's batch was skipped (ratio 0) and is left out.
    assert ratios["lm_head"]["samples"] == len(run.finite_sampled())
    assert ratios["lm_head"]["last"] > 0
    trajectory = run.report.analysis["regularisation"]["weights"]["transformer.h.1.mlp.c_fc.weight"]["trajectory"]
    # Measured at the diagnosis cadence (sampled steps at least DIAGNOSE_EVERY_STEPS
    # apart), at finite steps, before and after the episodes.
    expected: list[int] = []
    for step in run.finite_sampled():
        if not expected or step - expected[-1] >= DIAGNOSE_EVERY_STEPS:
            expected.append(step)
    assert [int(step) for step, _ in trajectory] == expected and expected[-1] > POISONED[0]
    assert all(math.isfinite(norm) for _, norm in trajectory)


def test_a_run_that_diverges_for_good_still_stops_its_aggregates() -> None:
    # Not caught: optimizer.step() takes the NaN gradients, every later step is
    # non-finite, the episode never clears, and the aggregate stops at the first.
    model = tiny_gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    with Scope(model, every=2, raise_on=()) as scope:
        for step in range(12):
            ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
            opt.zero_grad()
            embeds = model.transformer.wte(ids)
            if step == 5:
                embeds = embeds.clone()
                embeds[0, 0, 0] = float("nan")
            model(inputs_embeds=embeds, labels=ids).loss.backward()
            scope.step(opt)
            opt.step()
    coverage = scope.report().run["statistics"]
    assert coverage["diverged_at"] == 5 and coverage["cleared_episodes"] == []
    assert coverage["sampled_steps"] == 3  # steps 0, 2, 4
    assert coverage["excluded_sampled_steps"] == 3  # steps 6, 8, 10


def test_a_gradscaler_skipped_step_is_no_divergence() -> None:
    # An inf gradient under a GradScaler is what the scaler is for: it skips the
    # step and halves its scale.  gradscope counts it, raises nothing, and keeps
    # every signal (torch.amp.GradScaler on the CPU behaves as on CUDA).
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    generator = torch.Generator().manual_seed(1)
    with Scope(model, every=2) as scope:
        for step in range(12):
            ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            scaler.scale(loss).backward()
            if step in (4, 7):
                model.lm_head.weight.grad[0, 0] = float("inf")
            scope.step(opt, scaler=scaler, loss=loss)
            scaler.step(opt)
            scaler.update()
    report = scope.report()
    training = report.analysis["training"]
    assert training["first_nonfinite"] is None and training["skipped_steps"] == 2
    assert not [f for f in report.findings if f.code == "nonfinite"]
    coverage = report.run["statistics"]
    assert coverage["steps"] == "all" and coverage["diverged_at"] is None and coverage["sampled_steps"] == 6
    assert training["clip"]["norms_seen"] == 12 - 2
