"""Mixture-of-experts layers with fused expert weights (transformers 5.x ``*Experts``).

Every expert lives in one ``(E, out, in)`` parameter (GPT-OSS: ``(E, in, out)``),
so gradscope must (1) give the init analysis one expert's fans, (2) count the
tokens the router sends to each expert and name the experts that get none
(``dead-units``), and (3) catch a fused expert weight at a bad init
(``poor-init``) with a fix that cures it.  Models are built from configs.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from gradscope import audit
from gradscope.diagnose import diagnose_record
from gradscope.diagnose import thresholds as th
from gradscope.experts import ExpertProbe, expert_fans, fused_experts, is_fused_experts
from gradscope.fix import apply_init
from gradscope.report import Report, Severity

transformers = pytest.importorskip("transformers")

HIDDEN, INTERMEDIATE, VOCAB = 32, 48, 128
TOKENS = (4, 64)  # 256 tokens: top-2 of 8 experts expects 64 choices each (>= EXPERT_MIN_FAIR_TOKENS)
EXPERTS = ["model.layers.0.mlp.experts"]


def _mixtral(experts: int = 8) -> nn.Module:
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=experts, num_experts_per_tok=2,
    )  # fmt: skip
    return transformers.MixtralForCausalLM(config)


def _olmoe(experts: int = 8) -> nn.Module:
    config = transformers.OlmoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_experts=experts, num_experts_per_tok=2,
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    return transformers.OlmoeForCausalLM(config)


def _gpt_oss(experts: int = 8) -> nn.Module:
    config = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=experts,
        num_experts_per_tok=2, layer_types=["full_attention"],
    )  # fmt: skip
    return transformers.GptOssForCausalLM(config)


def _qwen2_moe(experts: int = 8) -> nn.Module:
    config = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, moe_intermediate_size=INTERMEDIATE,
        shared_expert_intermediate_size=INTERMEDIATE, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_experts=experts, num_experts_per_tok=2,
    )  # fmt: skip
    return transformers.Qwen2MoeForCausalLM(config)


def _qwen3_moe(experts: int = 8) -> nn.Module:
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, moe_intermediate_size=INTERMEDIATE,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=experts,
        num_experts_per_tok=2,
    )  # fmt: skip
    return transformers.Qwen3MoeForCausalLM(config)


FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "mixtral": _mixtral,
    "olmoe": _olmoe,
    "gpt_oss": _gpt_oss,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
}


def _build(family: str, experts: int = 8, seed: int = 0) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        return FAMILIES[family](experts)


def _audit(model: nn.Module, shape: tuple[int, int] = TOKENS) -> Report:
    ids = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return audit(model, inputs=ids)


def _experts_module(model: nn.Module) -> nn.Module:
    return model.model.layers[0].mlp.experts


def _collapse(model: nn.Module, family: str) -> None:
    """A top-2 router collapsed onto experts 0 and 1 for every token.

    GPT-OSS: a router bias of +10 on two logits.  Mixtral and OLMoE have no router
    bias: a constant feature in the residual stream (every embedding's dimension 0 at
    1.0, a "massive activation") read by the router's rows 0 and 1 only does the same.
    """
    with torch.no_grad():
        if family == "gpt_oss":
            model.model.layers[0].mlp.router.bias[:2] = 10.0
            return
        model.model.embed_tokens.weight[:, 0] = 1.0
        gate = model.model.layers[0].mlp.gate.weight
        gate[:, 0] = 0.0
        gate[:2, 0] = 1.0


def _blow_up_experts(model: nn.Module) -> None:
    with torch.no_grad():
        for _, param in _experts_module(model).named_parameters(recurse=False):
            if param.dim() == 3:
                param.normal_(0.0, 1.0)


def _codes(report: Report, code: str) -> list[Any]:
    return [f for f in report.findings if f.code == code]


# -- fused weights and their per-expert fans --------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_expert_weights_get_one_experts_fans(family: str) -> None:
    """(E, out, in) -> fan_in = in (GPT-OSS's (E, in, out) -> in), never torch's 3-D fans."""
    model = _build(family)
    experts = _experts_module(model)
    assert is_fused_experts(experts) and [n for n, _ in fused_experts(model)] == EXPERTS
    gate_up, down = experts.gate_up_proj, experts.down_proj
    assert expert_fans(experts, "gate_up_proj", gate_up.shape) == (HIDDEN, 2 * INTERMEDIATE)
    assert expert_fans(experts, "down_proj", down.shape) == (INTERMEDIATE, HIDDEN)
    # torch's fans of the 3-D tensor are not one expert's (the defect):
    torch_fan_in, _ = nn.init._calculate_fan_in_and_fan_out(gate_up)
    assert torch_fan_in != HIDDEN


def test_the_audit_records_one_experts_fans_on_the_layer() -> None:
    report = _audit(_build("mixtral"))
    layer = report.record.layer(EXPERTS[0])
    assert (layer.weight_name, layer.fan_in, layer.fan_out) == ("gate_up_proj", HIDDEN, 2 * INTERMEDIATE)


# -- healthy: no finding, every expert visible ------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_healthy_moe_at_its_library_init_gets_no_expert_finding(family: str) -> None:
    model = _build(family)
    report = _audit(model)
    assert not [f for f in report.findings if f.code in ("dead-units", "poor-init")]
    (row,) = report.analysis["experts"]
    routing = row["routing"]
    assert row["layer"] == EXPERTS[0] and row["experts"] == 8 and routing["assessed"]
    # closed form: every token-choice is counted once (256 tokens x top-2)
    assert sum(routing["tokens_per_expert"]) == 256 * 2 and routing["starved"] == []
    assert min(routing["share_of_fair"]) > 5 * th.EXPERT_STARVED_SHARE
    # every expert got tokens, so every expert got a weight gradient
    for weight in row["weights"]:
        assert len(weight["grad_rms"]) == 8 and min(weight["grad_rms"]) > 0
    # the library's init (std = initializer_range, transformers' _init_weights) is read per expert
    std = model.config.initializer_range
    assert all(w["weight_std"] == pytest.approx(std, rel=0.1) for w in row["weights"])


def test_a_random_router_never_starves_an_expert() -> None:
    """The measurement behind EXPERT_STARVED_SHARE: E = 4, 8, top-2, 512 random tokens."""
    shares = []
    for family in ("mixtral", "olmoe"):
        for experts in (4, 8):
            for seed in range(3):
                model = _build(family, experts, seed)
                ids = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(seed))
                with ExpertProbe(model) as probe, torch.no_grad():
                    model(input_ids=ids)
                (row,) = probe.summary()
                fair = row["tokens"] * row["top_k"] / experts
                assert row["tokens"] == 512 and sum(row["tokens_per_expert"]) == 1024
                shares.append(min(row["tokens_per_expert"]) / fair)
    assert min(shares) > 5 * th.EXPERT_STARVED_SHARE


# -- routing collapse: dead-units naming the starved experts ----------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_router_collapsed_onto_two_experts_names_the_six_starved_ones(family: str) -> None:
    model = _build(family)
    _collapse(model, family)
    report = _audit(model)
    assert report.summary()["healthy"] is False
    (finding,) = _codes(report, "dead-units")
    assert finding.severity is Severity.WARNING and finding.layers == EXPERTS
    evidence = finding.evidence
    assert evidence["starved_experts"] == [2, 3, 4, 5, 6, 7]
    assert evidence["tokens_per_expert"] == [256, 256, 0, 0, 0, 0, 0, 0]
    assert evidence["busiest_experts"] == [0, 1] and evidence["busiest_share"] == 1.0
    assert evidence["starved_grad_rms"] == 0.0  # no token, no gradient: exactly
    assert "experts 2, 3, 4, 5, 6, 7 of 8" in finding.message
    router = "model.model.layers[0].mlp." + ("router" if family == "gpt_oss" else "gate")
    assert f"nn.init.normal_({router}.weight, std=model.config.initializer_range)" in finding.fix.code
    assert "output_router_logits = True" in finding.fix.code and "router_aux_loss_coef" in finding.fix.code
    assert (f"nn.init.zeros_({router}.bias)" in finding.fix.code) == (family == "gpt_oss")


def test_the_routing_fix_as_printed_cures_a_collapse_caused_by_the_router() -> None:
    """GPT-OSS's router bias is the cause: the printed re-init cures it at once.  (Mixtral's
    collapse above comes from a constant feature every token shares, which no router init
    undoes; the load-balancing loss the fix also sets moves it only over training: 60
    AdamW steps at lr 1e-3 took the six starved experts from 0 to 9 tokens, slowly.)"""
    family = "gpt_oss"
    model = _build(family)
    _collapse(model, family)
    (finding,) = _codes(_audit(model), "dead-units")
    with torch.no_grad():
        exec(finding.fix.code, {"model": model})  # the snippet a user pastes
    assert model.config.output_router_logits is True and model.router_aux_loss_coef == 0.01
    report = _audit(model)
    assert not _codes(report, "dead-units")
    assert report.analysis["experts"][0]["routing"]["starved"] == []


def test_too_few_tokens_leave_routing_unassessed_not_healthy_by_default() -> None:
    """8 tokens over 8 experts: an empty expert may be chance, so no verdict on routing."""
    model = _build("mixtral")
    _collapse(model, "mixtral")
    report = _audit(model, shape=(1, 8))
    assert not _codes(report, "dead-units")
    notes = [n for n in report.analysis["not_assessed"] if n["analysis"] == "expert-routing"]
    assert notes and notes[0]["layer"] == EXPERTS[0] and "fewer than 32" in notes[0]["reason"]


def test_routing_is_diagnosed_from_the_json_report_alone() -> None:
    model = _build("mixtral")
    _collapse(model, "mixtral")
    data = json.loads(json.dumps(_audit(model).to_dict()))
    assert data["run"]["experts"][0]["tokens_per_expert"] == [256, 256, 0, 0, 0, 0, 0, 0]
    loaded = Report.from_dict(data)
    findings, analysis = diagnose_record(loaded.record, run=loaded.run)
    assert [f.evidence["starved_experts"] for f in findings if f.code == "dead-units"] == [[2, 3, 4, 5, 6, 7]]
    assert analysis["experts"][0]["routing"]["starved"] == [2, 3, 4, 5, 6, 7]


# -- fused expert init: poor-init with one expert's fan-in, and a fix that cures --------------


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_fused_experts_at_std_1_are_poor_init_with_the_right_fan_in_and_the_fix_cures(family: str) -> None:
    model = _build(family)
    _blow_up_experts(model)
    report = _audit(model)
    (finding,) = _codes(report, "poor-init")
    assert finding.layers == EXPERTS and finding.evidence["cause"] == "fused-experts"
    assert finding.evidence["measured_gain"] > th.INIT_STACK_HIGH
    params = {p["parameter"]: p for p in finding.evidence["parameters"]}
    assert set(params) == {"gate_up_proj", "down_proj"}
    # one expert's fans; Kaiming into the gate (He et al. 2015), Xavier out (Glorot & Bengio 2010)
    assert params["gate_up_proj"]["fan_in"] == HIDDEN and params["down_proj"]["fan_in"] == INTERMEDIATE
    assert params["gate_up_proj"]["recommended_std"] == pytest.approx(math.sqrt(2 / HIDDEN), rel=1e-12)
    assert params["down_proj"]["recommended_std"] == pytest.approx(math.sqrt(2 / (INTERMEDIATE + HIDDEN)), rel=1e-12)
    assert params["gate_up_proj"]["weight_std"] == pytest.approx(1.0, rel=0.05)
    assert "nn.init.normal_(model.model.layers[0].mlp.experts.gate_up_proj, std=0.25)" in finding.fix.code

    if family == "gpt_oss":  # the snippet a user pastes
        with torch.no_grad():
            exec(finding.fix.code, {"model": model})
        changes = [{"layer": f"{EXPERTS[0]}.{name}"} for name in params]
    else:
        changes = apply_init(model, "auto", inputs=torch.randint(0, VOCAB, TOKENS))
    assert {c["layer"] for c in changes} >= {f"{EXPERTS[0]}.gate_up_proj", f"{EXPERTS[0]}.down_proj"}
    gate_up = _experts_module(model).gate_up_proj.detach()
    per_expert = gate_up.reshape(gate_up.shape[0], -1).std(dim=1)
    assert torch.allclose(per_expert, torch.full_like(per_expert, math.sqrt(2 / HIDDEN)), rtol=0.1)
    cured = _audit(model)
    assert not _codes(cured, "poor-init")
    assert cured.analysis["experts"][0]["measured_gain"] < th.INIT_STACK_HIGH


# -- the probe changes nothing and leaves nothing behind --------------------------------------


def test_per_expert_sums_are_bounded_by_a_chunk_and_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked float64 sums give torch's per-expert std to 1e-12 whatever the chunk."""
    from gradscope import experts as experts_module

    tensor = torch.randn(4, 30, 7, generator=torch.Generator().manual_seed(0)) * 0.3 + 0.01
    monkeypatch.setattr(experts_module, "CHUNK", 16)  # 210 elements per expert: 14 chunks
    sums, squares = experts_module.per_expert_sums(tensor)
    flat = tensor.double().reshape(4, -1)
    assert torch.allclose(sums, flat.sum(1), rtol=1e-12, atol=1e-12)
    assert torch.allclose(squares, flat.square().sum(1), rtol=1e-12)


def test_the_probe_changes_no_number_and_removes_every_hook() -> None:
    model = _build("mixtral")
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = model(input_ids=ids).logits
    plain.float().square().mean().backward()
    plain_grad = _experts_module(model).gate_up_proj.grad.clone()
    model.zero_grad(set_to_none=True)
    with ExpertProbe(model) as probe:
        watched = model(input_ids=ids).logits
        watched.float().square().mean().backward()
    assert torch.equal(plain, watched)
    assert torch.equal(plain_grad, _experts_module(model).gate_up_proj.grad)
    experts = _experts_module(model)
    assert not experts._forward_pre_hooks
    assert not experts.gate_up_proj._backward_hooks and not experts.down_proj._backward_hooks
    (row,) = probe.summary()
    assert row["calls"] == 1 and row["tokens"] == 32 and sum(row["tokens_per_expert"]) == 64


def test_routing_ids_outside_the_experts_are_not_counted() -> None:
    """Expert parallelism marks tokens for no local expert with E (Mixtral's one_hot has
    E + 1 classes) and capacity-limited routers drop tokens with -1: neither is a choice."""

    class Experts(nn.Module):  # a fused experts module: (E, out, in), indexed per expert
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3))

        def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return sum(x @ self.w[e].T for e in index.unique().tolist() if 0 <= e < 4)

    model = nn.Sequential()
    model.experts = Experts()
    index = torch.tensor([[0, 4], [-1, 1], [1, 3]])
    with ExpertProbe(model) as probe:
        model.experts(torch.randn(3, 3), index)
    (row,) = probe.summary()
    assert row["tokens_per_expert"] == [1, 2, 0, 1] and row["tokens"] == 3 and row["top_k"] == 2
