"""The built-in examples: each reaches the course's lesson, and the fix removes the finding.

The numbers are checked against closed-form theory, not against what the
examples print: the backward gain of ∂ℓ/∂h per Linear(n, n) → ReLU layer is
sqrt(n·Var[w]/2) (He et al. 2015), and the loss scale 2^k is the largest that
keeps the largest gradient below fp16's maximum with one binade to spare.
"""

from __future__ import annotations

import math

import pytest
import torch

from gradscope import examples
from gradscope.errors import InputError
from gradscope.examples import EXAMPLES, PREDICTED_GAIN, Outcome, gradient_gain, run_demo, run_example
from gradscope.regularisation_examples import REGULARISATION_EXAMPLES

WIDTH = 80
# The numerical-stability examples; the regularisation ones are tested in test_regularisation_examples.py.
STABILITY = [name for name in EXAMPLES if name not in REGULARISATION_EXAMPLES]


def _run(name: str) -> tuple[Outcome, list[str]]:
    lines: list[str] = []
    outcome = run_example(name, write=lines.append, width=WIDTH)
    return outcome, "\n".join(lines).splitlines()


@pytest.fixture(scope="module")
def outcomes() -> dict[str, tuple[Outcome, list[str]]]:
    """Every example run once (they take about a second each), shared by the tests below."""
    return {name: _run(name) for name in STABILITY}


def test_examples_cover_the_lessons() -> None:
    # the numerical-stability half, then the regularisation half (gradscope.regularisation_examples)
    assert list(EXAMPLES) == [
        "vanishing",
        "exploding",
        "init",
        "fp16",
        "weight-decay",
        "l1",
        "dropout",
        "early-stopping",
    ]


@pytest.mark.parametrize("name", STABILITY)
def test_each_example_reaches_its_expected_outcome(name: str, outcomes: dict) -> None:
    outcome, lines = outcomes[name]
    assert outcome.ok, outcome.problems
    # Independently of Outcome.ok: the broken models show the expected codes, the fixed ones do not.
    expected = {
        "vanishing": {"model": {"vanishing-gradient"}},
        "exploding": {"model": {"exploding-gradient", "fp16-overflow"}},
        "init": {"xavier": {"vanishing-gradient"}, "default": {"vanishing-gradient"}},
        "fp16": {"overflow": {"fp16-overflow"}, "underflow": {"fp16-underflow"}},
    }[name]
    for key, codes in expected.items():
        assert codes <= outcome.before[key].codes(), (key, outcome.before[key].codes())
    for key, report in outcome.after.items():
        assert not (outcome.expected & report.codes()), (key, report.codes())
    assert any(line.startswith("Outcome: as expected") for line in lines)
    assert max(len(line) for line in lines) <= WIDTH


@pytest.mark.parametrize("name", ["vanishing", "exploding"])
def test_init_fixes_leave_a_healthy_model(name: str, outcomes: dict) -> None:
    outcome, _ = outcomes[name]
    after = outcome.after["model"]
    assert after.summary()["healthy"], after.codes()
    assert after.summary()["errors"] == after.summary()["warnings"] == 0


def test_vanishing_gradient_shrinks_as_theory_says(outcomes: dict) -> None:
    outcome, _ = outcomes["vanishing"]
    # Backward gain per Linear(128,128) → Sigmoid with N(0, 0.01): sqrt(128)·0.01·σ'(≈0) = 0.113·0.25.
    predicted = math.sqrt(128) * 0.01 * 0.25
    gain = gradient_gain(outcome.before["model"])
    assert gain == pytest.approx(predicted, rel=0.15)
    fixed = gradient_gain(outcome.after["model"])
    assert fixed == pytest.approx(1.0, abs=0.15)  # ReLU + Kaiming: gain 1


def test_exploding_activations_grow_eightfold_per_layer(outcomes: dict) -> None:
    outcome, _ = outcomes["exploding"]
    linear = [layer for layer in outcome.before["model"].layers if layer.type == "Linear"]
    stds = [layer.activation.std for layer in linear[1:-1]]  # hidden layers fed by a ReLU
    per_layer = (stds[-1] / stds[0]) ** (1 / (len(stds) - 1))
    assert per_layer == pytest.approx(math.sqrt(128 / 2), rel=0.15)  # sqrt(n·Var[w]/2) = 8
    assert max(layer.activation.absmax for layer in linear) > torch.finfo(torch.float16).max


@pytest.mark.parametrize("scheme", ["xavier", "kaiming", "default"])
def test_init_comparison_matches_closed_form_gains(scheme: str, outcomes: dict) -> None:
    outcome, lines = outcomes["init"]
    measured = outcome.extra[f"gain_{scheme}"]
    assert measured == pytest.approx(PREDICTED_GAIN[scheme], rel=0.1)
    # the closed forms themselves: sqrt(n·Var[w]/2) with Var[w] = 1/n, 2/n, 1/(3n)
    assert PREDICTED_GAIN[scheme] == pytest.approx(
        {"xavier": 0.7071, "kaiming": 1.0, "default": 0.4082}[scheme], abs=1e-4
    )
    assert "vanishing-gradient" not in outcome.before["kaiming"].codes()
    if scheme != "kaiming":
        assert outcome.extra[f"gain_{scheme}_fixed"] == pytest.approx(1.0, abs=0.1)
    assert any(line.lstrip().startswith("30 ") for line in lines)  # the table reaches depth 30


def test_fp16_loss_scale_and_flushed_fraction(outcomes: dict) -> None:
    outcome, _ = outcomes["fp16"]
    before = outcome.before["underflow"]
    k = outcome.extra["loss_scale_exponent"]
    absmax = max(s.absmax for layer in before.layers for s in (layer.gradient, layer.weight_grad) if s is not None)
    fp16_max = torch.finfo(torch.float16).max
    # the largest k that keeps absmax·2^k below fp16's max with one binade of headroom
    assert absmax * 2.0 ** (k + 1) <= fp16_max < absmax * 2.0 ** (k + 2)
    assert outcome.extra["flushed_before"] > 0.3
    assert outcome.extra["flushed_after"] < 0.01
    # overflow half: the offset 1e5 is past fp16's max; neither bf16 nor the fp32 block overflow
    overflow = outcome.before["overflow"].layers[0].activation
    assert overflow.absmax == pytest.approx(1e5, rel=1e-3)
    assert "fp16-overflow" not in outcome.after["overflow_fp32_block"].codes()
    assert "bf16-overflow" not in outcome.after["overflow_bf16"].codes()


def test_run_demo_return_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    assert run_demo("vanishing", write=lines.append, width=WIDTH) == 0
    assert lines

    def broken(out: object) -> Outcome:
        return Outcome("vanishing", {"vanishing-gradient"}, problems=["before: expected vanishing-gradient"])

    monkeypatch.setitem(examples._RUNNERS, "vanishing", broken)
    assert run_demo("vanishing", write=lines.append) == 1


def test_unknown_example_is_an_input_error() -> None:
    with pytest.raises(InputError, match="vanishing, exploding, init, fp16"):
        run_demo("nope", write=lambda _: None)
