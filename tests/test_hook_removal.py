"""Every hook comes off, whatever happens, and nothing keeps a tensor alive.

After the pattern of captum's ``tests/attr/test_hook_removal.py``: each way of
using the recorder (context manager, attach/close, ``audit``) is run to a
normal end and through each failure path (an exception in forward, in
backward, a KeyboardInterrupt), and afterwards no module of the model may
carry a forward, forward-pre or backward hook.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from gradscope import audit
from gradscope.errors import InputError
from gradscope.recorder import Recorder


class _Boom(torch.autograd.Function):
    """Identity forward whose backward raises."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom in backward")


class Faulty(nn.Module):
    """A layer that fails the way ``mode`` says."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "forward":
            raise RuntimeError("boom in forward")
        if self.mode == "interrupt":
            raise KeyboardInterrupt
        if self.mode == "backward":
            return _Boom.apply(x)
        return x * 1.0


def make_model(mode: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(inplace=True), Faulty(mode), nn.Linear(8, 3))


MODES = ["normal", "forward", "backward", "interrupt"]
EXPECTED: dict[str, type[BaseException] | None] = {
    "normal": None,
    "forward": RuntimeError,
    "backward": RuntimeError,
    "interrupt": KeyboardInterrupt,
}


def _step(model: nn.Module) -> None:
    model(torch.randn(6, 4)).square().mean().backward()


def use_context(model: nn.Module) -> None:
    with Recorder(model) as rec:
        rec.start()
        _step(model)
        rec.capture_parameters()
        rec.finish()


def use_attach(model: nn.Module) -> None:
    rec = Recorder(model).attach()
    try:
        rec.start()
        _step(model)
        rec.finish()
    finally:
        rec.close()


def use_audit(model: nn.Module) -> None:
    audit(model, torch.randn(6, 4), loss="mean")


USAGES: dict[str, Callable[[nn.Module], None]] = {"context": use_context, "attach": use_attach, "audit": use_audit}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("usage", list(USAGES))
def test_hooks_removed(usage: str, mode: str, assert_no_hooks: Callable[[nn.Module], None]) -> None:
    model = make_model(mode)
    expected = EXPECTED[mode]
    if usage == "audit" and expected is RuntimeError:
        expected = InputError  # audit turns forward/backward errors into one-line InputErrors
    if expected is None:
        USAGES[usage](model)
    else:
        with pytest.raises(expected):
            USAGES[usage](model)
    assert_no_hooks(model)
    assert model.training  # audit restores the mode even on failure; the others never change it
    # The model still works, untouched by leftovers.
    model[3].mode = "normal"
    _step(model)


def test_tensor_hooks_do_not_fire_into_a_closed_recorder() -> None:
    model = make_model("normal")
    rec = Recorder(model).attach()
    rec.start()
    out = model(torch.randn(6, 4))  # tensor hooks now sit on the graph
    rec.flush()
    steps = rec.record.steps
    rec.close()
    out.sum().backward()  # the graph outlived the recorder
    assert rec.pending_count() == 0
    rec.flush()
    assert rec.record.steps == steps
    assert all(layer.gradient is None for layer in rec.record.layers)


def test_close_twice_and_reattach(assert_no_hooks: Callable[[nn.Module], None]) -> None:
    model = make_model("normal")
    rec = Recorder(model).attach()
    assert rec.attached
    rec.close()
    rec.close()
    assert not rec.attached
    assert_no_hooks(model)
    with rec:  # a closed recorder can be used again
        rec.start()
        _step(model)
        record = rec.finish()
    assert record.layer("4").gradient is not None
    assert_no_hooks(model)


def test_no_reference_to_activations_or_gradients_survives() -> None:
    """Weak references to every output and every ∂ℓ/∂h die after the step and
    flush, while the recorder is still attached and after it closed."""
    model = make_model("normal")
    acts: list[weakref.ref] = []
    grads: list[weakref.ref] = []

    def spy(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        acts.append(weakref.ref(output))
        output.register_hook(lambda g: grads.append(weakref.ref(g)) or None)

    spies = [m.register_forward_hook(spy) for m in model]
    try:
        with Recorder(model, record_inputs=True) as rec:
            rec.start()
            x = torch.randn(6, 4)
            model(x).square().mean().backward()
            rec.capture_parameters()
            rec.flush()
            del x
            gc.collect()
            assert len(acts) == 5 and len(grads) >= 4
            alive = [r for r in acts + grads if r() is not None]
            assert not alive, f"{len(alive)} tensors still referenced while recording"
            record = rec.finish()
    finally:
        for handle in spies:
            handle.remove()
    gc.collect()
    assert all(r() is None for r in acts + grads)
    assert record.layer("0").gradient is not None
