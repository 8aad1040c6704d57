"""Real architectures at their standard init: no false alarm; deliberately broken: the right finding.

Needs the optional extra ``models`` (transformers, monai, efficientnet-pytorch,
diffusers; see ``real_architectures.py`` for why these libraries and not
torchvision/timm).  Every model is built from a config with small widths and
inputs: the whole module runs in about a minute on 2 cores.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradscope.auditing import audit
from gradscope.fix import apply_init
from gradscope.report import Report, Severity

pytestmark = pytest.mark.slow

ra = pytest.importorskip("real_architectures")

LIBRARY = {"hf": "transformers", "monai": "monai", "efficientnet": "efficientnet_pytorch", "diffusers": "diffusers"}


def _library(name: str) -> str:
    return LIBRARY[name.split("_")[0]]


def _build(name: str) -> tuple[nn.Module, dict]:
    pytest.importorskip(_library(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # config deprecation chatter of the libraries
        return ra.ARCHITECTURES[name]()


def _loud(report: Report) -> list[str]:
    return [
        f"{f.code}: {f.message}" for f in report.findings if Severity(f.severity) in (Severity.ERROR, Severity.WARNING)
    ]


def test_the_suite_covers_the_architectures_the_issue_names() -> None:
    names = set(ra.ARCHITECTURES)
    assert len(names) >= 15
    assert len({_library(n) for n in names}) >= 3
    # CNNs with and without BN, a DenseNet, a MobileNet/EfficientNet, a ViT with a zero-init head,
    # a layer-scale model (ConvNeXt), a Swin, GPT-2, a Llama-style decoder, T5, BERT, audio models.
    assert {
        "hf_resnet", "monai_plain_cnn", "monai_densenet", "hf_mobilenet_v2", "efficientnet_b0", "hf_vit_zero_head",
        "hf_convnext", "hf_swin", "hf_gpt2", "hf_llama", "hf_t5", "hf_bert", "hf_wav2vec2", "hf_whisper",
    } <= names  # fmt: skip


@pytest.mark.parametrize("name", sorted(ra.ARCHITECTURES))
def test_standard_architecture_at_its_standard_init_has_no_warning_or_error(name: str) -> None:
    model, kwargs = _build(name)
    report = audit(model, **kwargs)
    assert _loud(report) == []
    assert report.summary()["healthy"] is True
    assert "vanishing-gradient" not in report.codes()


def test_vit_zero_head_is_said_as_information() -> None:
    model, kwargs = _build("hf_vit_zero_head")
    report = audit(model, **kwargs)
    info = next(f for f in report.findings if f.code == "zero-init")
    assert info.severity is Severity.INFO and info.layers == ["classifier"]
    assert "after the first update" in info.message


def test_convnext_gamma_is_recognised_as_layer_scale() -> None:
    model, kwargs = _build("hf_convnext")
    report = audit(model, **kwargs)
    scales = report.analysis["layer_scale"]
    assert scales and all(value == pytest.approx(1e-6) for value in scales.values())


def test_audio_front_end_ahead_of_a_transformer_is_not_vanishing() -> None:
    for name in ("hf_wav2vec2", "hf_whisper"):
        model, kwargs = _build(name)
        report = audit(model, **kwargs)
        assert "vanishing-gradient" not in report.codes(), name


def test_fix_auto_on_a_healthy_transformer_changes_nothing() -> None:
    model, kwargs = _build("hf_bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_init(model, "auto", **kwargs) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- deliberately broken ------------------------------------------------------------------------


def _monai_plain(norm: str | None) -> nn.Module:
    pytest.importorskip("monai")
    from monai.networks.nets import Classifier

    torch.manual_seed(0)
    return Classifier(
        in_shape=(3, 32, 32), classes=10, channels=(16,) * 12, strides=(1,) * 9 + (2, 2, 2), num_res_units=0, norm=norm
    )


def test_removed_normalisation_turns_a_healthy_plain_cnn_into_vanishing() -> None:
    assert _loud(audit(_monai_plain("batch"), **ra.IMAGE)) == []
    report = audit(_monai_plain(None), **ra.IMAGE)
    vanishing = next(f for f in report.findings if f.code == "vanishing-gradient")
    assert vanishing.severity is Severity.ERROR
    assert vanishing.layers[0] == "net.layer_0.conv"
    # PyTorch's default init under PReLU(0.25): ~0.18-0.32 of the variance per conv, found and attributed.
    poor = next(f for f in report.findings if f.code == "poor-init")
    assert poor.severity is Severity.WARNING and poor.evidence["cause"] == "weights"


def test_unit_variance_weights_blow_up_a_residual_cnn() -> None:
    model, kwargs = _build("monai_plain_cnn")
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 1.0)
    report = audit(model, **kwargs)
    codes = {f.code for f in report.findings if Severity(f.severity) in (Severity.ERROR, Severity.WARNING)}
    assert {"exploding-activations", "fp16-overflow", "poor-init"} <= codes
    assert "vanishing-gradient" not in codes


class _Log(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


def test_a_nan_source_inside_bert_is_named() -> None:
    model, kwargs = _build("hf_bert")
    model.bert.encoder.layer[0].intermediate.intermediate_act_fn = _Log()
    report = audit(model, **kwargs)
    finding = next(f for f in report.findings if f.code == "nonfinite")
    assert finding.layers == ["bert.encoder.layer.0.intermediate.intermediate_act_fn"]
    assert finding.evidence["produced"] is True


def test_fp16_overflow_in_gpt2_starts_at_the_embedding() -> None:
    model, kwargs = _build("hf_gpt2")
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1e6)
    report = audit(model, **kwargs)
    finding = next(f for f in report.findings if f.code == "fp16-overflow")
    assert finding.severity is Severity.ERROR
    assert finding.layers[0] == "transformer.wte"
    assert finding.evidence["absmax"] > 65504


# The depth rules scale each layer's gradient by the std its normalisation layer
# divides by (depth._norm_scale).  A watch records no layer inputs, and the
# layer's own output std stands for the norm's input only when the norm reads it
# directly (conv -> BN); behind a residual add (BERT's post-LN blocks) it was
# ~100x too small and a watched BERT "exploded" 1,000x.  The watch now records a
# normalisation's input when it is not the output recorded just before it.
WATCHED = ["hf_bert", "hf_gpt2", "hf_llama", "hf_t5", "hf_resnet", "hf_vit_zero_head", "monai_plain_cnn"]


@pytest.mark.parametrize("name", WATCHED)
def test_a_watched_standard_architecture_gets_no_depth_or_init_alarm(name: str) -> None:
    import gradscope
    from gradscope.inputs import compute_loss, resolve_spec, synthetic_input

    model, kwargs = _build(name)
    spec = resolve_spec(model, kwargs["input_shape"], kwargs.get("input_dtype", torch.float32), kwargs.get("vocab"))
    generator = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)  # the init's verdict, not a trained model's
    with gradscope.watch(model, every=1, raise_on=(), on_finding=lambda f: None) as scope:
        for _ in range(3):
            x = synthetic_input(spec, generator, torch.device("cpu"))
            loss = compute_loss(model(x), "ce", generator).loss
            opt.zero_grad()
            loss.backward()
            scope.step(opt, loss=loss.detach())
            opt.step()
    report = scope.report()
    # the depth and init verdicts; precision and training-configuration rules have tests of their own
    depth_and_init = ("vanishing-gradient", "exploding-gradient", "vanishing-activations", "exploding-activations")
    assert [f for f in _loud(report) if f.split(":")[0] in (*depth_and_init, "poor-init")] == []
