"""Layers as libraries write them: their own class names for normalisations and
lookups, embeddings summed into one normalisation, SwiGLU's parallel projections.

Found in a field trial on transformers models at their standard init (each
case failed before its fix):

* ``GemmaRMSNorm`` / ``LlamaRMSNorm`` / ``T5LayerNorm`` were unknown types: the
  update-ratio rule judged Gemma's zero-initialised RMSNorm gains as weights
  ("0.14 of the weights' norm per step, too large", a learning rate of 7e-6);
* BERT's word and token-type embeddings reach their LayerNorm through a sum,
  and Llama's embed_tokens through its rotary table: only the lookup right
  before the norm was scaled by the std it divides by, so a watched BERT and a
  Llama with a small vocabulary got ``exploding-gradient``;
* SwiGLU's up_proj, beside gate_proj and 2.75x narrower than its output, was
  taken for a pooled head: the last MLP became the network's "head boundary".
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradscope
from gradscope.diagnose import depth
from gradscope.diagnose.layers import BATCHNORM_TYPES, EMBEDDING_TYPES, NORM_TYPES, Context


@pytest.mark.parametrize(
    "name",
    ["LayerNorm", "RMSNorm", "LlamaRMSNorm", "GemmaRMSNorm", "Gemma2RMSNorm", "T5LayerNorm", "ConvNextLayerNorm",
     "LayerNorm2d", "FrozenBatchNorm2d", "BatchNorm2d", "GroupNorm", "InstanceNorm3d"],
)  # fmt: skip
def test_library_normalisations_are_normalisations(name: str) -> None:
    assert name in NORM_TYPES


@pytest.mark.parametrize("name", ["Linear", "LayerNormLinear", "Normalize", "RMSNormGated", "Embedding", "Tanh"])
def test_other_layers_are_not_normalisations(name: str) -> None:
    assert name not in NORM_TYPES


def test_library_lookups_are_embeddings_and_batch_norms_are_batch_norms() -> None:
    for name in ("Embedding", "EmbeddingBag", "OPTLearnedPositionalEmbedding", "ScaledWordEmbedding", "ViTEmbeddings"):
        assert name in EMBEDDING_TYPES
    assert "Linear" not in EMBEDDING_TYPES and "EmbeddingProjection" not in EMBEDDING_TYPES
    assert "FrozenBatchNorm2d" in BATCHNORM_TYPES and "LayerNorm" not in BATCHNORM_TYPES


class SummedEmbeddings(nn.Module):
    """BERT's embedding block: three lookups summed, then a LayerNorm; a tanh MLP on top."""

    def __init__(self, width: int = 64, depth: int = 4) -> None:
        super().__init__()
        self.word = nn.Embedding(100, width)
        self.token_type = nn.Embedding(2, width)
        self.position = nn.Embedding(32, width)
        for table in (self.word, self.token_type, self.position):
            nn.init.normal_(table.weight, std=0.02)  # BERT's initializer_range
        self.norm = nn.LayerNorm(width)
        self.body = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())])
        for module in self.body:
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight, gain=5 / 3)  # tanh's gain: a healthy body
        self.head = nn.Linear(width, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        x = self.word(ids) + self.token_type(torch.zeros_like(ids)) + self.position(positions)
        return self.head(self.body(self.norm(x)))


def test_embeddings_summed_into_a_norm_are_all_scaled_by_it() -> None:
    """The depth rule compares ∂ℓ/∂h times the std the following normalisation divides
    by: the same for the three lookups, whose sum the LayerNorm reads.  Only the
    last one (position) was scaled before: word and token type came out 30x larger,
    which on a watched BERT crossed the 100x exploding threshold at step 48."""
    torch.manual_seed(0)
    report = gradscope.audit(SummedEmbeddings(), input_shape=(8, 16), input_dtype=torch.int64, vocab=100)
    assert "exploding-gradient" not in report.codes() and "vanishing-gradient" not in report.codes()
    items, _, _ = depth._scan(Context(report.record), "gradient")
    scaled = {layer.name: amplitude for layer, amplitude, _, _ in items}
    for name in ("word", "token_type"):
        assert scaled[name] == pytest.approx(scaled["position"], rel=0.5), scaled
    # and that scale is the LayerNorm's input std, ~0.02 * sqrt(3): unscaled they are ~30x larger
    layers = {layer.name: layer for layer in report.record.layers}
    assert layers["word"].gradient.rms / scaled["word"] == pytest.approx(1 / (0.02 * math.sqrt(3)), rel=0.3)


def _tiny_llama(vocab: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.mark.slow
def test_a_swiglu_decoder_with_a_small_vocabulary_is_healthy_and_has_no_head_boundary() -> None:
    pytest.importorskip("transformers")
    model = _tiny_llama(vocab=64)  # the head (64 wide) narrower than the MLP (352): the boundary search's trap
    report = gradscope.audit(model, input_shape=(2, 16), input_dtype=torch.int64, vocab=64)
    assert report.analysis["head_boundary"] is None
    assert not [f for f in report.findings if f.severity != "info"], report.findings


@pytest.mark.slow
def test_watched_gemma_norm_gains_are_not_judged_as_weights() -> None:
    pytest.importorskip("transformers")
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    config = GemmaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, pad_token_id=0,
    )  # fmt: skip
    model = GemmaForCausalLM(config)
    assert type(model.model.norm).__name__ == "GemmaRMSNorm" and float(model.model.norm.weight.abs().max()) == 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    with gradscope.watch(model, every=1, raise_on=(), on_finding=lambda f: None) as scope:
        for _ in range(24):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            scope.step(opt, loss=loss)
            opt.step()
    report = scope.report()
    assert math.isfinite(float(loss))
    ratio = [f for f in report.findings if f.code == "update-ratio"]
    assert not ratio, ratio[0].message if ratio else ""


class SparseLookup(nn.Module):
    """word2vec / fastText / recommender style: a sparse embedding (COO gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(100, 16, sparse=True)
        self.head = nn.Linear(16, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.table(ids).mean(1))


def test_a_sparse_gradient_is_measured_by_its_stored_values() -> None:
    """``nn.Embedding(sparse=True)``: the audit failed ('the backward pass raised' on
    gradscope's own ``take``) and watch raised from its per-step norm (``reshape``)."""
    torch.manual_seed(0)
    model = SparseLookup()
    report = gradscope.audit(model, input_shape=(4, 8), input_dtype=torch.int64, vocab=100)
    table = report.record.layer("table")
    assert table.weight_grad is not None and 0 < table.weight_grad.count <= 4 * 8 * 16  # the touched rows' values
    dense = torch.optim.Adam(model.head.parameters())
    sparse = torch.optim.SparseAdam(list(model.table.parameters()))
    ids = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(2))
    with gradscope.watch(model, every=1, raise_on=(), on_finding=lambda f: None) as scope:
        for _ in range(3):
            dense.zero_grad()
            sparse.zero_grad()
            nn.functional.cross_entropy(model(ids), target).backward()
            want = math.sqrt(sum(float(p.grad.to_dense().pow(2).sum()) for p in model.parameters()))
            scope.step(sparse)
            sparse.step()
            dense.step()
    assert scope.report().analysis["training"]["global_grad_norm_last"] == pytest.approx(want, rel=1e-5)


def _collapsing_bn_stack() -> nn.Module:
    """Ten 1x1 conv + BatchNorm + SiLU blocks with BatchNorm gains drawn at N(0, 0.02^2)
    (transformers' MobileViT _init_weights does this): each block shrinks the signal
    until the variance BatchNorm divides by is its eps, after which it rescales nothing."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1)]
    for _ in range(10):
        conv = nn.Conv2d(16, 16, 1)
        nn.init.normal_(conv.weight, std=0.02)
        nn.init.zeros_(conv.bias)
        norm = nn.BatchNorm2d(16)
        nn.init.normal_(norm.weight, std=0.02)
        layers += [conv, norm, nn.SiLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_a_signal_collapsing_below_the_normalisations_eps_is_vanishing_and_the_gains_are_named() -> None:
    """The depth rule scaled each gradient by the std the BatchNorm divides by; it
    divides by sqrt(var + eps), and with var far below eps that hid a 10^6x collapse:
    the audit said only fp16-underflow."""
    model = _collapsing_bn_stack()
    report = gradscope.audit(model, input_shape=(8, 3, 16, 16))
    stds = [layer.activation.std for layer in report.record.layers if layer.type == "BatchNorm2d"]
    assert stds[-1] < 1e-5 * stds[0]  # the collapse is real (1.9e-2 to 2.1e-8)
    (vanishing,) = [f for f in report.findings if f.code == "vanishing-gradient"]
    assert vanishing.severity == "error"
    assert "below their eps" in vanishing.fix.summary
    namespace: dict = {"model": model}
    exec(vanishing.fix.code, namespace)  # the snippet as the user pastes it
    again = gradscope.audit(model, input_shape=(8, 3, 16, 16))
    assert "vanishing-gradient" not in again.codes()
