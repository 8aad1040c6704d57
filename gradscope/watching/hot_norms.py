"""Each gradient's squared norm, taken the moment backward completes it, while
it is still in the CPU's caches.

Why: the every-step global gradient norm reads every gradient once.  Read at
``scope.step``, after the whole backward, a gradient has left the caches and
the read costs DRAM bandwidth: 3.4 ms for the benchmark MLP's 9.4M float32
gradients against 1.5 ms for the same dots taken right after each gradient was
written (``benchmarks/profile_watch.py``; 1024x1024 tensors, 32 MiB L3) — the
difference is 1.3% of that model's step.  A post-accumulate-grad hook runs
right after autograd wrote ``.grad``, so that is where the dot goes.

The value is used only if the gradient is still the one measured: the same
tensor object (a weak reference, nothing kept alive) at the same version
counter (every in-place change — ``GradScaler.unscale_``, ``clip_grad_norm_``,
an in-place all-reduce — bumps it).  Anything else is measured again at
``scope.step`` as before, so the hot path only ever saves time.

Used only where the gradient autograd writes is final: one process on the CPU
(on CUDA one fused ``_foreach_norm`` at step time is cheaper than a launch per
parameter; under DDP/FSDP/TP the gradient is reduced after the hook), float32
gradients, no gradient accumulation (the hook would run once per micro-batch:
the first repeat turns the hot path off for the run).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradscope.placement import ParameterRef, registered_parameter


def _eligible(params: Sequence[torch.Tensor | None]) -> bool:
    """Plain float32 CPU parameters in a single process (see the module docstring)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return False
    return all(
        p is not None
        and type(p) in (torch.Tensor, torch.nn.Parameter)  # not a DTensor or FSDP1 FlatParameter
        and p.device.type == "cpu"
        and p.dtype == torch.float32
        for p in params
    )


class HotSquares:
    """Squared gradient norms written by post-accumulate-grad hooks into one
    float32 vector, slot i for the i-th trainable parameter."""

    def __init__(self, refs: Sequence[ParameterRef]) -> None:
        params = [None if ref.handle is not None else registered_parameter(ref.module, ref.attr) for ref in refs]
        self.enabled = bool(refs) and _eligible(params)
        self.squares = torch.zeros(len(refs), dtype=torch.float32)
        self._cells = list(self.squares.unbind(0))  # views: dot(out=cell) allocates nothing
        self._measured: list[tuple[weakref.ref, int] | None] = [None] * len(refs)
        self._fired = [False] * len(refs)
        self._handles: list[Any] = []
        if self.enabled:
            for i, param in enumerate(params):
                assert param is not None
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook(i)))

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if self.enabled and not torch.compiler.is_compiling():
                self.measure(i, param.grad)

        return hook

    def measure(self, i: int, grad: torch.Tensor | None) -> None:
        """Slot ``i``'s squared norm, from the gradient autograd just completed."""
        if self._fired[i]:  # a second backward before step(): gradient accumulation
            self.enabled = False
            return
        self._fired[i] = True
        if grad is None or grad.dtype != torch.float32 or grad.layout != torch.strided:
            return
        flat = grad.detach().view(-1) if grad.is_contiguous() else grad.detach().reshape(-1)
        torch.dot(flat, flat, out=self._cells[i])
        self._measured[i] = (weakref.ref(grad), grad._version)

    def _current(self, i: int, grad: torch.Tensor) -> bool:
        measured = self._measured[i]
        return measured is not None and measured[0]() is grad and measured[1] == grad._version

    def take(
        self, grads: Sequence[torch.Tensor | None], measure: Callable[[list[torch.Tensor]], torch.Tensor]
    ) -> torch.Tensor | None:
        """The squared norms of the non-None ``grads`` (slot order), hot where the
        gradient is still the one measured, else ``measure``d now; None when the
        hot path is off.  Starts the next step's round."""
        if not self.enabled or len(grads) != len(self._cells):
            self.reset()
            return None
        present = [i for i, grad in enumerate(grads) if grad is not None]
        stale = [i for i in present if not self._current(i, grads[i])]  # type: ignore[arg-type]
        if stale:
            fresh = measure([grads[i] for i in stale])  # type: ignore[misc]
            self.squares.index_copy_(0, torch.tensor(stale), fresh.to(self.squares))
        out = self.squares.clone() if len(present) == len(grads) else self.squares[present]
        self.reset()
        return out

    def reset(self) -> None:
        self._fired = [False] * len(self._cells)

    def close(self) -> None:
        self.enabled = False
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._measured = [None] * len(self._cells)
