"""Every step's device-only numbers: the global gradient norm, the loss and the
loss scale, in a ring of ``every`` slots read at the next flush (no host sync).

The ring holds squared norms of this rank's part (shards whole, replicas on one
rank only), which the flush sums over the reduction group before the square
root: √(Σ over ranks of local Σg²), as ``clip_grad_norm_`` does for DTensors.
Parameters are looked up by name at each step, never kept: FSDP swaps and
frees parameter storage (``gradscope.placement``).

Which parameters: those the step's optimizer will apply, when ``step(optimizer)``
names one: the parameters of its ``param_groups`` that hold a gradient, which is
exactly what ``optimizer.step()`` reads (SGD, Adam and AdamW skip only a ``.grad``
of None, so a frozen parameter left in the optimizer with a stale gradient is
applied, and counted).  A GAN's D keeps the gradient of the G loss that G's
optimizer never applies, and a frozen backbone keeps its last gradient: neither is
in the norm of a step that does not apply it.  Trainable parameters that no
optimizer given to ``step()`` holds stay in: an optimizer the watch is not shown
steps them (dense Adam beside SparseAdam, AdamW beside Muon).  The optimizer's parameters are
matched to the model's names once per optimizer and again only when its
``param_groups`` change (``OptimizerScopes``): no per-step loop beyond today's.
Without an optimizer (or one none of whose parameters is the model's): every
parameter of the model that has a gradient at the step,
as ``clip_grad_norm_(model.parameters())`` reads them
(it skips a parameter whose ``.grad`` is None), whether or not it required one
when the watch started: a backbone unfrozen mid-run (progressive unfreezing) is
in the norm and the non-finite check from its first gradient on.  The model's
parameter list is scanned again at a sampled step (a flush's step) only when a
parameter or submodule was registered anywhere since the last scan (torch's
global registration hooks set a flag; a scan walks every module, 4 ms on a
24-layer transformer, too much for every step at every=1): a module added
mid-run (``add_module`` + ``add_param_group``) joins at the next flush.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from gradscope.device_constants import on_device
from gradscope.optimizer_audit import base_optimizer
from gradscope.placement import ParameterRef, ParameterTable, local_gradients, registered_parameter, whole_tensor
from gradscope.recorder import Recorder
from gradscope.watching.scaling import scale_value

# Rows of the ring.
NORM, LOSS, SCALE = 0, 1, 2

# (layout names, names with a gradient, their squared norms, which of the layout they are)
GradientSquares = tuple[list[str], list[str], torch.Tensor | None, tuple[bool, ...] | None]
# (names with a gradient, their squared norms, the total): what the per-step check reads
StepSquares = tuple[list[str], torch.Tensor | None, torch.Tensor | None]


def squared_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared 2-norms, stacked as one float32 vector on the first tensor's device;
    accumulated in float32 for fp16/bf16 (an fp16 norm would overflow at 65504
    although every element is finite).

    On the CPU a BLAS dot per tensor: 1.6x faster than ``_foreach_norm`` (which
    loops over ``vector_norm`` there) and more accurate (2e-6 vs 1e-5 relative at
    1M elements, 1e-4 vs 7e-4 at 16M, measured against float64).  On CUDA one
    fused ``_foreach_norm`` launch beats a launch per tensor.  Either way the
    squares overflow float32 for norms above ~1.8e19, as ``clip_grad_norm_``'s do.
    """
    device = tensors[0].device
    if all(t.dtype == torch.float32 and t.device == device for t in tensors):
        if device.type == "cpu":
            return torch.stack([torch.dot(flat, flat) for flat in (t.reshape(-1) for t in tensors)])
        return torch.stack(torch._foreach_norm(list(tensors))).square()
    if all(t.device == device and t.dtype in (torch.float16, torch.bfloat16, torch.float32) for t in tensors):
        # One fused launch for every tensor (fp16/bf16 read in place, accumulated in
        # float32) where a loop took a norm, a cast, a square and a stack entry each.
        return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=torch.float32)).square()
    squares = []
    for t in tensors:
        norm = torch.linalg.vector_norm(t, dtype=torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None)
        squares.append(norm.float().square().to(device))
    return torch.stack(squares)


class StructureChanges:
    """Whether any module registered a parameter or submodule since the last ``take``:
    torch's process-wide registration hooks (torch.nn.modules.module) set a flag, so
    nothing is walked per step.  The hooks hold this object weakly and ``close``
    removes them."""

    def __init__(self) -> None:
        from torch.nn.modules import module as modules

        self.changed = True
        self.changed_for_hooks = False  # the same, for the recorder's selection (take_for_hooks)
        me = weakref.ref(self)

        def mark(*_: Any) -> None:
            watcher = me()
            if watcher is not None:
                watcher.changed = watcher.changed_for_hooks = True

        self._handles = [
            modules.register_module_parameter_registration_hook(mark),
            modules.register_module_module_registration_hook(mark),
        ]

    def take(self) -> bool:
        changed, self.changed = self.changed, False
        return changed

    def take_for_hooks(self) -> bool:
        """``take`` for a second reader: the Scope, which hooks modules added mid-run."""
        changed, self.changed_for_hooks = self.changed_for_hooks, False
        return changed

    def close(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()


def _groups_signature(optimizer: Any) -> tuple[tuple[int, int], ...] | None:
    """What changes when the optimizer's parameters do: each group's parameter list
    (``add_param_group`` appends a group; replacing a list changes its id); None
    when the optimizer shows no ``param_groups`` (then the whole model is measured)."""
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list):
        return None
    try:
        return tuple((id(group["params"]), len(group["params"])) for group in groups)
    except (KeyError, TypeError):
        return None


class OptimizerScopes:
    """The model's parameters an optimizer applies, by name, per optimizer: matched
    once, and again when its ``param_groups`` change or the model's parameters were
    scanned again.  Optimizers are numbered in the order ``step()`` first names them
    (the key of their norm history in ``TrainingState``); never keeps a parameter."""

    def __init__(self) -> None:
        # id(optimizer) -> (its groups' signature, the model scan and the generation it was
        # matched against, its index, its refs or None)
        self._cache: dict[int, tuple[Any, int, int, int, list[ParameterRef] | None]] = {}
        # id(optimizer) -> the names of the model's parameters it holds; a new optimizer,
        # or one whose groups changed, starts a new generation (every match is redone).
        self._held: dict[int, frozenset[str]] = {}
        self._generation = 0
        self.labels: list[str] = []
        self.sizes: list[int] = []  # parameters of the model each optimizer applies (0: the whole model)
        self.names: list[frozenset[str]] = []  # their names
        # Said once per match (for the report's notes): frozen parameters the optimizer
        # holds with a gradient still in .grad, which its step applies.
        self.notes: list[str] = []

    def refs(self, optimizer: Any, table: list[ParameterRef], scan: int) -> tuple[int, list[ParameterRef] | None]:
        """(the optimizer's index, the refs of the model's parameters its step applies)
        or refs None: measure the whole model (no readable groups).

        Applied: the parameters in its groups, and the trainable parameters that no
        optimizer given to ``step()`` holds.  Those are stepped by an optimizer the
        watch is never shown (dense Adam beside a SparseAdam, AdamW beside Muon,
        both stepped after one ``scope.step(opt)``): leaving them out would take
        their gradients out of the norm and the non-finite check.  A parameter that
        another optimizer given to ``step()`` holds (a GAN's D at G's step) is that
        optimizer's, and a frozen one that none holds is stepped by nothing."""
        base = base_optimizer(optimizer)
        signature = _groups_signature(base)
        cached = self._cache.get(id(base))
        if cached is not None and cached[:3] == (signature, scan, self._generation):
            return cached[3], cached[4]
        index = cached[3] if cached is not None else len(self.labels)
        if cached is None:
            self.labels.append(f"#{index} {type(base).__name__}")
            self.sizes.append(0)
            self.names.append(frozenset())
        own = _applied(base, table) if signature is not None else None
        held = frozenset(ref.name for ref in own or ())
        if cached is None or self._held.get(id(base)) != held or cached[1] != scan:
            self._generation += 1  # the other optimizers' unclaimed parameters change
        self._held[id(base)] = held
        refs = None
        if own is not None:
            claimed = frozenset().union(*self._held.values())
            refs = own + [ref for ref in table if ref.name not in claimed and _trainable(ref)]
            self._note_stale_frozen(index, own)
        self.sizes[index] = len(refs) if refs is not None else 0
        self.names[index] = frozenset(ref.name for ref in refs) if refs is not None else frozenset()
        self._cache[id(base)] = (signature, scan, self._generation, index, refs)
        return index, refs

    def _note_stale_frozen(self, index: int, refs: list[ParameterRef]) -> None:
        """A parameter frozen with ``requires_grad_(False)`` but left in the optimizer
        with its last ``.grad`` is still updated by every step (torch's SGD, Adam and
        AdamW skip only ``grad is None``): likely not what freezing meant.  Checked
        when the optimizer is matched, not per step."""
        stale = []
        for ref in refs:
            param = ref.registered()
            if param is not None and not param.requires_grad and param.grad is not None:
                stale.append(ref.name)
        if stale:
            self.notes.append(
                f"optimizer {self.labels[index]} holds {len(stale)} parameter(s) frozen with requires_grad=False "
                f"that still have a .grad ({stale[0]}{', ...' if len(stale) > 1 else ''}): optimizer.step() applies "
                "that gradient at every step and it is in the step's norm; set p.grad = None when freezing, "
                "or leave them out of the optimizer"
            )


def _trainable(ref: ParameterRef) -> bool:
    """Whether the parameter behind ``ref`` requires a gradient now (read when an
    optimizer is matched, not per step)."""
    param = ref.registered()
    return param is not None and param.requires_grad


def _applied(optimizer: Any, table: list[ParameterRef]) -> list[ParameterRef] | None:
    """The refs of ``table`` whose parameter is in the optimizer's groups: the object
    registered on the module (plain, DTensor), or for an FSDP1 flat parameter either
    the flat parameter or the original one (``use_orig_params``).  None if none is."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    out = []
    for ref in table:
        param = ref.registered()
        if (param is not None and id(param) in held) or (
            ref.handle is not None and id(registered_parameter(ref.module, ref.attr)) in held
        ):
            out.append(ref)
    return out or None


class StepNorms:
    """The ring of per-step norm, loss and scale, and the per-parameter gradient
    norms of the sampled step, for the flush to pack."""

    def __init__(self, recorder: Recorder, every: int, tier: str) -> None:
        self.recorder = recorder
        self.every = every
        self.tier = tier
        self.buf: torch.Tensor | None = None
        self.loss_given = [False] * every
        self.scale_given = [False] * every
        self.norm_given = [False] * every
        # Which optimizer stepped at each slot (OptimizerScopes' index; 0 without one).
        self.optimizer_at = [0] * every
        self.scopes = OptimizerScopes()
        # The parameters the current step's optimizer applies (None: the whole model).
        self._step_refs: list[ParameterRef] | None = None
        self._scans = 0
        # A tensor, or a float while every loss of the step came as a Python number
        # (kept on the host: no host-to-device copy per step).
        self.pending_loss: torch.Tensor | float | None = None
        self.param_norms: tuple[list[str], torch.Tensor] | None = None
        self.scaler_seen = False
        # Gradient clipping done by a trainer between backward and step(): the norms
        # measured before it (observe_gradients).
        self.pre_clip: GradientSquares | None = None
        # This step's loss and gradient squares, for the per-step non-finite check.
        self.step_loss: torch.Tensor | float | None = None
        self.step_squares: tuple[list[str], torch.Tensor | None, torch.Tensor | None] = ([], None, None)
        self._param_refs: list[ParameterRef] | None = None
        self._structure = StructureChanges()

    def observe_loss(self, loss: Any) -> None:
        if isinstance(loss, torch.Tensor):
            loss = whole_tensor(loss)  # a DTensor loss (loss_parallel) joins plain tensors as a plain one
        value: torch.Tensor | float = loss.detach().float().sum() if isinstance(loss, torch.Tensor) else float(loss)
        before = self.pending_loss
        if before is None:
            self.pending_loss = value
        elif isinstance(before, torch.Tensor) and isinstance(value, torch.Tensor):
            self.pending_loss = before + value.to(before)
        else:
            self.pending_loss = before + value  # a Python number joins a tensor as a kernel argument: no copy

    def observe_gradients(self) -> None:
        measured = self.gradient_squares()
        if measured[2] is not None:
            self.pre_clip = measured

    def take_step_check(
        self,
    ) -> tuple[torch.Tensor | float | None, tuple[list[str], torch.Tensor | None, torch.Tensor | None]]:
        """This step's loss and gradient squares, handed over once."""
        out = (self.step_loss, self.step_squares)
        self.step_loss, self.step_squares = None, ([], None, None)
        return out

    def buffer(self, device: torch.device) -> torch.Tensor:
        if self.buf is None or self.buf.device != device:
            self.buf = torch.full((3, self.every), math.nan, dtype=torch.float32, device=device)
        return self.buf

    def parameters(self) -> list[ParameterRef]:
        """Every parameter of the model, by name, trainable now or not (the per-step
        loop keeps those with a gradient); scanned on first use and again by ``rescan``."""
        return self._param_refs if self._param_refs is not None else self.rescan()

    def modules_changed(self) -> bool:
        """Whether a module or parameter was registered anywhere since the last call
        (a flag: nothing walked)."""
        return self._structure.take_for_hooks()

    def rescan_if_changed(self) -> None:
        if self._structure.take():
            self.rescan()

    def rescan(self) -> list[ParameterRef]:
        """The model's parameters as they are now (after any sharding): a module added
        since the last scan joins.  A walk over the modules (4 ms for a 24-layer
        transformer), so at each sampled step only, never per step."""
        self._param_refs = list(ParameterTable(self.recorder.model))
        self._scans += 1  # OptimizerScopes match against the new table
        return self._param_refs

    def trainable(self) -> list[ParameterRef]:
        """The parameters that require a gradient now, read when asked (a layer
        unfrozen mid-run is trainable from then on).  The registered parameter's flag,
        not ``resolve``: no DTensor redistribution for a flag."""
        out = []
        for ref in self.parameters():
            param = ref.registered()
            if param is not None and param.requires_grad:
                out.append(ref)
        return out

    def close(self) -> None:
        """Drop the ring and the registration hooks (the scope closed)."""
        self.buf = None
        self._structure.close()

    def observe(self, step: int, scaler: Any, scaled: bool, sampled: bool, optimizer: Any = None) -> None:
        """Device-only work of every step: global norm, loss, scale into the ring.
        ``optimizer``: the one about to step; its parameters are those measured."""
        slot = step % self.every
        if sampled:
            self.rescan_if_changed()  # a flush's step: parameters added to the model since join here
        self._step_refs = None
        self.optimizer_at[slot] = 0
        if optimizer is not None:
            table = self.parameters()
            self.optimizer_at[slot], self._step_refs = self.scopes.refs(optimizer, table, self._scans)
        measure = sampled or self.tier == "full"
        self.norm_given[slot] = measure
        pre_clip, self.pre_clip = self.pre_clip, None
        names: list[str] = []
        present: list[str] = []
        squares: torch.Tensor | None = None
        mask: tuple[bool, ...] | None = None
        applied: tuple[int, ...] | None = None  # of ``present``, those the optimizer applies
        if measure and pre_clip is None and sampled and self._step_refs is not None:
            # A sampled step: every parameter's norm for the layer rules (a layer of
            # another optimizer is judged by its own last gradient, as before), the
            # step's total and check over the stepping optimizer's parameters only.
            mine = self.scopes.names[self.optimizer_at[slot]]
            self._step_refs = None
            names, present, squares, mask = self.gradient_squares()
            applied = tuple(i for i, name in enumerate(present) if name in mine)
        elif measure:
            # measured before the trainer clipped (observe_gradients), else now
            names, present, squares, mask = pre_clip if pre_clip is not None else self.gradient_squares()
        device = squares.device if squares is not None else self.default_device()
        total, stacked, presence = self._layout(names, squares, mask, sampled, device)
        checked, checked_squares = present, squares
        if applied is not None and squares is not None and len(applied) < len(present):
            checked = [present[i] for i in applied]
            checked_squares = squares.index_select(0, on_device(applied, device, torch.int64)) if applied else None
            total = checked_squares.sum() if checked_squares is not None else torch.zeros((), device=device)
        buf = self.buffer(device)
        scale = scale_value(scaler) if scaler is not None else None
        if scale is not None:
            self.scaler_seen = True
            if isinstance(scale, torch.Tensor):
                scale = scale.to(device=device, dtype=torch.float32)  # GradScaler's own, on the device already
                buf[SCALE, slot] = scale
            else:
                buf[SCALE, slot].fill_(scale)  # a kernel argument: no host-to-device copy
            if scaled:
                total = total / (scale * scale)  # squared norms
                stacked = stacked / (scale * scale)
        self.scale_given[slot] = scale is not None
        if measure:
            buf[NORM, slot] = total
        if isinstance(self.pending_loss, torch.Tensor):
            buf[LOSS, slot] = self.pending_loss.to(device)
        elif self.pending_loss is not None:
            buf[LOSS, slot].fill_(self.pending_loss)  # the number travels as a kernel argument: no copy, no sync
        self.loss_given[slot] = self.pending_loss is not None
        self.step_loss = self.pending_loss
        self.step_squares = (checked, checked_squares, total if checked_squares is not None else None)
        self._step_refs = None  # observe_gradients before the next step measures the whole model
        self.pending_loss = None
        if sampled:
            self.param_norms = (names, stacked if presence is None else torch.cat([stacked, presence]))

    def _layout(
        self,
        names: list[str],
        squares: torch.Tensor | None,
        mask: tuple[bool, ...] | None,
        sampled: bool,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The step's total squared norm, the per-parameter squares in the shared
        layout, and (with a reduction group) which of them this rank holds."""
        presence: torch.Tensor | None = None
        if squares is not None:
            total = squares.sum()
            stacked = squares  # per-parameter squared norms: sampled steps only
            if sampled and mask is not None:
                # The shared layout: 0 where this rank holds none of a parameter;
                # whether it holds a gradient travels alongside.
                stacked = torch.zeros(len(names), dtype=squares.dtype, device=device)
                # indices from the host-known mask, copied to the device once per pattern
                # (a boolean-mask assignment would count the mask on the host: a sync)
                held = on_device(tuple(i for i, here in enumerate(mask) if here), device, torch.int64)
                stacked.index_copy_(0, held, squares)
                presence = on_device(mask, device, squares.dtype)
        else:
            stacked = torch.zeros(len(names), device=device)
            presence = torch.zeros(len(names), device=device) if self.recorder.group is not None else None
            total = torch.zeros((), device=device)
        return total, stacked, presence

    def gradient_squares(self) -> GradientSquares:
        """This rank's gradients now: the layout of the names (every parameter of
        the model with a reduction group, the same on every rank whatever each one
        froze, else those with a gradient), the names with a gradient, their
        squared norms (device, no sync) and, with a reduction group, which of the
        layout they are (a host tuple).  "Has a gradient", not "requires one": the
        flag may have changed since the scan, the ``.grad`` is what the optimizer
        and ``clip_grad_norm_`` read."""
        refs = self.parameters()
        scoped = self._step_refs  # the stepping optimizer's (None: every parameter)
        grads_by_name = local_gradients(scoped if scoped is not None else refs, self.recorder.owner)
        present = [name for name, grad in grads_by_name if grad is not None]
        grads = [grad for _, grad in grads_by_name if grad is not None]
        reduced = self.recorder.group is not None
        names = [ref.name for ref in refs] if reduced else present  # the same layout on every rank
        if not grads:
            return names, present, None, None
        squares = squared_norms(grads)
        mask = None
        if reduced:
            if scoped is None:
                mask = tuple(grad is not None for _, grad in grads_by_name)
            else:
                held = set(present)
                mask = tuple(name in held for name in names)
        return names, present, squares, mask

    def local_parameters(self) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
        """(name, this rank's part of the value, its gradient) of each parameter that
        requires a gradient or has one now, looked up now and not kept (for the
        non-finite search: the per-step check covers every parameter with a gradient)."""
        out = []
        for ref in self.parameters():
            param = ref.registered()
            if param is None or not (param.requires_grad or param.grad is not None):
                continue  # frozen and without a gradient: no resolve (a DTensor's may communicate)
            local = ref.resolve(True)
            if local is not None:
                out.append((ref.name, local.value, local.grad))
        return out

    def default_device(self) -> torch.device:
        for ref in self.parameters():
            param = ref.registered()
            if param is not None:
                return param.device  # a DTensor's device is its local tensor's
        return torch.device("cpu")
