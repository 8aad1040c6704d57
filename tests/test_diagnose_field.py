"""Field defects of the diagnosis (fix F).

* A zero parameter whose own weight gradient is zero too (a zero RMSNorm gain before a
  gated MLP, a zero Linear before a ReLU, a zeroed router) was called "zero-init by
  design, the gradient reaches them after the first update": it is a stationary point
  that never moves, a ``vanishing-gradient`` error.  A zero layer with a gradient of its
  own (before a GELU) stays the info.
* A weight gradient that is zero but for rounding (a top-1 router renormalised to weight
  1: 4e-8 of its neighbours') was healthy: a ``vanishing-gradient`` warning.
* A model already in bf16/fp16 was checked against its own format only, dropping the
  fp8 (and fp16) formats the run asked about.
* The fp16-underflow info said "GradScaler's default 2^16 brings them back" while its
  fix said the default overflows.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from diagnose_models import kaiming, mlp, one_thread  # noqa: F401 (one_thread: autouse fixture)
from torch import nn

from gradscope.auditing import audit
from gradscope.diagnose import thresholds as th
from gradscope.report import Finding, Report, Severity


def _findings(report: Report, code: str) -> list[Finding]:
    return [f for f in report.findings if f.code == code]


def _one(report: Report, code: str) -> Finding:
    found = _findings(report, code)
    assert len(found) == 1, f"{code}: {[(f.code, f.message) for f in report.findings]}"
    return found[0]


# -- 1. a zero parameter whose own gradient is zero never recovers ---------------------------


class GatedBlock(nn.Module):
    """Llama's MLP half: x + down(silu(gate(norm(x))) * up(norm(x))), then a head."""

    def __init__(self, d: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.norm = nn.RMSNorm(d)
        self.gate, self.up, self.down = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        n = self.norm(h)
        h = h + self.down(nn.functional.silu(self.gate(n)) * self.up(n))
        return self.head(h)


def _zero_gain_block() -> GatedBlock:
    torch.manual_seed(0)
    model = GatedBlock()
    for layer in (model.gate, model.up, model.down):
        nn.init.zeros_(layer.bias)  # transformers' Llama MLP has no biases: silu(0) * 0 = 0 exactly
    nn.init.zeros_(model.norm.weight)
    return model


def test_zero_norm_gain_before_a_gated_mlp_is_a_permanent_vanishing_gradient_error() -> None:
    """Theory: the gain's gradient and every weight gradient of the MLP are exactly 0
    (silu(0) * up(0) = 0 and up(0) = 0), so SGD (-lr·g), Adam (first moment 0) and
    weight decay (which scales the zero gain) leave the gain at 0 and the MLP unlearnt,
    step after step: not "by design", an error."""
    model = _zero_gain_block()
    x, y = torch.randn(8, 16), torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    for param in (model.norm.weight, model.gate.weight, model.up.weight, model.down.weight):
        assert param.grad is not None and float(param.grad.abs().max()) == 0.0
    assert float(model.head.weight.grad.abs().max()) > 0.0  # the rest of the model learns
    report = audit(_zero_gain_block(), input_shape=(8, 16))
    error = _one(report, "vanishing-gradient")
    assert error.severity is Severity.ERROR
    assert error.layers[0] == "norm"
    # gate and up get ∂ℓ/∂h = 0, down gets a zero input: none of the three learns.
    assert {"gate", "up", "down"} <= set(error.evidence["silenced_layers"])
    assert error.evidence["permanent"] is True
    assert "never recovers" in error.message and "by design" not in error.message.replace("not a zero-init by", "")
    assert "nn.init.ones_(model.norm.weight)" in error.fix.code
    assert "zero-init" not in report.codes()
    assert report.summary()["healthy"] is False


@pytest.mark.parametrize(
    ("act", "permanent"),
    [(nn.ReLU, True), (nn.GELU, False)],
    ids=["relu-derivative-0-at-0", "gelu-derivative-half-at-0"],
)
def test_a_zero_hidden_layer_is_permanent_exactly_when_its_own_gradient_is_zero(
    act: type[nn.Module], permanent: bool
) -> None:
    """relu'(0) = 0 gives the zero layer no gradient of its own (stuck); gelu'(0) = 1/2
    gives it one (the first update moves it: zero-init by design)."""
    model = mlp(3, width=64, act=act, init=kaiming, d_in=32)
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    report = audit(model, input_shape=(16, 32))
    own = report.record.layer("2").weight_grad
    assert (own.absmax == 0.0) is permanent
    if permanent:
        error = _one(report, "vanishing-gradient")
        assert error.severity is Severity.ERROR and error.layers[0] == "2"
        assert "0" in error.evidence["silenced_layers"]
        assert "model[2].reset_parameters()" in error.fix.code
        assert "zero-init" not in report.codes()
    else:
        info = _one(report, "zero-init")
        assert info.severity is Severity.INFO and info.layers == ["2"]
        assert "vanishing-gradient" not in report.codes()


# -- 2. a weight gradient that is zero but for rounding ----------------------------------------


class TinyMoE(nn.Module):
    """inp -> top-k mixture of experts (router weights renormalised over the chosen k, as
    Mixtral) -> head.  Every expert runs densely; its output is masked by the routing."""

    def __init__(self, k: int, d: int = 32, experts: int = 4) -> None:
        super().__init__()
        self.k = k
        self.inp = nn.Linear(16, d)
        self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        top, index = self.gate(h).softmax(-1).topk(self.k, dim=-1)
        top = top / top.sum(-1, keepdim=True)  # k = 1: exactly 1, whatever the logits
        out = h
        for e, expert in enumerate(self.experts):
            weight = (top * (index == e)).sum(-1, keepdim=True)
            out = out + weight * expert(h)
        return self.head(out)


@pytest.mark.parametrize("k", [1, 2])
def test_a_renormalised_top_1_router_is_named_and_top_2_is_not(k: int) -> None:
    torch.manual_seed(0)
    report = audit(TinyMoE(k), input_shape=(32, 16))
    gate = report.record.layer("gate").weight_grad
    neighbours = [report.record.layer(n).weight_grad.rms for n in ("inp", "experts.0")]
    ratio = gate.rms / min(neighbours)
    if k == 2:
        assert ratio > 1e-3  # a real gradient: the mixture weights depend on the logits
        assert "vanishing-gradient" not in report.codes()
        return
    # d(t / t)/dt = 0: what is left is fp32 rounding, far below the 1e-6 threshold.
    assert ratio < th.STRUCTURAL_ZERO_RATIO
    finding = _one(report, "vanishing-gradient")
    assert finding.severity is Severity.WARNING
    assert finding.layers == ["gate"]
    assert finding.evidence["ratio"] == pytest.approx(ratio, rel=1e-9)
    assert "never learns" in finding.message
    assert "router" in finding.fix.summary and "output_router_logits" in finding.fix.code


def _mixtral(top_k: int, zero_router: bool) -> Report:
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        config = transformers.MixtralConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=128, num_local_experts=4, num_experts_per_tok=top_k,
        )  # fmt: skip
        model = transformers.MixtralForCausalLM(config)
        if zero_router:
            with torch.no_grad():
                for layer in model.model.layers:
                    layer.mlp.gate.weight.zero_()
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        return audit(model, inputs=ids)


GATES = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def test_mixtral_top_1_router_at_its_init_is_named() -> None:
    report = _mixtral(1, zero_router=False)
    finding = _one(report, "vanishing-gradient")
    assert finding.severity is Severity.WARNING and finding.layers == GATES
    assert finding.evidence["ratio"] < th.STRUCTURAL_ZERO_RATIO


def test_mixtral_zeroed_top_1_router_is_a_permanent_zero() -> None:
    """Zero logits: top-1 renormalised weight 1, the router's own gradient exactly 0."""
    report = _mixtral(1, zero_router=True)
    assert all(report.record.layer(g).weight_grad.absmax == 0.0 for g in GATES)
    error = _one(report, "vanishing-gradient")
    assert error.severity is Severity.ERROR and error.layers[:2] == GATES
    assert "zero-init" not in report.codes()
    # a router is no gain: its standard init (LeCun std 1/sqrt(fan_in = 32)), not ones
    assert "nn.init.normal_(model.model.layers[0].mlp.gate.weight, std=1 / math.sqrt(32))" in error.fix.code


# -- 3. every requested fp8 format is checked, whatever the tensor's own dtype -----------------


FORMATS = ("fp16", "fp8_e4m3", "fp8_e5m2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_activations_of_a_bf16_model_are_checked_against_every_requested_format(dtype: torch.dtype) -> None:
    """Activations ~1e5: beyond fp16's 65504, e5m2's 57344 and e4m3's 448 (torch.finfo),
    within bf16's range: the two fp8 overflows in fp32 and in bf16 alike; fp16's only in
    fp32 (a bf16 run is not asked whether fp16 holds it: fp16 is the audit's default)."""
    model = mlp(2, width=32, init=kaiming, d_in=16).to(dtype)
    x = (torch.randn(16, 16) * 1e5).to(dtype)
    report = audit(model, inputs=x, formats=FORMATS)
    absmax = report.record.layer("0").activation.absmax
    assert absmax > torch.finfo(torch.float16).max
    codes = report.codes()
    assert {"fp8-e4m3-overflow", "fp8-e5m2-overflow"} <= codes
    assert ("fp16-overflow" in codes) == (dtype is torch.float32)
    assert not any(c.startswith("bf16") for c in codes)  # bf16's own range holds them
    if dtype is torch.bfloat16:
        assert "a bf16 tensor cast to fp8_e4m3" in _one(report, "fp8-e4m3-overflow").message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_gradients_of_a_half_precision_model_are_checked_against_fp8(dtype: torch.dtype) -> None:
    """∂ℓ/∂h of the head = c = 1e-4 (binade -14): e4m3 flushes binades <= -11 (smallest
    subnormal 2^-9), e5m2 only <= -18 and fp16 <= -26: exactly one underflow, every dtype."""
    model = mlp(2, width=32, init=kaiming, d_in=16).to(dtype)
    x = torch.randn(16, 16).to(dtype)
    report = audit(model, inputs=x, loss=lambda out: out.float().sum() * 1e-4, formats=FORMATS)
    assert report.record.layer("2").gradient.absmax == pytest.approx(1e-4, rel=1e-2)
    underflows = {c for c in report.codes() if c.endswith("-underflow")}
    assert underflows == {"fp8-e4m3-underflow"}
    finding = _one(report, "fp8-e4m3-underflow")
    assert "2" in finding.layers
    assert finding.evidence["worst_flushed_frac"] == pytest.approx(1.0)


# -- 4. the fp16-underflow info agrees with its fix ------------------------------------------


def _two_ended(small: float, large: float = 10.0) -> tuple[nn.Module, Any]:
    """One Linear whose ∂ℓ/∂h is c exactly: 6 of 10 columns at ``small``, 4 at ``large``, so
    its absmax is ``large`` and 60% of it sits at ``small``.  Inputs 1e-2 keep the weight
    gradients below ``large``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 10))
    c = torch.tensor([small] * 6 + [large] * 4).expand(16, 10)
    return model, lambda out: (out * c).sum()


def test_default_scale_that_overflows_is_said_in_message_and_fix_alike() -> None:
    """k_max = floor(log2(65504 / 10)) = 12: GradScaler's 2^16 overflows, skips 4 steps and
    lands on 2^12, where 1e-9 x 2^12 = 4.1e-6 (binade -18) no longer flushes (<= -26).
    With absmax 0.1 instead (0.1 x 2^16 = 6554 < 65504) the default fits as before."""
    model, loss = _two_ended(1e-9)
    report = audit(model, inputs=torch.randn(16, 8) * 1e-2, loss=loss)
    finding = _one(report, "fp16-underflow")
    assert "2^16 brings them back" not in finding.message  # the fix says the default overflows
    assert "overflows" in finding.message and "halving down to 2^12, which brings them back" in finding.message
    assert "overflows" in finding.fix.summary
    assert finding.severity is Severity.INFO  # four skipped steps, then the gradients are kept
    evidence = finding.evidence
    assert evidence["worst_flushed_frac"] == pytest.approx(0.6)
    assert report.record.layer("0").gradient.absmax == 10.0
    assert evidence["gradscaler_default_overflows"] is True
    assert evidence["gradscaler_lands_at_exponent"] == math.floor(math.log2(65504 / 10)) == 12
    assert evidence["gradscaler_skipped_steps"] == 4
    assert evidence["single_scale_fits"] is True and "init_scale=2.0**11" in finding.fix.code

    model, loss = _two_ended(1e-9, large=0.1)
    fits = _one(audit(model, inputs=torch.randn(16, 8) * 1e-2, loss=loss), "fp16-underflow")
    assert fits.severity is Severity.INFO and fits.evidence["gradscaler_default_overflows"] is False
    assert "GradScaler's default 2^16 brings them back" in fits.message
    assert "overflows" not in fits.fix.summary


def test_no_single_scale_fits_both_ends() -> None:
    """1e-30 (binade -100) stays flushed at 2^12, the largest scale that does not overflow:
    no loss scale helps; the fix is the wider format."""
    model, loss = _two_ended(1e-30)
    report = audit(model, inputs=torch.randn(16, 8) * 1e-2, loss=loss)
    finding = _one(report, "fp16-underflow")
    assert "no single loss scale fits" in finding.message
    assert "No single loss scale" in finding.fix.summary and "bf16" in finding.fix.summary
    assert "torch.bfloat16" in finding.fix.code
    assert "brings them back" not in finding.message
    assert finding.severity is Severity.WARNING
    assert finding.evidence["single_scale_fits"] is False
    assert finding.evidence["worst_flushed_frac_at_recommended_scale"] == pytest.approx(0.6)
