"""Finite gradients whose float32 squared norm overflows are no NaN/Inf event.

The per-step global norm is a float32 sum of squares, inf above √(float32 max)
≈ 1.8e19 though every element is finite: bf16 autocast under a GradScaler whose
scale grew for ~100k steps (bf16 never overflows, so the scale never halves), or
very large unscaled gradients.  The watch must not stop training there, must
report the true norm (for AutoClip and spikes), and must still stop at a genuine
inf at the same step as before.  The scale is set to 2**70 rather than running
100k steps; the model is a small GPT-2 built from its config.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradscope.errors import GradscopeError
from gradscope.watching import Scope

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

VOCAB, SEQ, BATCH, STEPS = 64, 16, 4, 6
FLOAT32_SQUARE_LIMIT = math.sqrt(torch.finfo(torch.float32).max)  # ≈ 1.8e19


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def true_norm(model: nn.Module, divide: float = 1.0) -> float:
    """The global gradient norm in float64 (what float32 cannot hold above 1.8e19)."""
    squares = sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None)
    return math.sqrt(squares) / divide


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator) for _ in range(STEPS)]


@pytest.mark.parametrize("every", [1, 3])
def test_bf16_gradscaler_after_a_long_run_reports_the_true_norm(every: int) -> None:
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # Where the scale is after ~100k finite bf16 steps (x2 every 2000 from 2**16).
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**70, growth_interval=10**9)
    expected: dict[int, float] = {}
    with Scope(model, every=every, ring=STEPS) as scope:
        for step, ids in enumerate(batches()):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            scaler.scale(loss).backward()
            assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
            scaled = true_norm(model)
            assert scaled > FLOAT32_SQUARE_LIMIT  # the float32 squared norm overflows
            expected[step] = scaled / scaler.get_scale()
            scope.step(opt, scaler=scaler, loss=loss)  # no GradscopeError: nothing is non-finite
            scaler.step(opt)
            scaler.update()
    report = scope.report()
    training = report.analysis["training"]
    assert training["first_nonfinite"] is None and training["skipped_steps"] == 0
    assert not [f for f in report.findings if f.code == "nonfinite"]
    sampled = [s for s in range(STEPS) if s % every == 0]
    norms = {s: n for flush in scope.recent for s, n in flush.global_norms}
    for s in sampled:  # the true unscaled norm, not inf (float32 and float64 sums: 1e-5)
        assert norms[s] == pytest.approx(expected[s], rel=1e-5)
    assert training["norm_overflow_steps"] == len(sampled)
    assert training["clip"]["norms_seen"] >= len(sampled)


@pytest.mark.parametrize("every", [1, 3])
def test_huge_finite_gradients_do_not_stop_training_and_an_inf_still_does(every: int) -> None:
    model = tiny_gpt2()
    poisoned = 4
    expected: list[float] = []
    stopped: list[tuple[int, dict]] = []
    with Scope(model, every=every) as scope:
        for step, ids in enumerate(batches()):
            model.zero_grad()
            # Gradients of ~1e20 (finite in float32, each element); the update is not
            # taken (a frozen check: the weights stay where they are).
            (model(input_ids=ids, labels=ids).loss * 1e20).backward()
            if step == poisoned:
                model.lm_head.weight.grad[3, 7] = float("inf")  # a genuine inf
            else:
                expected.append(true_norm(model))
                assert expected[-1] > FLOAT32_SQUARE_LIMIT
            try:
                scope.step()
            except GradscopeError as error:
                stopped.append((step, dict(error.record or {})))
    # The genuine inf stops the step it happened at, named; the overflows do not.
    assert [s for s, _ in stopped] == [poisoned]
    record = stopped[0][1]
    # lm_head.weight is transformer.wte.weight (tied): named by either owner
    assert record["step"] == poisoned and record["layer"] in ("lm_head", "transformer.wte")
    assert record["role"] == "weight_grad" and record["has_inf"] is True
    training = scope.report().analysis["training"]
    assert training["norm_overflow_steps"] == STEPS - 1
    assert training["global_grad_norm_max"] == pytest.approx(max(expected), rel=1e-5)
    assert training["clip"]["norms_seen"] == STEPS - 1
