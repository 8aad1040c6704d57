"""Between device and host, a watched run moves values only through the flush's
transfer (issue 14 item 4), checked on the CPU with ``tests/device_traffic.py``:
no device value is read on the host and no tensor made from Python data joins
device work, in the hooks, at ``scope.step`` (unsampled, sampled and full
flushes, read late as on CUDA) and in ``optimizer.step``.  The CUDA-only
``tests/test_cuda_sync.py`` checks the same on a GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope.host_copy
from gradscope.watching.options import DIAGNOSE_EVERY_STEPS
from gradscope.watching.scope import Scope
from tests.device_traffic import SequenceNet, device_traffic


class _NumberScaler:
    """A custom loss scaler whose scale is a Python number."""

    def _get_scale_async(self) -> float:
        return 1024.0


def _run(
    monkeypatch: pytest.MonkeyPatch,
    every: int,
    steps: int,
    warmup: int,
    lengths: tuple[int, ...] = (10,),
    micro_batches: int = 1,
    tier: str = "full",
    evaluate: bool = False,
) -> dict[str, int]:
    torch.manual_seed(0)
    model = SequenceNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [(torch.randn(8, 4, length), torch.randint(0, 3, (8,))) for length in lengths]
    scope = Scope(model, every=every, raise_on=(), on_finding=lambda f: None, tier=tier)
    scope.read_late = True  # the code path CUDA runs
    violations: dict[str, int] = {}
    for step in range(warmup + steps):
        x, y = batches[step % len(batches)]
        guard = device_traffic(monkeypatch) if step >= warmup else None
        traffic = guard.__enter__() if guard is not None else None
        if traffic is not None:
            traffic.mark_device([*model.parameters(), *model.buffers(), x, y])
        try:
            opt.zero_grad()
            for _ in range(micro_batches):  # gradient accumulation: every forward and backward recorded
                loss = nn.functional.cross_entropy(model(x), y) / micro_batches
                loss.backward()
            if micro_batches > 1:
                # a trainer's order (the Hugging Face Trainer): norms measured, then clipped, then step()
                scope.observe_gradients()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            # a tensor loss, a Python-number loss, and a custom scaler's Python-number scale
            scope.step(opt, loss=loss.detach() if step % 3 else 0.5, scaler=_NumberScaler() if step % 2 else None)
            opt.step()
            if evaluate and step % 5 == 0:  # an evaluation loop inside the watched run
                with scope.paused(), torch.no_grad():
                    model.eval()
                    model(x)
                    model.train()
        finally:
            if guard is not None:
                guard.__exit__(None, None, None)
        if traffic is not None:
            for line, count in traffic.violations.items():
                violations[line] = violations.get(line, 0) + count
        for p in model.parameters():  # the guard's marks end with it
            p.__dict__.pop("_gradscope_device_value", None)
    scope.close()
    return violations


@pytest.mark.parametrize("every", [1, 4])
def test_a_watched_run_moves_values_only_through_the_flush_transfer(
    monkeypatch: pytest.MonkeyPatch, every: int
) -> None:
    # Warm-up: the first flushes agree on layouts and fill the device caches;
    # then two full flushes (the diagnosis) and the steps between them.
    warmup = DIAGNOSE_EVERY_STEPS + 2
    violations = _run(monkeypatch, every, steps=2 * DIAGNOSE_EVERY_STEPS, warmup=warmup)
    assert not violations, "\n".join(f"{n}x {line}" for line, n in violations.items())


@pytest.mark.parametrize("every", [1, 3])
def test_variable_sequence_lengths_add_no_host_to_device_copy(monkeypatch: pytest.MonkeyPatch, every: int) -> None:
    """Dynamic padding (every batch its own length, as a DataLoader with a
    padding collator gives): the statistics' element counts change every flush,
    and must reach the device without a copy from host memory (a blocking one on
    CUDA, a stall per flush)."""
    warmup, steps = DIAGNOSE_EVERY_STEPS + 2, 2 * DIAGNOSE_EVERY_STEPS
    lengths = tuple(range(5, 5 + warmup + steps))  # a length no earlier step had, every step
    violations = _run(monkeypatch, every, steps=steps, warmup=warmup, lengths=lengths)
    assert not violations, "\n".join(f"{n}x {line}" for line, n in violations.items())


@pytest.mark.parametrize("every", [1, 3])
def test_gradient_accumulation_and_pre_clip_norms_add_no_crossing(monkeypatch: pytest.MonkeyPatch, every: int) -> None:
    """Five micro-batches per step (their statistics merged on the device, past
    the pending budget too) and the trainer path that measures gradient norms
    before clipping (``observe_gradients``): nothing crosses either."""
    from gradscope import recorder

    monkeypatch.setattr(recorder, "PENDING_ENTRIES", 12)  # merge early, mid-step, as long accumulations do
    warmup = DIAGNOSE_EVERY_STEPS + 2
    violations = _run(monkeypatch, every, steps=2 * DIAGNOSE_EVERY_STEPS, warmup=warmup, micro_batches=5)
    assert not violations, "\n".join(f"{n}x {line}" for line, n in violations.items())


@pytest.mark.parametrize("every", [1, 4])
def test_the_light_tier_and_paused_evaluations_add_no_crossing(monkeypatch: pytest.MonkeyPatch, every: int) -> None:
    """``tier="light"`` (parametrised layers only, norms on sampled steps) and an
    evaluation forward inside ``scope.paused()`` every five steps."""
    warmup = DIAGNOSE_EVERY_STEPS + 2
    violations = _run(monkeypatch, every, steps=2 * DIAGNOSE_EVERY_STEPS, warmup=warmup, tier="light", evaluate=True)
    assert not violations, "\n".join(f"{n}x {line}" for line, n in violations.items())


def test_the_guard_sees_each_kind_of_crossing(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = torch.randn(4, 4)
    with device_traffic(monkeypatch) as traffic:
        traffic.mark_device([weight])
        norm = weight.norm()
        float(norm)  # a read of a device value
        weight.to("cpu", torch.float64).tolist()  # a copy to the host, read
        norm * torch.tensor([2.0])  # host data into device work
        host = torch.tensor([1.0, 2.0]) * 3  # host work alone: fine
        host.tolist()
        # the sanctioned way in (pinned and non-blocking on CUDA): fine
        norm * gradscope.host_copy.copy_to_device((2.0,), weight.device, torch.float32)
    kinds = sorted({line.split(" at ")[0] for line in traffic.violations})
    assert sum(traffic.violations.values()) == 4  # one per line above; the copy_to_device line added none
    assert kinds == [
        "a device value read on the host (Tensor.__float__)",
        "a device value read on the host (Tensor.tolist)",
        "a device value read on the host (_local_scalar_dense)",
        "a tensor made from host data used in device work (a host-to-device copy)",
    ]
