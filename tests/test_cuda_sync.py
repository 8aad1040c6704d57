"""No host synchronisation anywhere in a watched step on a GPU (issue 14 item 4).

``torch.cuda.set_sync_debug_mode("error")`` makes every synchronising CUDA call
raise, including those inside C++ ops (``.item()``, a blocking copy, a
``nonzero``, a ``bincount`` sizing its output) that the CPU guard of
``test_no_sync.py`` cannot see.  Watched steps run under it: every=1 (a flush
each step) and every=10 (unsampled steps), fp32 and bf16 autocast, with and
without a GradScaler, a loss given as a tensor and as a Python number.

``scope.step`` is guarded on sampled steps too: on CUDA a flush is read one
flush late (``Scope.read_late``, ``gradscope.host_copy``): its statistics go
to pinned memory with a non-blocking copy and an event, and the host reads
them once the event says they landed.  The per-step flag is read the same way.

What is still exempt, and why:

* the GradScaler's own ``step``/``update`` (its inf check reads the device);
* ``close()`` and ``report()``, which read what is still in flight.

The flushes at the diagnosis cadence are guarded like the others: their
weights measurement is reduced on the device and packed into the flush, and
the model tensors the diagnosis reads (a GRU's recurrent weights, a PReLU's
slope: the "sequence" model) are copied with it (``model_snapshot``).  On the
CPU, ``tests/test_device_traffic.py`` checks the same paths by following
device values through every op.

An ``Event.synchronize()`` (waiting for a copy that has not landed yet) is not
a stream sync and sync-debug mode does not flag it; it only happens when the
host runs more than a flush ahead of the device.  Skipped without CUDA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import gradscope
from gradscope.watching.options import DIAGNOSE_EVERY_STEPS
from tests.device_traffic import SequenceNet

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@contextlib.contextmanager
def syncs_raise() -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _batch(kind: str) -> torch.Tensor:
    if kind == "sequence":
        return torch.randn(8, 3, 12, device="cuda")
    return torch.randn(8, 3, 16, 16, device="cuda").to(memory_format=torch.channels_last)


def _model(kind: str = "cnn") -> nn.Module:
    torch.manual_seed(0)
    if kind == "sequence":
        return SequenceNet(channels=3, width=16, classes=10).cuda()
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).cuda()


@pytest.mark.parametrize("every", [1, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("python_loss", [False, True])
@pytest.mark.parametrize("kind", ["cnn", "sequence"])
def test_watched_steps_never_synchronise(
    every: int, dtype: torch.dtype, scaled: bool, python_loss: bool, kind: str
) -> None:
    model = _model(kind)
    if kind == "cnn":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda") if scaled else None
    x = _batch(kind)
    y = torch.randint(0, 10, (8,), device="cuda")
    assert 24 > 2 * DIAGNOSE_EVERY_STEPS  # two diagnosis flushes inside the guard
    with gradscope.watch(model, every=every, raise_on=(), on_finding=lambda f: None) as scope:
        assert scope.read_late  # the default on CUDA
        for _ in range(24):
            opt.zero_grad(set_to_none=True)
            with syncs_raise(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                loss = nn.functional.cross_entropy(model(x), y)
                (scaler.scale(loss) if scaler is not None else loss).backward()
            value = loss.detach()
            if python_loss:
                value = 1.25  # a number the training loop already had on the host
            with syncs_raise():
                scope.step(opt, scaler=scaler, loss=value)
            if scaler is not None:
                scaler.step(opt)  # the scaler's own inf check reads the device: outside the guard
                scaler.update()
            else:
                with syncs_raise():
                    opt.step()
    torch.cuda.synchronize()
    report = scope.report()
    assert report.run["steps"] == 24
    assert report.record.steps == len(range(0, 24, every))  # every sampled step's flush was read
    want = ["conv", "bn", "act"] if kind == "sequence" else ["0", "1", "2"]
    assert [layer.name for layer in report.layers][:3] == want


@pytest.mark.parametrize("every", [1, 3])
def test_dynamic_sequence_lengths_never_synchronise(every: int) -> None:
    """Dynamic padding: every batch has a length no earlier batch had, so each
    flush finalises statistics of a new layout whose element counts must reach
    the device (``device_constants.on_device`` misses): through pinned memory,
    without the stream sync a copy from pageable memory makes."""
    model = _model("sequence")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    y = torch.randint(0, 10, (8,), device="cuda")
    with gradscope.watch(model, every=every, raise_on=(), on_finding=lambda f: None) as scope:
        for step in range(24):
            x = torch.randn(8, 3, 5 + step, device="cuda")
            opt.zero_grad(set_to_none=True)
            with syncs_raise():
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                scope.step(opt, loss=loss.detach())
                opt.step()
    torch.cuda.synchronize()
    assert scope.report().record.steps == len(range(0, 24, every))
