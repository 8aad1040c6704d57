"""``audit(..., batches=N)``: each pass's weight gradient is its own batch's, and the
model comes back exactly as it was, on every path the audit can take.

Paths: ``released`` (the default: each ``.grad`` freed once its statistics are
taken, ``auditing._GradientRelease``), ``kept`` (what distributed models and
reentrant checkpoints get: gradients read after backward) and ``chunked``
(``chunked.bounded_raw_stats`` in slices of 4 elements, so that every tensor here
is read in several chunks).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import gradscope.auditing as auditing
import gradscope.recorder as recorder_module
from gradscope import audit
from gradscope.chunked import bounded_raw_stats

PATHS = ("released", "kept", "chunked")


def _use_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "kept":
        monkeypatch.setattr(auditing, "_releasable", lambda model, loss: False)
    elif path == "chunked":
        monkeypatch.setattr(recorder_module, "bounded_raw_stats", functools.partial(bounded_raw_stats, chunk=4))


def _mse_per_call(targets: list[torch.Tensor]):  # noqa: ANN202 (a loss callable)
    """MSE against ``targets[k]`` on the k-th call: each pass has its own target."""
    calls = iter(targets)

    def loss(output: torch.Tensor) -> torch.Tensor:
        return ((output - next(calls)) ** 2).mean()

    return loss


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("batches", [1, 2, 3])
def test_weight_gradient_statistics_merge_the_per_batch_gradients(
    path: str, batches: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closed form: for L = 1/(N·m) Σ‖W x_n + b − y_n‖², ∂L/∂W = 2/(N·m) (W X + b − Y)ᵀ X.
    With N batches the audit's weight-gradient statistics are those of the N
    per-batch gradients taken together as samples (count N·numel), not of the
    running sum ``.grad`` accumulates when nobody zeroes it."""
    _use_path(path, monkeypatch)
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    n, m = 5, 2
    x = torch.randn(n, 3)
    targets = [torch.randn(n, m) for _ in range(batches)]

    report = audit(layer, x, loss=_mse_per_call(targets), batches=batches, diagnose=False)

    with torch.no_grad():
        w, b, xd = layer.weight.double(), layer.bias.double(), x.double()
        per_batch = [2 / (n * m) * (xd @ w.T + b - y.double()).T @ xd for y in targets]
    samples = torch.cat([g.flatten() for g in per_batch])
    got = report.layers[0].weight_grad
    assert got.count == batches * layer.weight.numel()
    # float32 gradients against float64 theory: a few ulps of values of order 1
    assert got.mean == pytest.approx(samples.mean().item(), rel=1e-6, abs=1e-7)
    assert got.std == pytest.approx(samples.std(unbiased=False).item(), rel=1e-6, abs=1e-7)
    assert got.min == pytest.approx(samples.min().item(), rel=1e-6, abs=1e-7)
    assert got.max == pytest.approx(samples.max().item(), rel=1e-6, abs=1e-7)
    # the weights themselves do not move during the audit: every pass sees the same ones
    assert report.layers[0].weight.count == batches * layer.weight.numel()
    assert report.layers[0].weight.mean == pytest.approx(w.mean().item(), rel=1e-9, abs=1e-12)


def _hook_free(model: nn.Module) -> bool:
    modules_clean = all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
        for m in model.modules()
    )
    params_clean = all(not p._backward_hooks and not p._post_accumulate_grad_hooks for p in model.parameters())
    return modules_clean and params_clean


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().view(torch.int32).clone()  # float32: equal bits, NaN and -0.0 included


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("batches", [1, 3])
def test_audit_leaves_the_model_as_it_found_it(path: str, batches: int, monkeypatch: pytest.MonkeyPatch) -> None:
    _use_path(path, monkeypatch)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 4))
    model.train()
    model[3].eval()  # a mix of modes, which must come back exactly
    model(torch.randn(10, 6)).sum().backward()  # the user's own gradients
    model[4].bias.requires_grad_(False)  # frozen after a backward: it keeps a .grad the audit never makes
    model[0].bias.grad = None  # and a parameter without one
    model[0].weight.grad[0, 0] = -0.0  # bit patterns an approximate comparison would miss
    model[0].weight.grad[0, 1] = float("nan")
    grads = {name: p.grad for name, p in model.named_parameters()}
    bits = {name: _bits(g) for name, g in grads.items() if g is not None}
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}

    report = audit(model, torch.randn(10, 6), loss="mse", batches=batches, diagnose=False)

    assert report.layers[0].weight_grad.count == batches * model[0].weight.numel()  # it did see gradients
    for name, p in model.named_parameters():
        assert p.grad is grads[name], name  # None, or the very tensor the user had
        if grads[name] is not None:
            assert torch.equal(_bits(p.grad), bits[name]), name
    assert {name: m.training for name, m in model.named_modules()} == modes
    for key, value in model.state_dict().items():  # parameters and BatchNorm running statistics
        assert torch.equal(value, state[key]), key
    assert _hook_free(model)
