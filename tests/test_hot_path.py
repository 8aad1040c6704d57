"""The hot path's cost, counted rather than timed (a shared machine's timings are
noise; counts of kernels, copies and bytes are not): what the hooks allocate for
a channels_last or fp8 tensor, what a Python loss costs, how many ops the
gradient norms of bf16 gradients take."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import gradscope
from gradscope.stats import take_sample
from gradscope.watching.scope import Scope
from gradscope.watching.step_norms import squared_norms


class _Calls(TorchFunctionMode):
    """Every torch function and Tensor method called while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.names: Counter[str] = Counter()
        self.args: list[tuple[str, tuple]] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", str(func))
        self.names[name] += 1
        self.args.append((name, args))
        return func(*args, **(kwargs or {}))


def _allocated_bytes(fn: Any) -> int:
    """Bytes the CPU allocator handed out while ``fn`` ran (profile_memory: every
    allocation, freed or not), a measure independent of machine load."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.cpu_memory_usage, 0) for e in prof.events() if e.cpu_parent is None)


def test_a_channels_last_activation_is_sampled_in_place() -> None:
    """Issue 14: hooks copied a channels_last tensor whole (10 MB for 0.44 MB of
    statistics).  Now the bytes allocated are O(sample), the same as for the
    contiguous tensor, and the extremes are still exact."""
    torch.manual_seed(0)
    x = torch.randn(64, 64, 32, 32)  # 16 MiB of fp32
    cl = x.contiguous(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    contiguous_bytes = _allocated_bytes(lambda: take_sample(x, 4096))
    # The first call of a layout computes the sample's storage offsets once (cached).
    first_bytes = _allocated_bytes(lambda: take_sample(cl, 4096))
    assert first_bytes < x.numel() * 4 // 20
    channels_last_bytes = _allocated_bytes(lambda: take_sample(cl, 4096))
    assert channels_last_bytes <= 2 * contiguous_bytes + 4096
    # O(sample): 49 KB measured (32.6 KB contiguous), where the whole copy was 16.8 MB before
    assert channels_last_bytes < x.numel() * 4 // 100
    taken = take_sample(cl, 4096)
    assert float(taken.lo) == float(x.min()) and float(taken.hi) == float(x.max())
    assert 4096 // 2 <= taken.values.numel() <= 2 * 4096


def test_a_strided_slice_is_sampled_without_a_whole_copy() -> None:
    """A slice with gaps in memory (no dense view exists) is sampled by gathering
    only the sampled elements; they are those of the contiguous copy."""
    torch.manual_seed(1)
    base = torch.randn(256, 4096)
    sliced = base[:, ::2]
    taken = take_sample(sliced, 1024)
    copied = take_sample(sliced.contiguous(), 1024)
    assert torch.equal(taken.values, copied.values)
    assert float(taken.lo) == float(sliced.min()) and float(taken.hi) == float(sliced.max())
    assert _allocated_bytes(lambda: take_sample(sliced, 1024)) < sliced.numel() * 4 // 20


def test_an_fp8_activation_is_never_widened_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp8 extremes are read a chunk at a time (aminmax has no fp8 kernel): no fp32
    temporary larger than the chunk, and the extremes equal the whole tensor's."""
    import gradscope.stats as stats

    torch.manual_seed(2)
    x = (torch.randn(1 << 16) * 50).to(torch.float8_e4m3fn)
    monkeypatch.setattr(stats, "EXTREMES_CHUNK", 4096)
    widened: list[int] = []
    real_float = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda t: widened.append(t.numel()) or real_float(t))
    taken = take_sample(x, 1024)
    assert widened and max(widened) <= 4096
    reference = real_float(x)
    assert float(taken.lo) == float(reference.min()) and float(taken.hi) == float(reference.max())


def _train(model: nn.Module, steps: int, every: int, loss_as_float: bool, calls: _Calls | None = None) -> Any:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 8), torch.randn(16, 2)
    losses = []
    with Scope(model, every=every, raise_on=(), on_finding=lambda f: None, diagnose=False) as scope:
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            value = loss.item() if loss_as_float else loss
            losses.append(loss.item())
            if calls is not None:
                with calls:
                    scope.step(opt, loss=value)
            else:
                scope.step(opt, loss=value)
            opt.step()
    return scope, losses


def test_a_python_loss_creates_no_tensor_per_step() -> None:
    """A loss given as a float stays on the host (a kernel argument of one fill):
    on a GPU a tensor made from it would be a blocking host-to-device copy."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2))
    calls = _Calls()
    scope, losses = _train(model, steps=6, every=3, loss_as_float=True, calls=calls)

    def holds_a_loss(value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return any(holds_a_loss(v) for v in value)
        return isinstance(value, float) and value in losses

    carried = [name for name, args in calls.args if holds_a_loss(args)]
    # Only ever a kernel argument (a fill of a ring slot, an add to the flag), never a tensor of its own.
    assert carried and set(carried) <= {"fill_", "__add__", "__radd__", "add"}, carried
    reported = [loss for flush in scope.recent for _, loss in flush.losses]
    assert reported == pytest.approx(losses, rel=1e-6)


def test_a_nonfinite_python_loss_is_still_caught_on_an_unsampled_step() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 8), torch.randn(16, 2)
    with pytest.raises(gradscope.GradscopeError) as caught:
        with Scope(model, every=10, on_finding=lambda f: None, diagnose=False) as scope:
            for step in range(4):
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                scope.step(opt, loss=math.nan if step == 2 else 1.0)
                opt.step()
    assert caught.value.record["step"] == 2 and caught.value.record["role"] == "loss"


def test_bf16_gradient_norms_take_a_fixed_number_of_ops() -> None:
    """Issue 14: bf16/fp16 gradients took 2-3 kernels per parameter per step.  Now
    one fused ``_foreach_norm`` for all of them, a stack and a square: 3 ops,
    whatever the number of parameters, and the same numbers as per-tensor norms."""
    torch.manual_seed(5)
    grads = [torch.randn(64, 64).bfloat16() for _ in range(12)] + [torch.randn(64).half() for _ in range(12)]
    calls = _Calls()
    with calls:
        squares = squared_norms(grads)
    ops = {name: n for name, n in calls.names.items() if name != "__get__"}  # attribute reads are not ops
    assert sum(ops.values()) <= 3, ops
    expected = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in grads])
    assert torch.allclose(squares, expected, rtol=1e-6)


def test_a_channels_last_weight_snapshot_is_a_sample_view() -> None:
    """The update-ratio snapshot of a channels_last conv weight is a view of about
    UPDATE_RATIO_SAMPLE elements that follows in-place updates, not the whole weight."""
    from gradscope.watching.update_ratio import UPDATE_RATIO_SAMPLE, weight_sample

    weight = torch.randn(64, 64, 3, 3).contiguous(memory_format=torch.channels_last)
    view = weight_sample(weight)
    assert view.numel() == UPDATE_RATIO_SAMPLE
    assert view.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    before = view.clone()
    weight.mul_(2.0)
    assert torch.equal(view, 2 * before)
