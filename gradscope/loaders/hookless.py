"""Recording parameters of a model whose submodules cannot carry hooks.

A post-accumulate-grad hook on each parameter enqueues ``tensor_stats`` of
its ``.grad`` after every backward (device work only, no host sync); after
the audit, each module that owns parameters becomes a layer with ``weight``
and ``weight_grad`` statistics.  Activations and output gradients of those
layers are not observable and the report says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from gradscope.loaders.compiled import ScriptedTensors
from gradscope.placement import stored_values
from gradscope.record import LayerRecord, Record
from gradscope.recorder import fans
from gradscope.stats import Stats, tensor_stats


class ParameterProbe:
    """Context manager: statistics of every trainable parameter's ``.grad`` after each backward."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.grads: dict[str, list[torch.Tensor]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> ParameterProbe:
        try:
            for name, param in self.params:
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook(name)))
        except BaseException:
            self.close()
            raise
        return self

    def _hook(self, name: str) -> Any:
        def hook(param: torch.Tensor) -> None:
            grad = stored_values(param.grad)  # a sparse gradient: its stored values
            if grad is not None:
                self.grads.setdefault(name, []).append(tensor_stats(grad))

        return hook

    def close(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _main_weight(params: dict[str, torch.Tensor]) -> str:
    # Same choice as gradscope.recorder.main_weight: "weight", else the first matrix, else the first.
    if "weight" in params:
        return "weight"
    return next((n for n, p in params.items() if p.dim() >= 2), next(iter(params)))


def parameter_layers(model: nn.Module, probe: ParameterProbe, types: dict[str, str]) -> list[LayerRecord]:
    """One LayerRecord per module owning parameters, in registration order, with
    ``weight`` and (when a gradient arrived) ``weight_grad`` statistics."""
    owners: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in model.named_parameters():
        module, _, pname = name.rpartition(".")
        owners.setdefault(module, {})[pname] = param
    layers: list[LayerRecord] = []
    vectors: list[torch.Tensor] = []
    slots: list[tuple[LayerRecord, str]] = []
    for module, params in owners.items():
        pname = _main_weight(params)
        weight = params[pname]
        fan_in, fan_out = fans(weight)
        shown = module or "model"
        layer = LayerRecord(
            name=shown,
            module=shown,
            type=types.get(module, "?"),
            index=len(layers),
            weight_name=pname,
            weight_shape=list(weight.shape),
            fan_in=fan_in,
            fan_out=fan_out,
            parameters=sum(p.numel() for p in params.values()),
        )
        layers.append(layer)
        vectors.append(tensor_stats(weight.detach()))
        slots.append((layer, "weight"))
        key = f"{module}.{pname}" if module else pname
        for grad_vector in probe.grads.get(key, []):
            vectors.append(grad_vector)
            slots.append((layer, "weight_grad"))
    if vectors:
        rows = torch.stack(vectors).to("cpu", torch.float64)  # one transfer
        for (layer, role), row in zip(slots, rows, strict=True):
            layer.add(role, Stats(row))
    return layers


def merge_parameter_layers(record: Record, layers: list[LayerRecord]) -> None:
    """Put the parameter-only layers before the whole-model layer and renumber."""
    record.layers = layers + [layer for layer in record.layers]
    for index, layer in enumerate(record.layers):
        layer.index = index


# -- TorchScript Sequential: per-layer visibility by calling its children in order ----------


class _ScriptedChild(nn.Module):
    """A hookable stand-in for one scripted child: calls it, exposes its own parameters.

    Subclassed per original class name (``Linear``, ``ReLU``...), so the record
    carries the type the diagnosis reads.  The scripted child is not registered
    as a submodule (it cannot carry hooks); its direct parameters and buffers are
    listed as this module's, so the recorder finds the weight, its fans and its
    gradient, and the audit restores ``.grad`` and buffers.
    """

    scripted: Any

    def __init__(self, scripted: Any) -> None:
        super().__init__()
        object.__setattr__(self, "scripted", scripted)
        # The scripted child's own parameter mapping (an OrderedDictWrapper):
        # the recorder finds a layer's weight through ``module._parameters``.
        object.__setattr__(self, "_parameters", scripted._parameters)

    def forward(self, *args: Any) -> Any:
        return self.scripted(*args)

    def train(self, mode: bool = True) -> _ScriptedChild:
        super().train(mode)
        self.scripted.train(mode)
        return self

    def named_parameters(  # type: ignore[override]  # ScriptModule parameters are plain tensors
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in self.scripted.named_parameters(recurse=recurse):
            yield (f"{prefix}.{name}" if prefix else name), param

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, buf in self.scripted.named_buffers(recurse=recurse):
            yield (f"{prefix}.{name}" if prefix else name), buf


_CHILD_CLASSES: dict[str, type[_ScriptedChild]] = {}


def _child_class(original: str) -> type[_ScriptedChild]:
    name = original if original.isidentifier() else "ScriptModule"
    if name not in _CHILD_CLASSES:
        _CHILD_CLASSES[name] = type(name, (_ScriptedChild,), {"__module__": __name__})
    return _CHILD_CLASSES[name]


class UnrolledSequential(ScriptedTensors):
    """A scripted ``nn.Sequential`` run child by child from Python.

    ``Sequential.forward`` is exactly "feed each child the previous child's
    output", so calling the scripted children in order computes the same
    numbers, and each child, wrapped in a hookable stand-in, gets its own
    activation, ∂ℓ/∂h, weight and weight gradient: a TorchScript audit of a
    Sequential sees what the factory audit sees.
    """

    scripted: Any

    def __init__(self, scripted: Any) -> None:
        super().__init__()
        object.__setattr__(self, "scripted", scripted)
        for name, child in scripted.named_children():
            self.add_module(name, _child_class(getattr(child, "original_name", "ScriptModule"))(child))

    def forward(self, x: Any) -> Any:
        for child in self.children():
            x = child(x)
        return x

    def train(self, mode: bool = True) -> UnrolledSequential:
        super().train(mode)
        self.scripted.train(mode)
        return self


def unrolled(module: nn.Module) -> UnrolledSequential | None:
    """The per-layer stand-in for a hook-less shell around a scripted ``nn.Sequential``, else None."""
    scripted = getattr(module, "scripted", None)
    if scripted is None or getattr(scripted, "original_name", "") != "Sequential":
        return None
    if not isinstance(scripted, torch.jit.ScriptModule):
        return None
    return UnrolledSequential(scripted)
