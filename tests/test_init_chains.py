"""poor-init judges only layers whose gains really multiply into what the loss sees.

Field trial: the rule chained consecutive layers whenever the second moment one
received matched what the other put out, so execution order and equal scales
stood in for data flow.  Standard architectures at their library's own init
(std 0.02) were warned: v_proj -> o_proj across attention over a few tokens,
ELECTRA's embeddings_project -> query (one of three parallel projections),
SwinV2's value -> the position-bias MLP (which reads a fixed coordinate table),
FocalNet's projection_in -> the focal convs (a split of its output), and runs
that end in a residual branch (Segformer's Mix-FFN, ConvNeXtV2's dwconv).

The class: a run is a compounding stack only when (1) each layer receives the
very tensor the previous one put out, and (2) the run's end goes on into the
output layer or the head; a residual add rescues a branch of small gain (not
one of large gain), a normalisation rescues any.  Each test below is one side
of that line; the transformers models are shrunk so that each audit takes well
under a second on one thread.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diagnose_models import one_thread  # noqa: F401 (autouse fixture)
from torch import nn

from gradscope.auditing import audit
from gradscope.diagnose.init import _feeds, analyse_init, compounding_runs
from gradscope.diagnose.layers import Context
from gradscope.report import Finding, Report, Severity

# HF's _init_weights: N(0, 0.02) for every Linear and Conv (BERT, GPT-2, Llama, ViT...).
HF_STD = 0.02


def _poor_init(report: Report) -> Finding | None:
    return next((f for f in report.findings if f.code == "poor-init"), None)


def _context(report: Report, model: nn.Module) -> tuple[Context, list[dict[str, Any]]]:
    ctx = Context(report.record, model=model)
    return ctx, analyse_init(ctx)


def _links(report: Report, model: nn.Module, before: str, after: str) -> bool:
    ctx, _ = _context(report, model)
    return _feeds(ctx, ctx.by_name[before], ctx.by_name[after])


def _init_linear_and_conv(model: nn.Module, std: float, skip: tuple[nn.Module, ...] = ()) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m not in skip:
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


# -- true positives: a plain stack still compounds ------------------------------------------------


def _tanh_stack(std: float, hidden: int = 5, width: int = 64) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(hidden):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 10))
    return _init_linear_and_conv(nn.Sequential(*layers), std)  # type: ignore[return-value]


def test_plain_tanh_stack_with_too_small_weights_is_poor_init() -> None:
    # n·Var[w] = 64 · 0.02² = 0.0256 per layer (tanh is the identity near 0),
    # ~1e-8 over the 5 hidden layers that feed each other and the output layer.
    report = audit(_tanh_stack(HF_STD), input_shape=(64, 64))
    finding = _poor_init(report)
    assert finding is not None and finding.severity is Severity.WARNING
    assert finding.evidence["cause"] == "weights"
    assert finding.layers == ["0", "2", "4", "6", "8"]  # not the output layer '10'
    assert finding.evidence["compounding_layers"] == 5
    assert finding.evidence["compounded_predicted_gain"] < 1e-7


class _TokenConvMix(nn.Module):
    """Linear over channels, a k=1 Conv1d over a transposed view, Linear again: the
    conv reads a permutation of the Tanh's output (Segformer's Mix-FFN layout)."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.fc1, self.act1 = nn.Linear(d, d), nn.Tanh()
        self.conv, self.act2 = nn.Conv1d(d, d, 1), nn.Tanh()
        self.fc2, self.act3 = nn.Linear(d, d), nn.Tanh()
        self.out = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.fc1(x))
        x = self.act2(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.out(self.act3(self.fc2(x)))


def test_a_chain_through_a_transposed_view_still_compounds() -> None:
    # A reshape or transpose moves no value: the conv's input has the Tanh's count,
    # extremes and second moment, so the three layers are one run (0.0256³ ≈ 1.7e-5).
    torch.manual_seed(0)
    model = _init_linear_and_conv(_TokenConvMix(), HF_STD)
    report = audit(model, input_shape=(8, 16, 64))
    assert _links(report, model, "fc1", "conv") and _links(report, model, "conv", "fc2")
    finding = _poor_init(report)
    assert finding is not None and finding.evidence["compounding_layers"] == 3


def _conv_stack(std: float, residual: bool) -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.act = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
                for _ in range(2)
            )
            self.acts = nn.ModuleList(nn.ReLU() for _ in range(2))
            self.pool, self.flat, self.head = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.act(self.stem(x))
            for block, act in zip(self.blocks, self.acts, strict=True):
                x = x + block(x) if residual else act(block(x))
            return self.head(self.flat(self.pool(x)))

    torch.manual_seed(0)
    model = Net()
    _init_linear_and_conv(model, std, skip=(model.stem, model.head))
    nn.init.kaiming_normal_(model.stem.weight, nonlinearity="relu")
    return model


def test_plain_conv_stack_into_a_pooled_head_is_poor_init() -> None:
    # n·Var[w]·1/2 = 144 · 0.01² / 2 = 0.0072 per conv; the last conv's output reaches
    # the head through an average (its second moment can only shrink, Jensen), so the
    # run goes on to the loss: the stem (gain 1) and 4 convs compound to ~3e-9.
    report = audit(_conv_stack(0.01, residual=False), input_shape=(8, 3, 8, 8))
    finding = _poor_init(report)
    assert finding is not None and finding.evidence["cause"] == "weights"
    assert finding.evidence["compounding_layers"] == 5


def test_residual_conv_branches_of_small_gain_are_not_poor_init() -> None:
    # The same convs as residual branches: each branch's output (gain ~5e-5) is added
    # to a stream of gain ~1, and the head averages that stream, whose second moment
    # is far above the branch's: nothing the loss sees is multiplied by 5e-5.
    model = _conv_stack(0.01, residual=True)
    report = audit(model, input_shape=(8, 3, 8, 8))
    assert _poor_init(report) is None
    ctx, rows = _context(report, model)
    assert compounding_runs(ctx, rows) == []


class _ResidualMLP(nn.Module):
    def __init__(self, std: float, d: int = 64, blocks: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(d, d)
        self.branches = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)) for _ in range(blocks))
        self.head = nn.Linear(d, 10)
        _init_linear_and_conv(self.branches, std)
        for layer in (self.stem, self.head):
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for branch in self.branches:
            x = x + branch(x)
        return self.head(x)


def test_residual_branch_of_small_gain_is_rescued() -> None:
    # Branch gain 64·0.02²·1/2 · 64·0.02² ≈ 3e-4: E[(x + f)²] ≈ E[x²], the stream is untouched.
    model = _ResidualMLP(HF_STD)
    report = audit(model, input_shape=(64, 64))
    assert _links(report, model, "branches.0.0", "branches.0.2")  # a real chain inside the branch...
    assert not _links(report, model, "branches.0.2", "branches.1.0")  # ...that ends in the add
    assert _poor_init(report) is None


def test_residual_branch_of_large_gain_is_still_poor_init() -> None:
    # Branch gain 64·1·1/2 · 64·1 = 2048: E[(x + f)²] ≈ E[f²], the add passes it on.
    report = audit(_ResidualMLP(1.0), input_shape=(64, 64))
    finding = _poor_init(report)
    assert finding is not None and finding.severity is Severity.WARNING
    assert finding.evidence["compounded_predicted_gain"] > 100


# -- attention: neither order nor equal scales is data flow ---------------------------------------


class _NormFreeDecoder(nn.Module):
    """Embedding, two pre-norm-free decoder blocks (attention + ReLU MLP, both residual),
    a vocabulary head: the HF layout with no normalisation to hide the residual branches."""

    def __init__(self, d: int = 32, heads: int = 2, vocab: int = 128) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "q_proj": nn.Linear(d, d),
                    "k_proj": nn.Linear(d, d),
                    "v_proj": nn.Linear(d, d),
                    "o_proj": nn.Linear(d, d),
                    "mlp": nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d)),
                }
            )
            for _ in range(2)
        )
        self.lm_head = nn.Linear(d, vocab)
        _init_linear_and_conv(self.blocks, HF_STD)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        b, n, d = x.shape
        for block in self.blocks:

            def split(t: torch.Tensor) -> torch.Tensor:
                return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

            q, k, v = (split(block[p](x)) for p in ("q_proj", "k_proj", "v_proj"))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + block["o_proj"](a.transpose(1, 2).reshape(b, n, d))
            x = x + block["mlp"](x)
        return self.lm_head(x)


@pytest.mark.parametrize("length", [1, 4])
def test_attention_value_output_chain_is_not_poor_init(length: int) -> None:
    # Over one token attention hands o_proj v_proj's output itself (a real chain of
    # gain 32·0.02² each, 1.6e-4), over four a mix of scale close to it (the old rule
    # chained it); either way o_proj ends a residual branch: no finding.
    model = _NormFreeDecoder()
    report = audit(model, input_shape=(2, length), input_dtype=torch.int64, vocab=128)
    v, o = "blocks.1.v_proj", "blocks.1.o_proj"
    assert _links(report, model, v, o) is (length == 1)
    assert not _links(report, model, "blocks.1.q_proj", "blocks.1.k_proj")  # parallel projections
    assert _poor_init(report) is None


# -- transformers models at their own init -----------------------------------------------------
# Each audit takes < 0.2 s on one thread, but importing transformers' model classes
# costs ~3.5 s in whichever test runs first: all are marked slow.


def _hf_audit(model_class: str, config_class: str, config: dict[str, Any], **kwargs: Any) -> tuple[nn.Module, Report]:
    """transformers' ``model_class(config_class(**config))`` at its own init (seed 0), audited."""
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
        return model, audit(model, **kwargs)


def _tokens(length: int, vocab: int = 128) -> dict[str, Any]:
    return dict(input_shape=(2, length), input_dtype=torch.int64, vocab=vocab)


IMAGE = dict(input_shape=(2, 3, 64, 64))
# A two-layer decoder 32 wide (Llama, Mistral, Gemma2 share these fields).
DECODER = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=64,
)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("length", [1, 2, 4, 16])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_llama_at_its_init_is_not_poor_init(kv_heads: int, length: int) -> None:
    config = dict(DECODER, num_key_value_heads=kv_heads)
    model, report = _hf_audit("LlamaForCausalLM", "LlamaConfig", config, **_tokens(length))
    assert _poor_init(report) is None
    if kv_heads == 1 or length > 1:  # repeated KV heads or a mix over tokens: not v_proj's output
        assert not _links(report, model, "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj")


@pytest.mark.slow
def test_mistral_and_gemma2_at_their_init_are_not_poor_init() -> None:
    mistral = ("MistralForCausalLM", "MistralConfig", dict(DECODER, num_key_value_heads=1))
    gemma2 = ("Gemma2ForCausalLM", "Gemma2Config", dict(DECODER, num_key_value_heads=1, head_dim=16, sliding_window=8))
    for (model_class, config_class, config), length in ((mistral, 1), (mistral, 4), (gemma2, 16)):
        _, report = _hf_audit(model_class, config_class, config, **_tokens(length))
        assert _poor_init(report) is None, model_class


@pytest.mark.slow
def test_electra_embeddings_project_into_query_is_not_a_stack() -> None:
    config = dict(
        vocab_size=128, embedding_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=64,
    )  # fmt: skip
    model, report = _hf_audit("ElectraForPreTraining", "ElectraConfig", config, **_tokens(16))
    # query does read embeddings_project's output (gains 0.1 and 0.05, 0.005 together),
    # but its own output goes into the attention scores, not into key: a branch.
    layer = "electra.encoder.layer.0.attention.self"
    assert _links(report, model, "electra.embeddings_project", f"{layer}.query")
    assert not _links(report, model, f"{layer}.query", f"{layer}.key")
    ctx, rows = _context(report, model)
    assert all(run[0]["name"] != "electra.embeddings_project" for run in compounding_runs(ctx, rows))
    assert _poor_init(report) is None


@pytest.mark.slow
def test_swinv2_value_does_not_feed_the_position_bias_mlp() -> None:
    config = dict(
        num_labels=10, image_size=64, patch_size=4, embed_dim=24, depths=[1, 1], num_heads=[2, 4], window_size=4
    )
    model, report = _hf_audit("Swinv2ForImageClassification", "Swinv2Config", config, **IMAGE)
    attention = "swinv2.encoder.layers.1.blocks.0.attention.self"
    # The MLP reads a fixed table of relative coordinates that happens to run after `value`.
    assert not _links(report, model, f"{attention}.value", f"{attention}.continuous_position_bias_mlp.0")
    assert _poor_init(report) is None


@pytest.mark.slow
def test_focalnet_projection_in_does_not_feed_the_focal_convs_whole() -> None:
    config = dict(num_labels=10, image_size=64, embed_dim=24, depths=[1, 1], hidden_sizes=[24, 48])
    model, report = _hf_audit("FocalNetForImageClassification", "FocalNetConfig", config, **IMAGE)
    modulation = "focalnet.encoder.stages.0.layers.0.modulation"
    # The first focal conv reads one slice of projection_in's output (q, ctx, gates = split).
    assert not _links(report, model, f"{modulation}.projection_in", f"{modulation}.focal_layers.0.0")
    assert _poor_init(report) is None


# (transformers class prefix, config) of image classifiers whose blocks are residual branches
VISION = {
    "segformer": ("Segformer", dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128])),
    "convnextv2": ("ConvNextV2", dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1])),
    "poolformer": ("PoolFormer", dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128])),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VISION))
def test_vision_residual_blocks_at_their_init_are_not_poor_init(name: str) -> None:
    prefix, config = VISION[name]
    classifier, config_class = f"{prefix}ForImageClassification", f"{prefix}Config"
    model, report = _hf_audit(classifier, config_class, dict(config, num_labels=10), **IMAGE)
    if name == "segformer":
        # Mix-FFN: fc1 -> a transposed view -> dwconv is a real chain (gain ~5e-5)...
        ffn = "segformer.stages.0.blocks.0.mlp"
        assert _links(report, model, f"{ffn}.fc1", f"{ffn}.dwconv.dwconv")
    # ...inside a residual branch (behind a normalisation in ConvNeXtV2 and PoolFormer).
    assert _poor_init(report) is None
    ctx, rows = _context(report, model)
    assert all(math.prod(r["measured_gain"] for r in run) > 1e-2 for run in compounding_runs(ctx, rows))
