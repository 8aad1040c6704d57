"""TorchScript and torch.export models, made auditable.

* TorchScript: ``torch.jit.ScriptModule`` and its submodules refuse Python
  hooks (``register_forward_hook`` raises "not supported on ScriptModules").
  ``OpaqueModel`` is a plain ``nn.Module`` that calls the scripted model
  and exposes its parameters and buffers, so the audit can hook the whole
  model's output, read every parameter's gradient, and restore ``.grad`` and
  buffers afterwards.  Per-layer activations are not observable.
* torch.export: ``ExportedProgram.module()`` is one flat graph, but
  ``torch.export.unflatten`` rebuilds the submodule hierarchy with modules
  that *are* called, so forward hooks fire per layer.  The original class of
  each layer is read from the graph's ``nn_module_stack`` metadata.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class ScriptedTensors(nn.Module):
    """A Python shell whose parameters and buffers are those of ``self.scripted``
    (a compiled module it cannot register as a child): the audit restores their
    ``.grad`` and buffers, and the optimizer-facing views see them."""

    scripted: Any

    def named_parameters(  # type: ignore[override]  # ScriptModule parameters are plain tensors
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        if recurse:
            for name, param in self.scripted.named_parameters():
                yield (f"{prefix}.{name}" if prefix else name), param

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        if recurse:
            for name, buf in self.scripted.named_buffers():
                yield (f"{prefix}.{name}" if prefix else name), buf


class OpaqueModel(ScriptedTensors):
    """A hookable shell around a model whose submodules cannot be hooked.

    Used for a ``torch.jit.ScriptModule`` and for an exported program that
    could not be unflattened.  The inner model is deliberately *not*
    registered as a child: the Recorder would try to hook it and fail.
    Parameters and buffers are delegated to it (they are plain tensors in a
    ScriptModule, so they cannot be re-registered as ``nn.Parameter`` without
    losing their gradients).

    Args:
        inner: the scripted module or the exported program's module.
        follow_mode: pass ``train()``/``eval()`` on; False for exported
            programs, whose GraphModule refuses them (the mode was fixed at
            export time).
    """

    scripted: Any  # set with object.__setattr__, so nn.Module does not register it

    def __init__(self, inner: Any, follow_mode: bool = True) -> None:
        super().__init__()
        object.__setattr__(self, "scripted", inner)
        self.follow_mode = follow_mode

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.scripted(*args, **kwargs)

    def train(self, mode: bool = True) -> OpaqueModel:
        super().train(mode)
        if self.follow_mode:
            self.scripted.train(mode)
        return self

    def layer_types(self) -> dict[str, str]:
        """Qualified name -> the class a scripted submodule was compiled from."""
        return {name: getattr(m, "original_name", type(m).__name__) for name, m in self.scripted.named_modules()}


def scripted_input_guess(scripted: Any, batch: int = 32) -> tuple[tuple[int, ...], str, int | None] | None:
    """(shape, dtype, vocab) read from the first Linear/Embedding of a scripted model, when unambiguous."""
    for _, module in scripted.named_modules():
        kind = getattr(module, "original_name", "")
        if kind == "Linear" and hasattr(module, "in_features"):
            return (batch, int(module.in_features)), "float32", None
        if kind in ("Embedding", "EmbeddingBag") and hasattr(module, "num_embeddings"):
            return (batch, 16), "int64", int(module.num_embeddings)
        if kind.startswith("Conv") or kind in ("LSTM", "GRU", "RNN"):
            return None
    return None


def export_layer_types(program: Any) -> dict[str, str]:
    """Qualified module name -> original class name, from the graph's ``nn_module_stack``."""
    types: dict[str, str] = {}
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for value in stack.values():
            if isinstance(value, tuple) and len(value) == 2:
                path, cls = value
                name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
                types.setdefault(str(path), name)
    return types


def unflatten(program: Any) -> nn.Module | None:
    """``torch.export.unflatten(program)``, or None when this program cannot be unflattened."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pytree deprecation chatter inside torch
            return torch.export.unflatten(program)
    except Exception:
        return None


def export_example_inputs(program: Any) -> Any:
    """The example inputs saved in the archive: a tensor, a tuple of args, or a kwargs dict."""
    example = getattr(program, "example_inputs", None)
    if not example:
        return None
    args, kwargs = example
    if kwargs and not args:
        return dict(kwargs)
    if args and not kwargs:
        return args[0] if len(args) == 1 else tuple(args)
    return None
