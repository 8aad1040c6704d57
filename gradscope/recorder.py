"""The recorder: forward hooks plus tensor hooks that feed per-call-site statistics.

Why tensor hooks and not ``register_full_backward_hook``: the latter wraps the
output in a ``BackwardHookFunction`` view and breaks as soon as the next op is
in place (``nn.ReLU(inplace=True)``: pytorch/pytorch#61519).  A forward hook
that calls ``output.register_hook`` survives it (the captum/torch-cam pattern).

Hot-path rules: hooks only enqueue device work (``tensor_stats``); nothing is
read back until ``flush()``, which moves every pending vector to the host in
one transfer per device.  No hook keeps a reference to an activation or a
gradient; the tensor hooks live on the autograd graph and die with it.
"""

from __future__ import annotations

import fnmatch
import math
import weakref
from collections.abc import Collection, Container, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, NamedTuple

import torch
from torch import nn

from gradscope import host_copy
from gradscope.chunked import bounded_raw_stats
from gradscope.distributed import (
    PendingReduction,
    Reducer,
    ReductionGroup,
    data_parallel_size,
    resolve_group,
    row_nonfinite,
    scale_gradient_rows,
)
from gradscope.experts import expert_fans, is_fused_experts
from gradscope.extremes_through import extremes_through, in_place
from gradscope.host_copy import HostBuffers, HostCopy
from gradscope.liveness import UnitTaps, liveness_from_host
from gradscope.outputs import first_float_tensor
from gradscope.own_hooks import InertCopies, OwnHook
from gradscope.placement import (
    ParameterRef,
    ParameterTable,
    clean_name,
    is_wrapper,
    layer_type,
    main_weight_ref,
    owns_parameters,
)
from gradscope.record import LayerRecord, Record
from gradscope.sequence import LaunchedProfiles, SequenceTaps
from gradscope.stats import RawStats, Sample, Stats, finalize, merge_stats, raw_stats, reduce_samples, take_sample

ROOT_NAME = "model"  # the name given to the model itself when it is a leaf
# With a bounded sample, hooks only take each tensor's extremes and a copy of its
# sample; the rest of the statistics is computed at flush (see stats.Sample).
# What waits for the flush is capped, so that gradient accumulation over any
# number of micro-batches (or forwards under no_grad) cannot grow memory: when
# the sample copies pass PENDING_SAMPLE_BUDGET elements (8 MiB of float64) or
# the entries pass PENDING_ENTRIES (each holds a 2048-bin int64 exponent
# histogram once reduced, 16 KiB: 4 MiB in all), every entry is finalised and
# merged exactly (Chan et al., ``stats.merge_stats``) into one statistics row
# per (call site, role), 2 KiB each, kept on the device until the flush.
PENDING_SAMPLE_BUDGET = 1 << 20
PENDING_ENTRIES = 256
REPORTED_ROLES = ("activation", "gradient", "weight", "weight_grad", "input")


@dataclass
class FlushTransfer:
    """A flush launched on the device and not read yet (``Recorder.launch_flush``)."""

    keys: list[tuple[str, str]]  # (site, role) of the merged rows, first-seen order
    profiles: LaunchedProfiles  # sequence time profiles, their copy to the host started at launch
    copies: dict[torch.device, HostCopy] = field(default_factory=dict)  # per device: [extra,] rows
    rows_by_device: dict[torch.device, list[tuple[str, str]]] = field(default_factory=dict)
    extra_device: torch.device | None = None  # whose copy starts with the caller's extra numbers
    n_extra: int = 0
    reduction: PendingReduction | None = None  # with a reduction group, instead of the copies
    # per-unit peaks of ReLU-family sites (gradscope.liveness): (site, axis, positions, units)
    units: list[tuple[str, int, int, int]] = field(default_factory=list)
    # per device: the indices into ``units`` packed after its statistics rows
    units_by_device: dict[torch.device, list[int]] = field(default_factory=dict)
    units_copies: list[tuple[list[int], HostCopy]] = field(default_factory=list)  # under a group: their own copies

    def ready(self) -> bool:
        """Whether every copy has landed (never blocks; a launched reduction counts as
        ready: under a group the read point is chosen by the caller, the same on every rank)."""
        if not all(copy.ready() for _, copy in self.profiles.copies):
            return False
        if self.reduction is not None:
            return self.reduction.copy is None or self.reduction.copy.ready()
        return all(copy.ready() for copy in self.copies.values())


class _Described(NamedTuple):
    """Shape and dtype of an output seen inside a compiled region (the tensor is not kept)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@cache
def _norm_types() -> Container[str]:
    """The diagnosis' normalisation layer types (imported late: the diagnosis is optional)."""
    try:
        from gradscope.diagnose.layers import NORM_TYPES
    except ImportError:
        return frozenset()
    return NORM_TYPES


class _LayerHook(InertCopies):
    """The forward hook of one hooked layer.  An object, not a closure: a deep copy
    or a pickle of the model gets an inert hook (``gradscope.own_hooks``); its body
    is in ``__call__`` itself, one Python call per hooked output as the closure was."""

    __slots__ = ("recorder", "name", "shown")

    def __init__(self, recorder: Recorder, name: str) -> None:
        self.recorder = recorder
        self.name = name
        # The per-step check names a layer as the record does (wrapper components
        # dropped): the same event gets the same name on sampled and unsampled steps.
        self.shown = _display_name(name)

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        recorder, name = self.recorder, self.name
        if recorder._closed:
            return
        if torch.compiler.is_compiling():
            recorder._compiled_forward(name, self.shown, module, args, output)
            return
        if recorder.sentinel is not None and recorder._counts_forward():
            recorder.sentinel.forward(self.shown, module, args, output, recorder._active)
        # Not recording and no recorded forward to recompute: nothing more to do
        # (the common case on watch's unsampled steps, so checked first).
        if not (recorder._active or recorder._forward_recorded):
            return
        task = _graph_task()
        if task != -1:
            recorder._on_recompute(task, name, output)
        elif recorder._active and recorder._counts_forward():
            recorder._on_forward(name, module, args, output)


def _graph_task() -> int:
    """The id of the backward pass running on this thread, or -1 outside backward.

    A forward hook firing inside backward is a recomputation (activation
    checkpointing) whose activation statistics were already counted.
    """
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if graph_task_id is None else int(graph_task_id())


def _in_backward() -> bool:
    return _graph_task() != -1


def _display_name(name: str) -> str:
    """The name a layer is reported under: the model's own (wrapper components
    such as FSDP1's ``_fsdp_wrapped_module`` dropped), ``model`` for the root."""
    return clean_name(name) or ROOT_NAME


def main_weight(module: nn.Module) -> tuple[str, nn.Parameter] | None:
    """The parameter that stands for a layer's weight: ``weight``, else the first
    matrix-shaped one (``weight_ih_l0`` of an LSTM), else the first one."""
    params = dict(module.named_parameters(recurse=False))
    if not params:
        return None
    if "weight" in params and params["weight"] is not None:
        return "weight", params["weight"]
    for pname, p in params.items():
        if p.dim() >= 2:
            return pname, p
    pname = next(iter(params))
    return pname, params[pname]


def fans(weight: torch.Tensor | Sequence[int]) -> tuple[int | None, int | None]:
    """(fan_in, fan_out) of a weight or of its (unsharded) shape, with the
    convention of ``torch.nn.init``, so that the init call gradscope recommends
    computes the same numbers."""
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else tuple(weight)
    if len(shape) < 2:
        return None, None
    receptive = 1
    for size in shape[2:]:
        receptive *= int(size)
    return int(shape[1]) * receptive, int(shape[0]) * receptive


def select_modules(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    types: Sequence[type] | None = None,
    parametrised_only: bool = False,
) -> list[tuple[str, nn.Module]]:
    """The modules to hook, as (qualified name, module).

    Default: leaf modules plus modules that own parameters directly (such as
    ``nn.MultiheadAttention``, whose ``in_proj_weight`` no leaf owns).
    ``include`` / ``exclude`` are fnmatch patterns on qualified names (the
    model itself is called ``model``); ``types`` keeps only those classes;
    ``parametrised_only`` only modules that own parameters directly.
    Wrappers (FSDP1 units, checkpoint wrappers, compiled modules) are never
    chosen: the module they wrap is, under its own name.
    """
    chosen: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if is_wrapper(module):
            continue
        shown = _display_name(name)
        if include:
            if not any(fnmatch.fnmatchcase(shown, pat) for pat in include):
                continue
        else:
            is_leaf = next(module.children(), None) is None
            owns_params = owns_parameters(module)
            if not (is_leaf or owns_params):
                continue
        if exclude and any(fnmatch.fnmatchcase(shown, pat) for pat in exclude):
            continue
        if types and not isinstance(module, tuple(types)):
            continue
        if parametrised_only and not owns_parameters(module):
            continue
        chosen.append((name, module))
    return chosen


class Recorder:
    """Records per-layer statistics of a model's forward and backward passes.

    Use it as a context manager: hooks are attached on entry and every one of
    them is removed on exit, whatever happened inside.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with Recorder(model) as rec:
        ...     rec.start()
        ...     model(torch.randn(16, 4)).sum().backward()
        ...     rec.capture_parameters()
        ...     record = rec.finish()
        >>> [layer.name for layer in record.layers]
        ['0', '1', '2']
        >>> any(m._forward_hooks for m in model.modules())
        False
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        types: Sequence[type] | None = None,
        parametrised_only: bool = False,
        record_inputs: bool = False,
        sample: int | None = None,
        exact_parameter_extremes: bool = True,
        sequence_modules: Mapping[str, int] | None = None,
        record_no_grad: bool = True,
        process_group: Any = None,
        bounded: bool = False,
    ) -> None:
        self.model = model
        # True (the audit): each tensor's statistics are taken in the hook, in slices of
        # chunked.CHUNK elements, instead of a float64 sample copy reduced at flush, so
        # that no temporary grows with the tensor (see gradscope.chunked).
        self.bounded = bounded
        self.record_inputs = record_inputs
        # The inputs of normalisation layers that are not the output recorded just
        # before them (see _unrecorded_norm_input); what record_inputs gives for all.
        self.norm_inputs = False
        # False: forwards run with grad disabled (no_grad, inference_mode: evaluation)
        # are not recorded; see ``_counts_forward`` for how checkpointing is told apart.
        self.record_no_grad = record_no_grad
        self._root_grad: bool | None = None  # grad mode at the start of the running root forward
        self.sample = sample  # histogram sample size per tensor (see stats.tensor_stats); None = exact
        # False: min/max of weights and weight gradients from the sample too (watch,
        # which checks every gradient element through its exact per-step norms).
        self.exact_parameter_extremes = exact_parameter_extremes
        # Ranks whose statistics flush() merges (gradscope.distributed.resolve_group):
        # None = the default group when there is one, "none" = never reduce.
        self.group: ReductionGroup | None = resolve_group(process_group, model)
        self._reducer = Reducer(self.group) if self.group is not None else None
        self._host_buffers = HostBuffers()  # where flushes land on the host (pinned for CUDA), reused
        self._profile_buffers = HostBuffers()  # the same for sequence time profiles (a copy of their own in flight)
        self._data_parallel: int | None = None
        self._table: ParameterTable | None = None
        self._selected = select_modules(model, include, exclude, types, parametrised_only)
        self._selection = (include, exclude, types, parametrised_only)  # for ``reselect``
        self.parametrised_only = parametrised_only  # tier "light": parameter-free layers are not hooked
        # RNN/LSTM/GRU and marked modules: gradient RMS per time step (gradscope.sequence)
        self._sequences = SequenceTaps(
            model, self._selected, sequence_modules, lambda: self._closed, lambda text: self.record.note(text)
        )
        self._selected += self._sequences.extra
        self._units = UnitTaps()  # per-unit peaks of ReLU-family outputs (gradscope.liveness)
        self._handles: list[Any] = []
        self._module_handles: dict[tuple[str, int], list[Any]] = {}  # (name, id(module)) -> its hooks
        self._active = False
        self._closed = False
        self._calls: dict[str, int] = {}
        # Activation checkpointing: sites whose output got a gradient hook in
        # this forward, and call counters of the recomputation in backward.
        self._grad_hooked: set[str] = set()
        self._backward_since_forward = False  # a gradient hook fired since the last recorded forward
        self._recompute_calls: dict[str, int] = {}
        self._recompute_task = -1
        self._forward_recorded = False
        self._sites: dict[str, LayerRecord] = {}
        # site name -> where its weight is found; looked up at capture time, never
        # kept (FSDP frees or swaps parameter storage between forward and backward).
        self._weights: dict[str, ParameterRef] = {}
        self._selected_weights: list[tuple[str, ParameterRef]] | None = None
        self._flush_local: dict[Any, torch.Tensor] = {}  # under a group: the last flush's own rows
        self._pending: list[tuple[str, str, RawStats | Sample]] = []
        self._input_pending: list[RawStats | Sample] = []
        self._pending_elements = 0  # elements of sample copies not reduced yet
        # The activation recorded last in this forward (not kept alive), its version
        # and its exact extremes: a piecewise-linear layer fed by it takes its own
        # extremes from them.
        self._last_taken: tuple[weakref.ref, int, torch.Tensor, torch.Tensor] | None = None
        self._merged: dict[tuple[str, str], torch.Tensor] = {}  # pending entries merged early (device rows)
        self._grad_hooks: dict[str, Any] = {}
        # Entries the compiled hooks queued (see _compiled_forward); drained eagerly.
        self._compiled: list[tuple[str, nn.Module | None, str, _Described | None, Sample | None]] = []
        self._compiled_noted = False
        # watch's per-step non-finite check (gradscope.watching.nonfinite.ForwardSentinel):
        # told of every forward and hooked call, recorded or not.
        self.sentinel: Any = None
        self.record = Record()

    # -- lifecycle --------------------------------------------------------------
    def attach(self) -> Recorder:
        """Register the hooks.  On any failure, whatever was registered is removed."""
        if self._handles:
            return self
        self._closed = False
        try:
            # OwnHook: a deep copy or a pickle of the model (an EMA copy, torch.save)
            # gets an inert hook, not one feeding this recorder (gradscope.own_hooks).
            root = self.model.register_forward_pre_hook(OwnHook(self._on_root_forward), with_kwargs=True)
            self._handles.append(root)
            # always_call: the grad mode of a forward that raised must not outlive it.
            self._handles.append(self.model.register_forward_hook(OwnHook(self._on_root_forward_end), always_call=True))
            for name, module in self._selected:
                self._hook_module(name, module)
        except BaseException:
            self.close()
            raise
        return self

    def _hook_module(self, name: str, module: nn.Module) -> None:
        handles = [module.register_forward_hook(self._forward_hook(name))]
        if name in self._sequences.names:
            handles.append(module.register_forward_pre_hook(OwnHook(self._sequences.pre_hook(name, self._taps))))
        self._handles += handles
        self._module_handles.setdefault((name, id(module)), []).extend(handles)

    def reselect(self) -> tuple[list[str], list[str]]:
        """Hook the modules the selection finds in the model now that it did not
        before, and unhook those it no longer finds: a module added mid-run (a new
        head by ``add_module``, progressive growing) gets the same hooks as the
        original ones, a replaced or removed one stops being recorded.  A walk over
        the modules: call it only when the structure changed (``StructureChanges``).
        Returns the (added, removed) names."""
        if not self._handles:
            return [], []
        now = select_modules(self.model, *self._selection)
        keys = {(name, id(module)) for name, module in now}
        before = {(name, id(module)) for name, module in self._selected}
        sequences = {name for name, _ in self._sequences.extra}  # marked by the user: kept as they are
        removed = [(n, m) for n, m in self._selected if (n, id(m)) not in keys and n not in sequences]
        added = [(n, m) for n, m in now if (n, id(m)) not in before]
        for name, module in removed:
            for handle in self._module_handles.pop((name, id(module)), []):
                handle.remove()
        for name, module in added:
            self._hook_module(name, module)
        if added or removed:
            gone = {(n, id(m)) for n, m in removed}
            self._selected = [(n, m) for n, m in self._selected if (n, id(m)) not in gone] + added
            self._selected_weights = None  # the update ratios' weights are looked up again
        return [n for n, _ in added], [n for n, _ in removed]

    def close(self) -> None:
        """Remove every hook.  Safe to call twice."""
        self._active = False
        self._closed = True
        handles, self._handles = self._handles, []
        self._module_handles = {}
        for handle in handles:
            handle.remove()

    def __enter__(self) -> Recorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def start(self) -> None:
        """Record from the next forward on."""
        self._active = True
        self._calls.clear()
        self._last_taken = None

    def stop(self) -> None:
        """Stop recording forwards (gradients of forwards already recorded still arrive)."""
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    # -- hooks ------------------------------------------------------------------
    def _on_root_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling():
            self._compiled_root_forward(args, kwargs)
            return
        if _in_backward():
            return
        self._root_grad = torch.is_grad_enabled()
        if self.sentinel is not None and self._counts_forward():
            # The non-finite check skips the forwards the recorder skips (record_no_grad).
            self.sentinel.begin_forward()
        if not self._active:
            self._forward_recorded = False  # whether a recomputation in backward may hook
            return
        if not self._counts_forward():
            return  # an uncounted (evaluation) forward leaves the recorded forward's state alone
        self._forward_recorded = True
        self._calls.clear()  # a new forward: call sites count from 1 again
        self._last_taken = None
        self._grad_hooked.clear()
        self._backward_since_forward = False
        self._units.new_forward()
        found = first_float_tensor((args, kwargs))
        if found is not None:
            self._bound_pending()
            self._input_pending.append(self._take(found[0]))

    def _taps(self) -> bool:
        """Whether a forward starting now is recorded (not a recomputation in backward)."""
        return self._active and not self._closed and not _in_backward() and self._counts_forward()

    def _on_root_forward_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling() or not _in_backward():
            self._root_grad = None

    def _counts_forward(self) -> bool:
        """Whether the forward running now is recorded (``record_no_grad``).

        Inside a call of the root model, its grad mode at entry decides: a
        reentrant activation checkpoint runs its segment under no_grad within a
        training forward, and that segment is counted.  Submodules called
        without the root (Lightning's ``training_step``) go by the grad mode of
        their own call.
        """
        if self.record_no_grad:
            return True
        return self._root_grad if self._root_grad is not None else torch.is_grad_enabled()

    def _forward_hook(self, name: str) -> _LayerHook:
        return _LayerHook(self, name)

    # -- inside torch.compile -----------------------------------------------------
    # Dynamo traces these hooks into the model's graph.  It cannot follow the
    # recorder's Python bookkeeping without a graph break (the backward-pass id,
    # site records built on first sight, pending-budget merges) and a tensor hook
    # on an intermediate tensor whose body has side effects breaks the graph as
    # well.  So a compiled region only does tensor work, each hooked output's
    # extremes and sample (``take_sample``, the same ops as eager, hence the same
    # numbers) and the per-step non-finite flag, and appends them to a queue
    # (a list append Dynamo replays after the graph); ``_drain_compiled`` does
    # the bookkeeping eagerly at the next flush or parameter capture.  What this
    # gives up, said in the record: ∂ℓ/∂h of layers run inside a compiled region
    # (weights, weight gradients, the exact gradient norms and activations are
    # recorded as in eager), and recomputation detection (activation
    # checkpointing inside a compiled region is traced by Dynamo, not re-run).

    def _compiled_root_forward(self, args: tuple, kwargs: dict) -> None:
        self._root_grad = torch.is_grad_enabled()
        counted = self._counts_forward()
        if self.sentinel is not None and counted:
            self.sentinel.begin_forward()
        if not (self._active and counted):
            return
        found = first_float_tensor((args, kwargs))
        self._compiled.append(("", None, "", None, None if found is None else take_sample(found[0], self.sample)))

    def _compiled_forward(self, name: str, shown: str, module: nn.Module, args: tuple, output: Any) -> None:
        counted = self._counts_forward()
        if self.sentinel is not None and counted:
            self.sentinel.forward(shown, module, args, output, self._active)
        if not (self._active and counted):
            return
        found = first_float_tensor(output)
        if found is None:
            self._compiled.append((name, module, "", None, None))
            return
        tensor, path = found
        described = _Described(tuple(tensor.shape), tensor.dtype)
        self._compiled.append((name, module, path, described, take_sample(tensor, self.sample)))

    def _drain_compiled(self) -> None:
        """The eager half of the compiled hooks: call sites, site records, pending entries."""
        if not self._compiled:
            return
        queue, self._compiled = self._compiled, []
        for name, module, path, described, taken in queue:
            if module is None:  # a root forward began
                self._forward_recorded = True
                self._calls.clear()
                if taken is not None:
                    self._input_pending.append(taken)
                continue
            call = self._calls.get(name, 0) + 1
            self._calls[name] = call
            shown = _display_name(name)
            key = shown if call == 1 else f"{shown}#{call}"
            found = None if described is None else (described, path)
            if key not in self._sites:
                self._new_site(key, shown, module, call, found)
            if taken is not None:
                self._pending.append((key, "activation", taken))
                self._pending_elements += taken.values.numel()
        if not self._compiled_noted:
            self._compiled_noted = True
            self.record.note(
                "layers ran inside torch.compile: their activations, weights and weight gradients are recorded, "
                "∂ℓ/∂h is not (a tensor hook there would break the compiled graph)"
            )
        if self._pending_elements > PENDING_SAMPLE_BUDGET or len(self._pending) >= PENDING_ENTRIES:
            self._merge_pending()

    def _on_forward(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        self._forward_recorded = True
        if self._backward_since_forward and self._root_grad is None:
            # Submodules called without the root model (no root hook to mark the new
            # forward): a backward in between ends the pass, else every micro-batch
            # would add call sites ``name#2``, ``name#3``… without bound.  (Inside a
            # root forward, an ``autograd.grad`` call does not end it.)
            self._backward_since_forward = False
            self._calls.clear()
            self._last_taken = None
            self._grad_hooked.clear()
        call = self._calls.get(name, 0) + 1
        self._calls[name] = call
        shown = _display_name(name)
        key = shown if call == 1 else f"{shown}#{call}"
        found = first_float_tensor(output)
        site = self._sites.get(key)
        if site is None:
            site = self._new_site(key, shown, module, call, found)
        if found is None:
            self.record.note(f"{key} ({type(module).__name__}): no floating-point output to record")
            return
        tensor, _ = found
        self._bound_pending()
        norm_input = self._unrecorded_norm_input(site, args)
        taken = self._take(tensor, self._extremes_from_input(module, args, tensor))
        self._pending.append((key, "activation", taken))
        if isinstance(taken, Sample) and taken.extreme_count == taken.numel and not tensor.is_inference():
            self._last_taken = (weakref.ref(tensor), tensor._version, taken.lo, taken.hi)
        if self.record_inputs and key in self._weights:
            arg = first_float_tensor(args)
            if arg is not None:
                self._pending.append((key, "input", self._take(arg[0])))
        elif norm_input is not None:
            self._pending.append((key, "input", self._take(norm_input)))
        self._units.on_forward(key, site.type, tensor)
        if tensor.requires_grad and torch.is_grad_enabled():
            tensor.register_hook(self._gradient_hook(key))
            self._grad_hooked.add(key)
        if name in self._sequences.names:
            self._sequences.on_forward(key, name, module, args, tensor)

    def _unrecorded_norm_input(self, site: LayerRecord, args: tuple) -> torch.Tensor | None:
        """A normalisation layer's input when it is not the output recorded just
        before (a residual sum: BERT's post-LN ``LayerNorm(x + f(x))``, a pre-LN
        block's stream), with ``norm_inputs``: the diagnosis scales gradients by
        the std a normalisation divides by (``diagnose.depth._norm_scale``), which
        the layer's own output std stands for only when the norm reads it directly.
        One sample more per such norm on a sampled step; none for a conv -> BN."""
        if not self.norm_inputs or site.type not in _norm_types():
            return None
        arg = first_float_tensor(args)
        return None if arg is None or self._recorded_just_before(arg[0]) else arg[0]

    def _recorded_just_before(self, tensor: Any) -> bool:
        """Whether ``tensor`` is the activation this forward recorded last (weak reference)."""
        last = self._last_taken
        return last is not None and last[0]() is tensor

    def _extremes_from_input(
        self, module: nn.Module, args: tuple, output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Exact output extremes of a piecewise-linear layer (``extremes_through``)
        whose input is the output recorded just before, untouched since (its
        version counter: one bump when the layer itself runs in place), so the
        output need not be read whole again."""
        last = self._last_taken
        if last is None or not args or self.sample is None or self.bounded:
            return None
        through = extremes_through(module)
        arg: torch.Tensor = args[0]
        if through is None or not self._recorded_just_before(arg) or arg.is_inference():
            return None
        bumps = 1 if in_place(module) and output is arg else 0
        if arg._version != last[1] + bumps:
            return None  # changed in place by code between the two layers
        return through(last[2], last[3])

    def _gradient_hook(self, key: str) -> Any:
        """The tensor hook of one call site (built once, reused every step)."""
        hook = self._grad_hooks.get(key)
        if hook is None:
            hook = self._grad_hooks[key] = self._make_gradient_hook(key)
        return hook

    def _on_recompute(self, task: int, name: str, output: Any) -> None:
        """A forward re-run inside backward by activation checkpointing.

        Its activations were counted in the real forward.  With the reentrant
        checkpoint the real forward ran under no_grad and the gradient flows
        through this recomputed graph instead, so the gradient hook the real
        forward could not register is registered here (once per site).
        """
        if task != self._recompute_task:
            self._recompute_task = task
            self._recompute_calls.clear()
        call = self._recompute_calls.get(name, 0) + 1
        self._recompute_calls[name] = call
        shown = _display_name(name)
        key = shown if call == 1 else f"{shown}#{call}"
        if not self._forward_recorded or key not in self._sites or key in self._grad_hooked:
            return
        found = first_float_tensor(output)
        if found is not None and found[0].requires_grad and torch.is_grad_enabled():
            found[0].register_hook(self._gradient_hook(key))
            self._grad_hooked.add(key)

    def _make_gradient_hook(self, key: str) -> Any:
        def hook(grad: torch.Tensor) -> None:
            if self._closed:
                return
            self._backward_since_forward = True
            self._bound_pending()
            self._pending.append((key, "gradient", self._take(grad)))

        return hook

    def _new_site(
        self,
        key: str,
        shown: str,
        module: nn.Module,
        call: int,
        found: tuple[torch.Tensor | _Described, str] | None,
    ) -> LayerRecord:
        refs = self.parameter_table().of_module(module)
        site = LayerRecord(
            name=key,
            module=shown,
            type=layer_type(module),
            index=len(self.record.layers),
            call=call,
            parameters=sum(math.prod(ref.shape) for ref in refs),
        )
        if found is not None:
            site.output_path = found[1]
            site.output_shape = list(found[0].shape)
            site.output_dtype = str(found[0].dtype).removeprefix("torch.")
        if call > 1:
            site.shares_weights_with = shown
        else:
            weight = main_weight_ref(refs)
            if weight is not None:
                site.weight_name = weight.attr
                site.weight_shape = list(weight.shape)
                # A fused experts module's (E, out, in) weight: one expert's fans, not torch's 3-D ones.
                fused = is_fused_experts(module) and len(weight.shape) == 3
                site.fan_in, site.fan_out = (
                    expert_fans(module, weight.attr, weight.shape) if fused else fans(weight.shape)
                )
                self._weights[key] = weight
        self._sites[key] = site
        self.record.layers.append(site)
        return site

    # -- parameters and flushing ------------------------------------------------
    def parameter_table(self) -> ParameterTable:
        """The model's parameters by module, built on first use (after any sharding)."""
        if self._table is None:
            self._table = ParameterTable(self.model)
        return self._table

    def weight_ref(self, key: str) -> ParameterRef | None:
        """Where the weight of a recorded site is found."""
        return self._weights.get(key)

    def held_nonfinite(self, layer: str, role: str) -> bool | None:
        """Under a reduction group: whether this rank's own statistics of ``layer``'s
        ``role`` at the last flush held a NaN/inf (None: unknown, no group or no row)."""
        row = self._flush_local.get((layer, role))
        return None if row is None else row_nonfinite(row)

    def selected_weight_refs(self) -> list[tuple[str, ParameterRef]]:
        """(layer name, main weight) of every selected module that has one, in model
        order, whether or not it ran: the same list on every rank (a vector laid out
        by it can be summed element by element across ranks, where the layers a rank
        saw run differ with data-dependent branches or ``find_unused_parameters``)."""
        if self._selected_weights is None:
            table = self.parameter_table()
            chosen = []
            for name, module in self._selected:
                weight = main_weight_ref(table.of_module(module))
                if weight is not None:
                    chosen.append((_display_name(name), weight))
            self._selected_weights = list(dict(chosen).items())  # a module selected twice counts once
        return self._selected_weights

    @property
    def owner(self) -> bool:
        """Whether this rank counts replicated parameters (rank 0 of the group)."""
        return self.group is None or self.group.rank == 0

    def capture_parameters(self, weights: bool = True, grads: bool = True, only: Collection[str] | None = None) -> None:
        """Enqueue statistics of each recorded layer's weight and its ``.grad``.

        Call after backward (and, in training, before ``optimizer.step()``),
        when ``.grad`` holds the gradient the optimizer is about to use.
        ``only``: the sites to capture (default: every recorded one).
        """
        self._drain_compiled()  # sites first seen in a compiled region
        self._pending.extend(self._parameter_raws(weights, grads, only))

    def parameter_stats(self) -> dict[str, dict[str, Stats]]:
        """Weight and weight-gradient statistics of each recorded layer, now, on the
        host, outside the pending queue: for a caller that needs them off-schedule.
        With a reduction group this is collective (every rank must call it)."""
        self._drain_compiled()
        entries = self._parameter_raws(weights=True, grads=True)
        keys = [(key, role) for key, role, _ in entries]
        rows = _finalize_and_merge(keys, [raw for _, _, raw in entries])
        host: dict[tuple[str, str], torch.Tensor] = (
            self._reducer.reduce(rows)[0] if self._reducer is not None else _to_host(rows)
        )
        out: dict[str, dict[str, Stats]] = {}
        for (key, role), row in host.items():
            out.setdefault(key, {})[role] = Stats(row)
        return out

    def _parameter_raws(
        self, weights: bool, grads: bool, only: Collection[str] | None = None
    ) -> list[tuple[str, str, RawStats]]:
        """(site, role, statistics) of each recorded weight and its gradient; not in
        a hook, so computed whole at once (warm caches, nothing to defer)."""
        exact = self.exact_parameter_extremes
        owner = self.owner
        stats_of = bounded_raw_stats if self.bounded else raw_stats
        out: list[tuple[str, str, RawStats]] = []
        with torch.no_grad():
            for key, ref in self._weights.items():
                if only is not None and key not in only:
                    continue
                local = ref.resolve(owner)
                if local is None or not local.owned:
                    continue  # a replica another rank counts
                if weights:
                    out.append((key, "weight", stats_of(local.value, self.sample, exact)))
                if grads and local.grad is not None:
                    out.append((key, "weight_grad", stats_of(local.grad, self.sample, exact)))
        return out

    def _take(
        self, tensor: torch.Tensor, extremes: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> RawStats | Sample:
        """A hook's share of a tensor's statistics (see PENDING_SAMPLE_BUDGET);
        ``extremes``: its exact min and max when known without reading it."""
        if self.bounded:
            return bounded_raw_stats(tensor, self.sample)
        if self.sample is None:
            return raw_stats(tensor)
        taken = take_sample(tensor, self.sample, extremes=extremes)
        self._pending_elements += taken.values.numel()
        if self._pending_elements > PENDING_SAMPLE_BUDGET:
            self._merge_pending()  # merges the queue without ``taken``, which the caller appends next,
            self._pending_elements = taken.values.numel()  # so it is the one copy left pending
        return taken

    def _merge_pending(self) -> None:
        """Finalise every entry still waiting and merge it into ``self._merged``
        (frees the sample copies and the raw histograms).  Device ops only."""
        self._drain_compiled()
        # In place: a hook may be inside ``self._pending.append(... self._take(...))``,
        # whose bound ``append`` already holds the list.
        keys = [(key, role) for key, role, _ in self._pending] + [("", "model_input")] * len(self._input_pending)
        values = [v for _, _, v in self._pending] + list(self._input_pending)
        self._pending.clear()
        self._input_pending.clear()
        self._pending_elements = 0
        # every sample of the flush reduced together (stats.reduce_samples), in order
        reduced = iter(reduce_samples([v for v in values if isinstance(v, Sample)]))
        raws = [next(reduced) if isinstance(v, Sample) else v for v in values]
        for key, row in _finalize_and_merge(keys, raws).items():
            before = self._merged.get(key)
            self._merged[key] = row if before is None else merge_stats(before, row)

    def _bound_pending(self) -> None:
        """Merge early once PENDING_ENTRIES wait (called where entries are added)."""
        if len(self._pending) + len(self._input_pending) >= PENDING_ENTRIES:
            self._merge_pending()

    def flush(self, extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """Move pending statistics to the host (one transfer per device) and merge them.

        With a reduction group this is a collective: every rank must flush at
        the same steps.  Every statistic is merged over the group
        (gradscope.distributed): activations, ``∂ℓ/∂h`` and inputs over the
        data-parallel ranks' rows, ``∂ℓ/∂h`` brought to single-process scale,
        weights and weight gradients from each rank's shard, replicas once.
        ``extra``: a 1-D tensor of numbers to sum over the group in the same
        reduction (the caller's losses and squared norms); returned summed, on
        the host, float64 (as given when nothing is reduced).

        The same as ``complete_flush(launch_flush(extra))``: a caller that can
        wait (``gradscope.watch`` on CUDA) launches now and completes later.
        """
        return self.complete_flush(self.launch_flush(extra))

    def launch_flush(self, extra: torch.Tensor | None = None) -> FlushTransfer:
        """The device side of ``flush``: pending statistics finalised and merged,
        packed with ``extra`` into one vector per device whose copy to the host
        starts now (``gradscope.host_copy``), or, with a reduction group, the
        reduction issued.  Nothing is read on the host; hooks may record the next
        step's statistics at once.  Complete it (``complete_flush``) before the
        next launch: the host buffers are reused."""
        self._merge_pending()
        merged, self._merged = self._merged, {}
        transfer = FlushTransfer(keys=list(merged), profiles=self._sequences.launch(self._profile_buffers))
        units = self._units.take()
        transfer.units = [(key, axis, positions, peak.numel()) for key, axis, positions, peak in units]
        if self._reducer is not None and self.group is not None:
            transfer.reduction = self._reducer.launch(merged, extra, self._host_buffers)
            # per rank (gradscope.liveness): a copy of their own, like the time profiles
            transfer.units_copies = host_copy.copy_by_device([_wide(u[3]) for u in units], self._profile_buffers)
            return transfer
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        if extra is not None:
            transfer.n_extra = extra.numel()
            transfer.extra_device = extra.device
            by_device[extra.device] = [_wide(extra.reshape(-1))]
        for key in transfer.keys:
            row = merged[key]
            by_device.setdefault(row.device, [])
            transfer.rows_by_device.setdefault(row.device, []).append(key)
        for device, keys in transfer.rows_by_device.items():
            by_device[device].append(_wide(torch.stack([merged[k] for k in keys])).reshape(-1))
        for i, (_, _, _, peak) in enumerate(units):  # after the rows, in the same transfer
            by_device.setdefault(peak.device, []).append(_wide(peak))
            transfer.units_by_device.setdefault(peak.device, []).append(i)
        for device, parts in by_device.items():
            vector = parts[0] if len(parts) == 1 else torch.cat(parts)
            transfer.copies[device] = host_copy.copy_to_host(vector, self._host_buffers)
        return transfer

    def complete_flush(self, transfer: FlushTransfer) -> torch.Tensor | None:
        """The host side of ``flush``: read a launched transfer (waiting for its copy
        only if it has not landed) and merge it into the record.  With a reduction
        group every rank must complete the same launches in the same order."""
        for key, role, profile in self._sequences.flush(transfer.profiles):  # per rank: not merged across ranks
            if key in self._sites:
                self._sites[key].add_time(role, profile)
        host_extra = None
        host: dict[tuple[str, str], torch.Tensor] = {}
        peaks: list[torch.Tensor] = [torch.empty(0)] * len(transfer.units)
        for indices, copy in transfer.units_copies:
            self._split_peaks(transfer, indices, copy.wait(), peaks)
        if transfer.reduction is not None and self._reducer is not None and self.group is not None:
            host, host_extra = self._reducer.finish(transfer.reduction)
            # This rank's own rows, before the reduction (a few numbers per layer, on the
            # device): which rank's rows held a NaN/inf, asked on the error path only.
            self._flush_local = transfer.reduction.local
            if self._data_parallel is None:
                self._data_parallel = data_parallel_size(self.model, self.group)
            scale_gradient_rows(host, float(self._data_parallel))
            self.record.reduction = self.reduction()
        else:
            for device, copy in transfer.copies.items():
                values = copy.wait()
                offset = 0
                if device == transfer.extra_device:
                    host_extra, offset = values[: transfer.n_extra], transfer.n_extra
                keys = transfer.rows_by_device.get(device, [])
                unit_indices = transfer.units_by_device.get(device, [])
                tail = sum(transfer.units[i][3] for i in unit_indices)
                if unit_indices:
                    self._split_peaks(transfer, unit_indices, values[values.numel() - tail :], peaks)
                if keys:
                    rows = values[offset : values.numel() - tail].reshape(len(keys), -1).unbind(0)  # one op each
                    host.update(zip(keys, rows, strict=True))
            host = {k: host[k] for k in transfer.keys}  # first-seen order
            if self.reduction():
                self.record.reduction = self.reduction()
        for (key, role), row in host.items():
            if role == "model_input":
                stats = Stats(row)
                self.record.input = stats if self.record.input is None else self.record.input.merge(stats)
            elif key in self._sites:
                self._sites[key].add(role, Stats(row))
            else:
                self.record.note(f"{key}: recorded on another rank only; not in this rank's report")
        per_rank = "per rank" if self.reduction() else None
        for (key, axis, positions, _), peak in zip(transfer.units, peaks, strict=True):
            if key in self._sites and peak.numel():
                self._sites[key].add_units(liveness_from_host(axis, positions, peak, per_rank))
        if host:
            self.record.steps += 1
        return host_extra

    @staticmethod
    def _split_peaks(
        transfer: FlushTransfer, indices: list[int], values: torch.Tensor, out: list[torch.Tensor]
    ) -> None:
        """Cut a packed host vector of per-unit peaks back into one vector per site."""
        offset = 0
        for i in indices:
            n = transfer.units[i][3]
            out[i] = values[offset : offset + n]
            offset += n

    def reduction(self) -> dict[str, str]:
        """Per statistic role, "global" (merged over the group) or "per rank"; empty
        outside torch.distributed (one process: every number is global)."""
        from gradscope.distributed import is_distributed

        if self.group is None:
            return dict.fromkeys(REPORTED_ROLES, "per rank") if is_distributed() else {}
        return dict.fromkeys(REPORTED_ROLES, "global")

    def reduction_summary(self) -> dict[str, Any] | str:
        """What ``report.run["reduction"]`` says: how each kind of number was reduced."""
        from gradscope.distributed import is_distributed

        if self.group is None:
            if is_distributed():
                return "per rank: this rank's statistics only, nothing reduced across ranks (process_group)"
            return "single process"
        dp = self._data_parallel if self._data_parallel is not None else data_parallel_size(self.model, self.group)
        return {
            "ranks": self.group.size,
            "data_parallel": dp,
            "activation": "global: merged over the data-parallel ranks' rows",
            "gradient": f"global, at single-process scale (each rank's ∂ℓ/∂h divided by the data-parallel degree {dp})",
            "weight": "global: each rank's shard merged, replicated parameters counted once",
            "weight_grad": "global: each rank's shard merged, replicated parameters counted once",
            "input": "global: merged over the data-parallel ranks' rows",
        }

    def finish(self) -> Record:
        """Flush and return the record, with the hooked modules that never ran."""
        self.flush()
        ran = {layer.module for layer in self.record.layers}
        self.record.not_executed = [_display_name(name) for name, _ in self._selected if _display_name(name) not in ran]
        return self.record

    def pending_count(self) -> int:
        """Statistics waiting for the flush: entries, and rows merged early."""
        return len(self._pending) + len(self._input_pending) + len(self._merged) + len(self._compiled)

    def discard_pending(self) -> None:
        """Drop the statistics waiting for the flush (forwards that no step followed)."""
        self._pending, self._input_pending, self._merged, self._compiled = [], [], {}, []
        self._pending_elements = 0
        self._units.discard()


def _finalize_and_merge(keys: list[tuple[str, str]], raws: Sequence[RawStats]) -> dict[tuple[str, str], torch.Tensor]:
    """Finalise raw statistics on their own devices and merge repeats of a key
    (several micro-batches, several batches of an audit) into one row."""
    if not raws:
        return {}
    by_device: dict[torch.device, list[int]] = {}
    for i, raw in enumerate(raws):
        by_device.setdefault(raw.lo.device, []).append(i)
    merged: dict[tuple[str, str], torch.Tensor] = {}
    for indices in by_device.values():
        merged.update(_merge_repeats([keys[i] for i in indices], finalize([raws[i] for i in indices])))
    return {key: merged[key] for key in dict.fromkeys(keys)}  # first-seen order


def _merge_repeats(keys: list[tuple[str, str]], rows: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
    """One row per key: repeats merged pairwise (``merge_stats``, exact), all keys
    at once per round, so k repeats cost log2(k) stacked merges, not k - 1."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    while any(len(g) > 1 for g in groups.values()):
        left: list[int] = []
        right: list[int] = []
        for g in groups.values():
            left += g[0 : len(g) - 1 : 2]
            right += g[1 : len(g) : 2]
        pairs = merge_stats(rows[left], rows[right])
        rows = torch.cat([rows, pairs])
        first_pair = len(rows) - len(pairs)
        pair = iter(range(first_pair, len(rows)))
        # each group: its merged pairs, then its odd row out (if any)
        groups = {key: [next(pair) for _ in range(len(g) // 2)] + g[len(g) - len(g) % 2 :] for key, g in groups.items()}
    split = rows.unbind(0)  # one op for every row, where indexing row by row was one op each
    return {key: split[g[0]] for key, g in groups.items()}


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in the dtype a flush vector travels in: float64 where the device has it."""
    return tensor.to(torch.float64 if tensor.device.type in ("cpu", "cuda") else torch.float32)


def _to_host(rows: dict[tuple[str, str], torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """Copy rows to the host as float64: one stacked transfer per device."""
    by_device: dict[torch.device, list[tuple[str, str]]] = {}
    for key, row in rows.items():
        by_device.setdefault(row.device, []).append(key)
    host: dict[tuple[str, str], torch.Tensor] = {}
    for device_keys in by_device.values():
        stacked = torch.stack([rows[k] for k in device_keys]).to("cpu", torch.float64)
        host.update(zip(device_keys, stacked.unbind(0), strict=True))  # iterating a tensor: one op per row
    return {k: host[k] for k in rows}
