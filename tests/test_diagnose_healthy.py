"""No false alarms: healthy reference models produce no warning and no error."""

from __future__ import annotations

import pytest
import torch
from diagnose_models import (  # noqa: F401 (one_thread: autouse fixture)
    ResNet,
    SmallInitEncoder,
    TinyTransformer,
    kaiming,
    mlp,
    one_thread,
    xavier,
)
from torch import nn

from gradscope.auditing import audit
from gradscope.report import Report, Severity


def _loud(report: Report) -> list[str]:
    return [
        f"{f.code} ({f.severity.value}): {f.message}"
        for f in report.findings
        if Severity(f.severity) in (Severity.ERROR, Severity.WARNING)
    ]


def test_kaiming_30_layer_relu_mlp_is_healthy() -> None:
    report = audit(mlp(30, init=kaiming), input_shape=(64, 64))
    assert _loud(report) == []
    assert report.analysis["first_unhealthy_backward"] is None
    assert report.analysis["first_unhealthy_forward"] is None


def test_small_resnet_with_batchnorm_and_inplace_relu_is_healthy() -> None:
    report = audit(ResNet(), input_shape=(64, 3, 16, 16))
    assert _loud(report) == []
    # The in-place ReLU module called twice per block is recorded per call site.
    assert "blocks.0.relu#2" in {layer.name for layer in report.layers}


def test_transformer_encoder_with_embedding_is_healthy() -> None:
    torch.manual_seed(0)
    report = audit(TinyTransformer(), input_shape=(16, 12), input_dtype=torch.int64)
    assert _loud(report) == []
    assert report.analysis["depth"][0]["type"] == "Embedding"


def test_xavier_10_layer_tanh_mlp_is_healthy() -> None:
    report = audit(mlp(10, act=nn.Tanh, init=xavier), input_shape=(64, 64))
    assert _loud(report) == []


def test_default_init_3_layer_mlp_is_not_a_warning() -> None:
    report = audit(mlp(3), input_shape=(64, 64))
    assert _loud(report) == []


@pytest.mark.parametrize("batch", [8, 128])
def test_batch_size_does_not_change_the_verdict(batch: int) -> None:
    # ∂ℓ/∂logits scales as 1/batch under a mean loss: the rules are relative.
    report = audit(mlp(30, init=kaiming), input_shape=(batch, 64))
    assert _loud(report) == []


def test_small_query_key_gradients_of_attention_are_not_vanishing() -> None:
    torch.manual_seed(0)
    report = audit(SmallInitEncoder(), input_shape=(8, 32), input_dtype=torch.int64)
    rms = {layer.name: layer.gradient.rms for layer in report.layers if layer.gradient is not None}
    # The branch really is tiny (below the course's 1e-6 floor, 1e5x under the head)...
    assert rms["layers.0.query"] < 1e-6 and rms["layers.0.query"] / rms["head"] < 1e-4
    # ...but the gradient that reaches the input end (the embedding) is healthy.
    assert _loud(report) == []
    assert report.analysis["first_unhealthy_backward"] is None


def test_resnet_fed_unnormalised_pixels_is_not_vanishing() -> None:
    # Pixels in [0, 255]: the stem's output std is ~100x larger, so BatchNorm divides
    # its gradient by ~100; that is the input's scale, not depth.
    torch.manual_seed(0)
    report = audit(ResNet(), inputs=torch.rand(32, 3, 16, 16) * 255)
    stem = report.record.layer("stem")
    assert stem.activation is not None and stem.activation.std > 20
    assert _loud(report) == []
