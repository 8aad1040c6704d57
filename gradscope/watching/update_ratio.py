"""The update ratio ‖Δw‖/‖w‖ of each layer's weight: a sample of the weight is
copied before ``optimizer.step()`` and compared with the weight after it, on
the device; the squared norms travel with the next flush (summed over ranks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradscope.placement import ParameterRef
from gradscope.recorder import Recorder
from gradscope.stats import dense_view, sample_stride
from gradscope.watching.step_norms import squared_norms

# Elements per weight behind the update ratio: ‖Δw‖/‖w‖ over a sample of m
# elements spread over the weight is within ~1/sqrt(2m) relative (2.2% at 1024)
# of the whole weight's; the healthy band it is judged against spans decades.
UPDATE_RATIO_SAMPLE = 1024


_UPDATE_RATIO_BLOCK = 64  # contiguous elements per block: 4 cache lines of fp32


def weight_sample(weight: torch.Tensor) -> torch.Tensor:
    """A view of a sample of ``weight`` that follows in-place updates.

    UPDATE_RATIO_SAMPLE elements in blocks of 64 contiguous ones, the blocks a
    prime number of elements apart (so they start at varied columns): reading
    a weight that has left the caches then costs 64 cache-line misses rather
    than 1024 for single strided elements.
    """
    n = weight.numel()
    # A dense non-contiguous weight (channels_last conv) is sampled in memory order:
    # returning it whole made the snapshot a full copy of it every sampled step.
    flat = dense_view(weight)
    if flat is None or n <= 2 * UPDATE_RATIO_SAMPLE:
        return weight
    blocks = UPDATE_RATIO_SAMPLE // _UPDATE_RATIO_BLOCK
    # A prime >= (n - block) // blocks, capped so that the last block still fits.
    step = min(sample_stride(n - _UPDATE_RATIO_BLOCK, blocks), (n - _UPDATE_RATIO_BLOCK) // (blocks - 1))
    return flat.as_strided((blocks, _UPDATE_RATIO_BLOCK), (step, 1), flat.storage_offset())


def _uniform(tensors: list[torch.Tensor]) -> bool:
    """Whether one fused ``torch._foreach_*`` call takes them (one device and dtype)."""
    return all(t.device == tensors[0].device and t.dtype == tensors[0].dtype for t in tensors)


class UpdateRatios:
    """Snapshots of the sampled step's weights and the ratios resolved from them."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.snapshot: tuple[int, list[str], list[torch.Tensor], list[torch.Tensor]] | None = None
        self.ready: list[tuple[int, list[str], torch.Tensor]] = []
        self.weight_dtypes: dict[str, str] = {}  # layer -> dtype of its weight
        self.handles: list[Any] = []  # optimizer hooks, removed by close()
        self._hooked: set[int] = set()
        # The snapshot's storage, reused while the sampled weights keep their shapes
        # (the previous snapshot is always resolved before the next is taken).
        self._copies: tuple[tuple[Any, ...], list[torch.Tensor]] | None = None

    def weight_refs(self) -> list[tuple[str, ParameterRef]]:
        """(layer name, main weight) of each recorded layer (first call site only).

        Under a reduction group, of every selected layer instead: the ratios are
        summed across ranks element by element, so their layout must not depend
        on which layers this rank saw run (a branch taken on one rank only made
        the ranks' vectors differ in length, which aborted gloo, or in order,
        which summed one layer's ratio into another's).  The host keeps the
        ratios of layers some rank recorded (``recorded_ratios``)."""
        if self.recorder.group is not None:
            return self.recorder.selected_weight_refs()
        out = []
        for layer in self.recorder.record.layers:
            ref = self.recorder.weight_ref(layer.name) if layer.call == 1 else None
            if ref is not None:
                out.append((layer.name, ref))
        return out

    def layer_weights(self, registered: bool = False) -> dict[str, torch.Tensor]:
        """Each recorded layer's main weight (first call site only), by layer name,
        looked up now and not kept (FSDP may swap the parameter object between
        steps): this rank's part of it (a view that follows in-place updates),
        or with ``registered`` the parameter object the optimizer holds (an
        FSDP1 unit's FlatParameter)."""
        weights: dict[str, torch.Tensor] = {}
        for name, ref in self.weight_refs():
            if registered:
                param = ref.registered()
                if param is not None:
                    weights[name] = param
                continue
            local = ref.resolve(True)
            if local is not None:
                weights[name] = local.value
        if not registered:
            self.weight_dtypes = {name: str(w.dtype).removeprefix("torch.") for name, w in weights.items()}
        return weights

    def take_snapshot(self, step: int) -> None:
        """Keep the weights as they are before ``optimizer.step()``.

        Only a prime-strided sample of each weight (at most ~2 x UPDATE_RATIO_SAMPLE
        elements) is copied: ‖Δw‖/‖w‖ over the same sampled elements estimates
        the ratio within ~1/sqrt(2k) relative, while a full copy of every
        weight each sampled step cost a quarter of an MLP's step time.
        """
        weights = self.layer_weights()
        if not weights:
            return
        names = list(weights)
        views = [weight_sample(weights[n].detach()) for n in names]
        copies = self._storage(views)
        if _uniform(views):
            torch._foreach_copy_(copies, views)  # one call for every layer, where a clone each cost an op each
        else:
            for copy, view in zip(copies, views, strict=True):
                copy.copy_(view)
        self.snapshot = (step, names, views, copies)

    def _storage(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tensors shaped like ``views`` to copy them into, allocated once per layout."""
        layout = tuple((v.shape, v.dtype, v.device) for v in views)
        if self._copies is None or self._copies[0] != layout:
            self._copies = (layout, [torch.empty(v.shape, dtype=v.dtype, device=v.device) for v in views])
        return self._copies[1]

    def hook_post(self, optimizer: Any) -> None:
        """Resolve the update ratio right after ``optimizer.step()`` (frees the
        snapshot at once).  Wrappers such as accelerate's ``AcceleratedOptimizer``
        do not run hooks of their own: the wrapped optimizer's are used.  Without
        any, the ratio is resolved at the next ``step()`` call."""
        if id(optimizer) in self._hooked:
            return
        self._hooked.add(id(optimizer))

        def post_hook(opt: Any, args: Any, kwargs: Any) -> None:
            self.resolve()

        for target in (optimizer, getattr(optimizer, "optimizer", None)):
            if target is None or not hasattr(target, "_optimizer_step_post_hooks"):
                continue
            self.handles.append(target.register_step_post_hook(post_hook))
            return

    def resolve(self) -> None:
        """‖w_after − w_before‖ / ‖w_before‖ per layer, on the device; frees the snapshot."""
        if self.snapshot is None:
            return
        step, names, params, before = self.snapshot
        self.snapshot = None
        with torch.no_grad():
            diffs: Sequence[torch.Tensor]
            if _uniform(params) and params[0].dtype == torch.float32:
                diffs = torch._foreach_sub(params, before)  # one call for every layer
                # Squared norms of Δw and w, summed over the ranks' parts at the flush:
                # one fused call each (1,024-element samples: a dot each bought nothing)
                ratio = torch.stack(torch._foreach_norm([*diffs, *before])).square()
            else:
                diffs = [p - b for p, b in zip(params, before, strict=True)]
                ratio = torch.cat([squared_norms(diffs), squared_norms(before)])
        self.ready.append((step, names, ratio))

    def close(self) -> None:
        """Remove the optimizer hooks and drop the snapshot."""
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.remove()
        self.snapshot = None
        self._copies = None
