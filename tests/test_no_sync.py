"""No host synchronisation inside the hooks, proven on the CPU.

While the forward and backward of a non-flush step run, every way a hook
could read a device value back to the host raises.  Training must go on
undisturbed; the statistics reach the host only at flush.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from gradscope.recorder import Recorder

_SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__")


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def host_sync_forbidden(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(name: str):  # noqa: ANN202
        def method(*args: object, **kwargs: object) -> None:
            raise HostSync(f"Tensor.{name} called while hooks run")

        return method

    with monkeypatch.context() as patch:
        for name in _SYNCING:
            patch.setattr(torch.Tensor, name, refuse(name))
        patch.setattr(torch.cuda, "synchronize", refuse("cuda.synchronize"))
        yield


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 32),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(32, 10),
    )


def test_the_guard_catches_a_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.ones(2)
    with host_sync_forbidden(monkeypatch), pytest.raises(HostSync):
        if x.sum() > 0:  # __bool__ on a tensor: the classic hidden sync
            pass
    with host_sync_forbidden(monkeypatch), pytest.raises(HostSync):
        x.sum().item()


@pytest.mark.parametrize("sample", [None, 64])
def test_recorder_hooks_never_sync(monkeypatch: pytest.MonkeyPatch, sample: int | None) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    with Recorder(model, sample=sample, record_inputs=True) as rec:
        for step in range(4):
            rec.start()
            opt.zero_grad()
            with host_sync_forbidden(monkeypatch):
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                rec.capture_parameters()  # weight statistics are enqueued, not read
            opt.step()
            if step % 2 == 1:
                rec.flush()  # the one transfer, outside the guard
        record = rec.finish()
    assert record.steps == 2
    linear = record.layer("4")
    assert linear.activation is not None and linear.activation.count == 4 * 16 * 32
    assert linear.gradient is not None and linear.weight_grad is not None


@pytest.mark.parametrize("tier", ["full", "light"])
def test_watch_never_syncs_on_non_flush_steps(monkeypatch: pytest.MonkeyPatch, tier: str) -> None:
    """Forward, backward (where every hook runs, sampled step or not) and the
    optimizer step (the update-ratio hook) never sync; ``scope.step`` syncs
    only when it flushes, on sampled steps."""
    gradscope = pytest.importorskip("gradscope")
    watch = getattr(gradscope, "watch", None)
    if watch is None:
        pytest.skip("gradscope.watch is not available")
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    every = 4
    with watch(model, every=every, raise_on=(), tier=tier) as scope:
        for step in range(3 * every):
            opt.zero_grad()
            with host_sync_forbidden(monkeypatch):
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
            flush_step = step % every == 0
            with contextlib.nullcontext() if flush_step else host_sync_forbidden(monkeypatch):
                scope.step(opt)
            with host_sync_forbidden(monkeypatch):
                opt.step()  # runs the update-ratio post-step hook
    report = scope.report()
    assert report.record.layers, "watch recorded nothing"
