"""Attention scores that overflow fp16 are found, though no module outputs them.

Field trial (session 10): GPT-2 with ``scale_attn_weights=False`` and its q/k
projections x600 puts scores of ~1.4e5 > 65504 into the fp16 matmul; the fp16
copy of the model gives a NaN loss from block 0 on, while the fp16 audit said
healthy: the largest module output was 405.  The class: any score computed
inside a module (eager matmul + softmax, or scaled_dot_product_attention) is
judged against the formats asked about; masks and negative scores (which only
get weight 0) never are.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradscope.attention_scores import AttentionScores
from gradscope.auditing import audit

FP16_MAX = torch.finfo(torch.float16).max


def _gpt2(qk_scale: float) -> tuple[nn.Module, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        config = transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=200, scale_attn_weights=False, attn_implementation="eager",
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight[:, :128].mul_(qk_scale)  # q and k columns (v untouched)
    return model, torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))


def _hand_max_score(model: nn.Module, ids: torch.Tensor) -> float:
    """Block 0's largest q·kᵀ (no 1/√d: scale_attn_weights=False), by hand."""
    with torch.no_grad():
        tr = model.transformer
        x = tr.h[0].ln_1(tr.wte(ids) + tr.wpe(torch.arange(ids.shape[1])))
        q, k, _ = tr.h[0].attn.c_attn(x).split(64, dim=2)
        q = q.view(2, 16, 4, 16).transpose(1, 2)
        k = k.view(2, 16, 4, 16).transpose(1, 2)
        scores = q @ k.transpose(-1, -2)
        causal = torch.ones(16, 16, dtype=torch.bool).tril()
        return float(scores.masked_fill(~causal, -math.inf).max())


def test_gpt2_scores_past_fp16_are_an_error_at_the_attention_module() -> None:
    model, ids = _gpt2(600.0)
    with torch.no_grad():  # the ground truth: the fp16 copy of this model computes NaN
        half = type(model)(model.config).half()
        half.load_state_dict(model.state_dict())
        assert not torch.isfinite(half(ids).logits).all()
        assert torch.isfinite(model(ids).logits).all()
    report = audit(model, inputs=ids, formats=("fp16",), mode="eval")  # no dropout: comparable by hand
    finding = next(f for f in report.findings if f.code == "fp16-overflow" and f.evidence.get("where"))
    assert finding.severity == "error" and finding.layers == ["transformer.h.0.attn"]
    expected = _hand_max_score(model, ids)
    assert expected > FP16_MAX
    assert finding.evidence["worst_max_score"] == pytest.approx(expected, rel=1e-5)
    # The largest module output stays far below fp16's maximum: no layer output shows it.
    assert max(layer.activation.absmax for layer in report.record.layers if layer.activation) < FP16_MAX / 10


def test_gpt2_at_its_init_has_no_score_finding_though_its_mask_is_finfo_min() -> None:
    model, ids = _gpt2(1.0)  # eager attention fills the causal mask with finfo(float32).min
    report = audit(model, inputs=ids, formats=("fp16",), mode="eval")
    rows = {r["module"]: r for r in report.run["attention_scores"]}
    assert set(rows) == {"transformer.h.0.attn", "transformer.h.1.attn"}
    assert rows["transformer.h.0.attn"]["max_score"] == pytest.approx(_hand_max_score(model, ids), rel=1e-5)
    assert not [f for f in report.findings if f.evidence.get("where") == "attention scores"]


def test_a_softmax_outside_attention_is_no_attention_score() -> None:
    """A classifier's softmax over large logits (head std 20) is the logits' finding, not an
    attention one (field sweep: it was worded as q·kᵀ with a 1/√head_dim fix)."""

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 10)
            nn.init.normal_(self.fc.weight, std=20.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.softmax(self.fc(x), dim=-1) + torch.softmax(self.fc(x) * 0, dim=-1)

    report = audit(Classifier(), inputs=torch.randn(8, 16), loss="mean", formats=("fp16", "fp8_e4m3"))
    assert "attention_scores" not in report.run
    assert not [f for f in report.findings if f.evidence.get("where") == "attention scores"]


class _SdpaBlock(nn.Module):
    """q, k, v projections into F.scaled_dot_product_attention, grouped-query (4 q heads, 2 kv)."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(32, 32)
        self.kv = nn.Linear(32, 32)
        self.out = nn.Linear(32, 32)
        with torch.no_grad():
            self.q.weight.mul_(gain)
            self.kv.weight.mul_(gain)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 8).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, 2, 8).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.out(y.transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("gain, flagged", [(1.0, False), (300.0, True)])
def test_sdpa_scores_are_computed_and_judged(gain: float, flagged: bool) -> None:
    block = _SdpaBlock(gain)
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        q, k, _ = block.heads(x)
        hand = float((q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)).max()) / math.sqrt(8)
    report = audit(block, inputs=x, loss="mean", formats=("fp16",))
    (row,) = report.run["attention_scores"]
    assert row["module"] == "model" and row["source"] == ["sdpa"]
    assert row["max_score"] == pytest.approx(hand, rel=1e-5)
    found = [f for f in report.findings if f.evidence.get("where") == "attention scores"]
    assert bool(found) == flagged and (hand > FP16_MAX / 2) == flagged


def test_the_probe_changes_no_number_the_model_computes() -> None:
    model, ids = _gpt2(600.0)
    model.eval()  # no dropout: the two forwards are comparable bit for bit
    with torch.no_grad():
        plain = model(ids).logits
        with AttentionScores(lambda: ("blocks", "GPT2Attention")) as probe:
            probed = model(ids).logits
    assert torch.equal(plain, probed)
    assert probe.by_module["blocks"].calls == 2  # the two blocks' softmaxes
