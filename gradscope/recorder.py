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
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from gradscope.distributed import REDUCED_ROLES, is_distributed, merge_across_ranks, world_size
from gradscope.outputs import first_float_tensor
from gradscope.record import LayerRecord, Record
from gradscope.sequence import SequenceTaps
from gradscope.stats import SIZE, RawStats, Sample, Stats, finalize, merge_stats, raw_stats, reduce_sample, take_sample

ROOT_NAME = "model"  # the name given to the model itself when it is a leaf
# With a bounded sample, hooks only take each tensor's extremes and a copy of its
# sample; the rest of the statistics is computed at flush (see stats.Sample).
# Copies waiting for the flush are capped at this many elements (8 MiB of
# float64): beyond it they are reduced at once, so that gradient accumulation
# over many micro-batches cannot grow memory.
PENDING_SAMPLE_BUDGET = 1 << 20


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
    return name if name else ROOT_NAME


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


def fans(weight: torch.Tensor) -> tuple[int | None, int | None]:
    """(fan_in, fan_out) with the convention of ``torch.nn.init``, so that the
    init call gradscope recommends computes the same numbers."""
    if weight.dim() < 2:
        return None, None
    receptive = 1
    for size in weight.shape[2:]:
        receptive *= int(size)
    return int(weight.shape[1]) * receptive, int(weight.shape[0]) * receptive


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
    """
    chosen: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        shown = _display_name(name)
        if include:
            if not any(fnmatch.fnmatchcase(shown, pat) for pat in include):
                continue
        else:
            is_leaf = next(module.children(), None) is None
            owns_params = next(module.parameters(recurse=False), None) is not None
            if not (is_leaf or owns_params):
                continue
        if exclude and any(fnmatch.fnmatchcase(shown, pat) for pat in exclude):
            continue
        if types and not isinstance(module, tuple(types)):
            continue
        if parametrised_only and next(module.parameters(recurse=False), None) is None:
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
        reduce_ranks: bool = True,
        sequence_modules: Mapping[str, int] | None = None,
    ) -> None:
        self.model = model
        self.record_inputs = record_inputs
        self.sample = sample  # histogram sample size per tensor (see stats.tensor_stats); None = exact
        # False: min/max of weights and weight gradients from the sample too (watch,
        # which checks every gradient element through its exact per-step norms).
        self.exact_parameter_extremes = exact_parameter_extremes
        self.reduce_ranks = reduce_ranks  # merge statistics across torch.distributed ranks at flush
        self._selected = select_modules(model, include, exclude, types, parametrised_only)
        # RNN/LSTM/GRU and marked modules: gradient RMS per time step (gradscope.sequence)
        self._sequences = SequenceTaps(
            model, self._selected, sequence_modules, lambda: self._closed, lambda text: self.record.note(text)
        )
        self._selected += self._sequences.extra
        self._handles: list[Any] = []
        self._active = False
        self._closed = False
        self._calls: dict[str, int] = {}
        # Activation checkpointing: sites whose output got a gradient hook in
        # this forward, and call counters of the recomputation in backward.
        self._grad_hooked: set[str] = set()
        self._recompute_calls: dict[str, int] = {}
        self._recompute_task = -1
        self._forward_recorded = False
        self._sites: dict[str, LayerRecord] = {}
        self._weights: dict[str, nn.Parameter] = {}  # site name -> weight parameter
        self._pending: list[tuple[str, str, RawStats | Sample]] = []
        self._input_pending: list[RawStats | Sample] = []
        self._pending_elements = 0  # elements of sample copies not reduced yet
        self._grad_hooks: dict[str, Any] = {}
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
            root = self.model.register_forward_pre_hook(self._on_root_forward, with_kwargs=True)
            self._handles.append(root)
            for name, module in self._selected:
                self._handles.append(module.register_forward_hook(self._forward_hook(name)))
                if name in self._sequences.names:
                    self._handles.append(module.register_forward_pre_hook(self._sequences.pre_hook(name, self._taps)))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Remove every hook.  Safe to call twice."""
        self._active = False
        self._closed = True
        handles, self._handles = self._handles, []
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

    def stop(self) -> None:
        """Stop recording forwards (gradients of forwards already recorded still arrive)."""
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    # -- hooks ------------------------------------------------------------------
    def _on_root_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if _in_backward():
            return
        if self.sentinel is not None:
            self.sentinel.begin_forward()
        self._forward_recorded = self._active  # whether a recomputation in backward may hook
        if not self._active:
            return
        self._calls.clear()  # a new forward: call sites count from 1 again
        self._grad_hooked.clear()
        found = first_float_tensor((args, kwargs))
        if found is not None:
            self._input_pending.append(self._take(found[0]))

    def _taps(self) -> bool:
        """Whether a forward starting now is recorded (not a recomputation in backward)."""
        return self._active and not self._closed and not _in_backward()

    def _forward_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._closed:
                return
            if self.sentinel is not None:
                self.sentinel.forward(name, args, output, self._active)
            # Not recording and no recorded forward to recompute: nothing more to do
            # (the common case on watch's unsampled steps, so checked first).
            if not (self._active or self._forward_recorded):
                return
            task = _graph_task()
            if task != -1:
                self._on_recompute(task, name, output)
            elif self._active:
                self._on_forward(name, module, args, output)

        return hook

    def _on_forward(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        self._forward_recorded = True
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
        self._pending.append((key, "activation", self._take(tensor)))
        if self.record_inputs and key in self._weights:
            arg = first_float_tensor(args)
            if arg is not None:
                self._pending.append((key, "input", self._take(arg[0])))
        if tensor.requires_grad and torch.is_grad_enabled():
            tensor.register_hook(self._gradient_hook(key))
            self._grad_hooked.add(key)
        if name in self._sequences.names:
            self._sequences.on_forward(key, name, module, args, tensor)

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
            self._pending.append((key, "gradient", self._take(grad)))

        return hook

    def _new_site(
        self,
        key: str,
        shown: str,
        module: nn.Module,
        call: int,
        found: tuple[torch.Tensor, str] | None,
    ) -> LayerRecord:
        site = LayerRecord(
            name=key,
            module=shown,
            type=type(module).__name__,
            index=len(self.record.layers),
            call=call,
            parameters=sum(p.numel() for p in module.parameters(recurse=False)),
        )
        if found is not None:
            site.output_path = found[1]
            site.output_shape = list(found[0].shape)
            site.output_dtype = str(found[0].dtype).removeprefix("torch.")
        if call > 1:
            site.shares_weights_with = shown
        else:
            weight = main_weight(module)
            if weight is not None:
                site.weight_name, param = weight
                site.weight_shape = list(param.shape)
                site.fan_in, site.fan_out = fans(param)
                self._weights[key] = param
        self._sites[key] = site
        self.record.layers.append(site)
        return site

    # -- parameters and flushing ------------------------------------------------
    def capture_parameters(self, weights: bool = True, grads: bool = True) -> None:
        """Enqueue statistics of each recorded layer's weight and its ``.grad``.

        Call after backward (and, in training, before ``optimizer.step()``),
        when ``.grad`` holds the gradient the optimizer is about to use.
        """
        self._pending.extend(self._parameter_raws(weights, grads))

    def parameter_stats(self) -> dict[str, dict[str, Stats]]:
        """Weight and weight-gradient statistics of each recorded layer, now, on the
        host, outside the pending queue and without any collective (weights are
        the same on every DDP rank): for a caller that needs them off-schedule."""
        entries = self._parameter_raws(weights=True, grads=True)
        keys = [(key, role) for key, role, _ in entries]
        out: dict[str, dict[str, Stats]] = {}
        for (key, role), row in _to_host(_finalize_and_merge(keys, [raw for _, _, raw in entries])).items():
            out.setdefault(key, {})[role] = Stats(row)
        return out

    def _parameter_raws(self, weights: bool, grads: bool) -> list[tuple[str, str, RawStats]]:
        """(site, role, statistics) of each recorded weight and its gradient; not in
        a hook, so computed whole at once (warm caches, nothing to defer)."""
        exact = self.exact_parameter_extremes
        out: list[tuple[str, str, RawStats]] = []
        for key, param in self._weights.items():
            if weights:
                out.append((key, "weight", raw_stats(param, self.sample, exact)))
            if grads and param.grad is not None:
                out.append((key, "weight_grad", raw_stats(param.grad, self.sample, exact)))
        return out

    def _take(self, tensor: torch.Tensor) -> RawStats | Sample:
        """A hook's share of a tensor's statistics (see PENDING_SAMPLE_BUDGET)."""
        if self.sample is None:
            return raw_stats(tensor)
        taken = take_sample(tensor, self.sample)
        self._pending_elements += taken.values.numel()
        if self._pending_elements > PENDING_SAMPLE_BUDGET:
            self._reduce_pending()
        return taken

    def _reduce_pending(self) -> None:
        """Turn every sample copy still waiting into RawStats (frees the copies)."""
        # In place: a hook may be inside ``self._pending.append(... self._take(...))``,
        # whose bound ``append`` already holds the list.
        self._pending[:] = [(k, r, reduce_sample(v) if isinstance(v, Sample) else v) for k, r, v in self._pending]
        self._input_pending[:] = [reduce_sample(v) if isinstance(v, Sample) else v for v in self._input_pending]
        self._pending_elements = 0

    def flush(self) -> None:
        """Move pending statistics to the host (one transfer per device) and merge them.

        Under torch.distributed this is a collective: every rank must flush at
        the same steps.  Activation, ``∂ℓ/∂h`` and input statistics are merged
        across ranks; weights and weight gradients (identical on every DDP
        rank) are not.
        """
        self._reduce_pending()
        pending, self._pending = self._pending, []
        inputs, self._input_pending = self._input_pending, []
        keys: list[tuple[str, str]] = [(key, role) for key, role, _ in pending]
        keys += [("", "model_input")] * len(inputs)
        for key, role, profile in self._sequences.flush():  # per rank: not merged across ranks
            if key in self._sites:
                self._sites[key].add_time(role, profile)
        reduce = self.reduce_ranks and is_distributed()
        if not keys and not reduce:
            return
        reduced = cast("list[RawStats]", [v for _, _, v in pending] + inputs)  # _reduce_pending ran
        merged = _finalize_and_merge(keys, reduced)
        if reduce:
            shared = [k for k in merged if k[1] in REDUCED_ROLES]
            stacked = torch.stack([merged[k] for k in shared]) if shared else torch.zeros(0, SIZE)
            union, rows = merge_across_ranks(shared, stacked)
            merged.update(zip(union, rows, strict=True))  # type: ignore[arg-type]  # the keys we sent
            self.record.note(
                f"activation and gradient statistics merged over {world_size()} ranks; "
                "weights and weight gradients are rank 0's (all-reduced under DDP)"
            )
        for (key, role), row in _to_host(merged).items():
            if role == "model_input":
                stats = Stats(row)
                self.record.input = stats if self.record.input is None else self.record.input.merge(stats)
            elif key in self._sites:
                self._sites[key].add(role, Stats(row))
            else:
                self.record.note(f"{key}: recorded on another rank only; not in this rank's report")
        if keys:
            self.record.steps += 1

    def finish(self) -> Record:
        """Flush and return the record, with the hooked modules that never ran."""
        self.flush()
        ran = {layer.module for layer in self.record.layers}
        self.record.not_executed = [_display_name(name) for name, _ in self._selected if _display_name(name) not in ran]
        return self.record

    def pending_count(self) -> int:
        return len(self._pending) + len(self._input_pending)


def _finalize_and_merge(keys: list[tuple[str, str]], raws: Sequence[RawStats]) -> dict[tuple[str, str], torch.Tensor]:
    """Finalise raw statistics on their own devices and merge repeats of a key
    (several micro-batches, several batches of an audit) into one row."""
    if not raws:
        return {}
    by_device: dict[torch.device, list[int]] = {}
    for i, raw in enumerate(raws):
        by_device.setdefault(raw.lo.device, []).append(i)
    rows: list[torch.Tensor] = [torch.empty(0)] * len(raws)
    for indices in by_device.values():
        stacked = finalize([raws[i] for i in indices])
        for i, row in zip(indices, stacked, strict=True):
            rows[i] = row
    merged: dict[tuple[str, str], torch.Tensor] = {}
    for key, row in zip(keys, rows, strict=True):
        merged[key] = row if key not in merged else merge_stats(merged[key], row)
    return merged


def _to_host(rows: dict[tuple[str, str], torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """Copy rows to the host as float64: one stacked transfer per device."""
    by_device: dict[torch.device, list[tuple[str, str]]] = {}
    for key, row in rows.items():
        by_device.setdefault(row.device, []).append(key)
    host: dict[tuple[str, str], torch.Tensor] = {}
    for device_keys in by_device.values():
        stacked = torch.stack([rows[k] for k in device_keys]).to("cpu", torch.float64)
        host.update(zip(device_keys, stacked, strict=True))
    return {k: host[k] for k in rows}
