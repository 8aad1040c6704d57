"""The update ratio ‖Δw‖/‖w‖ of each layer's weight: a sample of the weight is
copied before ``optimizer.step()`` and compared with the weight after it, on
the device; the squared norms travel with the next flush (summed over ranks).

Weights that are (near) zero by design
--------------------------------------
‖Δw‖/‖w‖ measures a step against what the weight already is.  A parameter that
starts at or near zero on purpose has no such scale yet: a layer scale (a
per-channel gain initialised at 1e-6…1e-4 on a residual branch: CaiT, Touvron
et al. 2021; DeiT III; ConvNeXt's gamma, Liu et al. 2022), a zero gain (ReZero,
Bachlechner et al. 2020; SkipInit; Gemma's RMSNorm weight, used as 1 + w), a
zero-initialised table or layer (nanoGPT's learned position embedding, a
zero-init head, Fixup's last branch layer).  Under Adam each element moves by
about c·lr (c <= 1, Kingma & Ba 2015) whatever its value, so such a weight's
ratio is c·lr/rms(w): 100 for a 1e-5 gain at lr 1e-3, then ≈ 1/t while it grows
from its init, however sound the learning rate.  Its size says how far it has
grown, not how large the step is for what the weight does.

So the ratio of a weight that is tiny at its first snapshot (the watch's view of
its init) is taken against max(‖w‖, a reference norm), the norm the weight's
role gives it (``reference_rms``): a gain's identity value 1 per element (a
normalisation gain starts there; a layer scale's branch output is added to a
stream of its own scale, so a step Δγ changes the stream by about Δγ relative,
not Δγ/γ), and for a matrix or table that starts at exactly zero the LeCun
scale 1/sqrt(fan_in) of a trained matrix of that fan-in (LeCun et al. 1998).
Once the weight has grown past that norm its ratio is the plain one.  A too
high learning rate is still seen on them (lr 0.5 moves a gain by ~0.5 of its
reference), and on every ordinary weight as before.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

import torch

from gradscope.diagnose.structure import LAYER_SCALE_MAX, gain_like
from gradscope.placement import ParameterRef
from gradscope.recorder import Recorder
from gradscope.stats import dense_view, sample_stride
from gradscope.watching.step_norms import squared_norms

# Elements per weight behind the update ratio: ‖Δw‖/‖w‖ over a sample of m
# elements spread over the weight is within ~1/sqrt(2m) relative (2.2% at 1024)
# of the whole weight's; the healthy band it is judged against spans decades.
UPDATE_RATIO_SAMPLE = 1024


_UPDATE_RATIO_BLOCK = 64  # contiguous elements per block: 4 cache lines of fp32
# Snapshot layouts whose storage is kept (one per optimizer of the run, see take_snapshot's ``only``).
_KEPT_LAYOUTS = 4


def reference_rms(shape: Sequence[int]) -> tuple[float, float]:
    """(largest rms at the first snapshot for the weight to be small by design, the rms its
    update is then judged against; see the module docstring).

    A gain (one non-singleton dimension at most, as ``gradscope.diagnose.structure``
    recognises layer scales): at or below LAYER_SCALE_MAX, judged against 1.  Any
    other weight: exactly zero, judged against 1/sqrt(fan_in), fan_in being the
    elements per slice of its first non-singleton dimension ([out, in, k, k]: in·k·k;
    a position table [1, T, d]: d)."""
    dims = [int(d) for d in shape]
    if gain_like(dims):
        return LAYER_SCALE_MAX, 1.0
    sizes = [d for d in dims if d > 1]
    fan_in = math.prod(sizes[1:]) if len(sizes) > 1 else 1
    return 0.0, 1.0 / math.sqrt(max(fan_in, 1))


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
        # The snapshot's storage, by layout, reused while the sampled weights keep their
        # shapes (the previous snapshot is always resolved before the next is taken).
        self._copies: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        # Layer -> the floor of its weight's squared norm (a 0-dim device tensor, 0 for an
        # ordinary weight), decided at the layer's first snapshot (module docstring).
        self._floors: dict[str, torch.Tensor] = {}
        self._reference: dict[str, tuple[float, float]] = {}  # layer -> reference_rms of its weight
        self._stacked: dict[tuple[str, ...], torch.Tensor] = {}  # the floors of a snapshot's layers
        self._sizes: list[int] = []  # elements in each view of the snapshot

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

    def take_snapshot(self, step: int, only: Collection[str] | None = None) -> None:
        """Keep the weights as they are before ``optimizer.step()``; ``only``: of these
        layers alone (those the step's optimizer updates, when another one's step
        was sampled: see ``Scope._owed_snapshot``).

        Only a prime-strided sample of each weight (at most ~2 x UPDATE_RATIO_SAMPLE
        elements) is copied: ‖Δw‖/‖w‖ over the same sampled elements estimates
        the ratio within ~1/sqrt(2k) relative, while a full copy of every
        weight each sampled step cost a quarter of an MLP's step time.
        """
        weights = self.layer_weights()
        if only is not None:
            weights = {n: w for n, w in weights.items() if n in only}
        if not weights:
            return
        names = list(weights)
        if any(n not in self._reference for n in names):
            shapes = dict(self.weight_refs())
            for n in names:
                if n not in self._reference:
                    ref = shapes.get(n)
                    self._reference[n] = reference_rms(ref.shape if ref is not None else weights[n].shape)
        views = [weight_sample(weights[n].detach()) for n in names]
        self._sizes = [v.numel() for v in views]
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
        copies = self._copies.get(layout)
        if copies is None:
            if len(self._copies) >= _KEPT_LAYOUTS:
                self._copies.clear()
            copies = self._copies[layout] = [torch.empty(v.shape, dtype=v.dtype, device=v.device) for v in views]
        return copies

    def _floored(self, names: list[str], before: torch.Tensor) -> torch.Tensor:
        """The squared norms ``before`` raised to each weight's reference norm where it
        was small by design at its first snapshot (device ops only: the decision is a
        ``where`` on the first snapshot's own norm, never read on the host)."""
        key = tuple(names)
        floors = self._stacked.get(key)
        if floors is None:
            for i, name in enumerate(names):
                if name not in self._floors:  # once per layer and run
                    small, reference = self._reference.get(name, (0.0, 0.0))
                    size = self._sizes[i]
                    # small by design: rms at or below ``small`` (exactly zero for a matrix or table)
                    floor = torch.where(before[i] <= size * small**2, size * reference**2, 0.0)
                    self._floors[name] = floor.to(before.dtype)
            if len(self._stacked) >= _KEPT_LAYOUTS:
                self._stacked.clear()
            floors = self._stacked[key] = torch.stack([self._floors[n] for n in names])
        return before.clamp_(min=floors)

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
            self._floored(names, ratio[len(names) :])  # in place
        self.ready.append((step, names, ratio))

    def close(self) -> None:
        """Remove the optimizer hooks and drop the snapshot."""
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.remove()
        self.snapshot = None
        self._copies = {}
        self._stacked = {}
