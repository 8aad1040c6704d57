"""The compatibility matrix: features of real training code the recorder must survive.

Each case checks that the output is bit-identical to an unwatched run and that
what could be recorded was recorded, counted once.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradscope.recorder import Recorder


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 4)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reentrant is None:
            h = self.inner(x)
        else:
            h = checkpoint(self.inner, x, use_reentrant=self.reentrant)
        return self.head(h)


def _record(model: nn.Module, x: torch.Tensor) -> tuple[dict, torch.Tensor, list[torch.Tensor]]:
    with Recorder(model) as rec:
        rec.start()
        out = model(x)
        rec.stop()  # as the audit does: the backward still reports gradients
        out.sum().backward()
        rec.capture_parameters()
        record = rec.finish()
    grads = [p.grad.clone() for p in model.parameters()]
    return {layer.name: layer for layer in record.layers}, out.detach(), grads


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_the_recomputed_forward_once(reentrant: bool) -> None:
    x = torch.randn(8, 16, requires_grad=reentrant)  # the reentrant variant needs an input that requires grad
    plain, plain_out, plain_grads = _record(_Checkpointed(None), x)
    layers, out, grads = _record(_Checkpointed(reentrant), x)
    assert torch.equal(out, plain_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads, strict=True))
    assert list(layers) == list(plain) == ["inner.0", "inner.1", "inner.2", "head"]  # no "#2" call sites
    for name, layer in layers.items():
        assert layer.activation.count == plain[name].activation.count  # the recomputation is not counted
        assert layer.activation.mean == pytest.approx(plain[name].activation.mean, rel=1e-6, abs=1e-9)
        assert layer.gradient is not None, f"{name}: no ∂ℓ/∂h recorded"
        assert layer.gradient.count == plain[name].gradient.count
        assert layer.gradient.rms == pytest.approx(plain[name].gradient.rms, rel=1e-6)


def test_torch_compile_is_recorded_without_changing_numbers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    reference = model(x)
    compiled = torch.compile(model, backend="eager")  # dynamo tracing; no C++ build in the test
    with Recorder(model) as rec:
        rec.start()
        out = compiled(x)
        out.sum().backward()
        record = rec.finish()
    assert torch.equal(out, reference)
    assert [layer.name for layer in record.layers] == ["0", "1", "2"]
    # Inside a compiled region the hooks only queue tensor work (no graph break,
    # tests/test_watch_compiled.py): activations are recorded, ∂ℓ/∂h is not, and
    # the record says so.
    assert all(layer.activation is not None and layer.gradient is None for layer in record.layers)
    assert any("torch.compile" in note and "∂ℓ/∂h is not" in note for note in record.notes)
    assert not any(m._forward_hooks for m in model.modules())


def test_autocast_bf16_statistics_keep_the_tensor_dtype() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(32, 64)
    with Recorder(model) as rec:
        rec.start()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
        record = rec.finish()
    first = record.layer("0")
    assert first.output_dtype == "bfloat16"
    # Moments of the bf16 output are accumulated in fp32: compare with a float64 reference.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model[0](x).double()
    assert first.activation.mean == pytest.approx(ref.mean().item(), abs=1e-6)
    assert first.activation.std == pytest.approx(ref.std(unbiased=False).item(), rel=1e-6)


def test_autocast_bf16_tensors_are_judged_against_their_own_format() -> None:
    """Activations past fp16's maximum are an fp16-overflow in fp32, but not
    once autocast made them bf16, whose range holds them."""
    from gradscope.diagnose import diagnose_record

    def record_of(autocast: bool) -> object:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        with torch.no_grad():
            model[0].weight.mul_(1e5)  # activations ~1e5 > 65504
        with Recorder(model) as rec:
            rec.start()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(torch.randn(8, 16))
            out.float().sum().backward()
            return rec.finish()

    fp32_findings, _ = diagnose_record(record_of(False), formats=("fp16",))
    bf16_record = record_of(True)
    bf16_findings, _ = diagnose_record(bf16_record, formats=("fp16",))
    assert "fp16-overflow" in {f.code for f in fp32_findings}
    assert bf16_record.layer("0").output_dtype == "bfloat16"
    assert "fp16-overflow" not in {f.code for f in bf16_findings}
    assert not [f for f in bf16_findings if f.code.startswith("bf16")]
