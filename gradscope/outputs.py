"""Find the floating-point tensor that stands for a module's output.

Modules return tensors, tuples, lists, dicts, dataclasses, Hugging Face
``ModelOutput`` objects (ordered dicts), ints or None.  gradscope records the
first floating tensor it meets, depth first, and says where it found it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

_MAX_DEPTH = 6  # deeper nesting than this is not a module output worth walking


def first_float_tensor(value: Any, path: str = "", depth: int = 0) -> tuple[torch.Tensor, str] | None:
    """The first floating tensor in ``value`` and its path ("", "[0]", "['logits']")."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            return value, path
        return None
    if depth >= _MAX_DEPTH:
        return None
    if isinstance(value, dict):
        items: list[tuple[str, Any]] = [(f"[{k!r}]", v) for k, v in value.items()]
    elif isinstance(value, (tuple, list)):
        items = [(f"[{i}]", v) for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f".{f.name}", getattr(value, f.name, None)) for f in dataclasses.fields(value)]
    else:
        return None
    for suffix, item in items:
        found = first_float_tensor(item, path + suffix, depth + 1)
        if found is not None:
            return found
    return None


def loss_source(output: Any) -> tuple[torch.Tensor, str, bool] | None:
    """The tensor a loss should be built from: (tensor, path, is_already_a_loss).

    A ``loss`` entry (scalar) is used as it is; otherwise a ``logits`` entry;
    otherwise the first floating tensor.
    """
    if isinstance(output, dict) or dataclasses.is_dataclass(output):
        getter = output.get if isinstance(output, dict) else lambda k: getattr(output, k, None)
        loss = getter("loss")
        if isinstance(loss, torch.Tensor) and loss.is_floating_point() and loss.numel() == 1:
            return loss, "['loss']", True
        logits = getter("logits")
        if isinstance(logits, torch.Tensor) and logits.is_floating_point():
            return logits, "['logits']", False
    found = first_float_tensor(output)
    if found is None:
        return None
    return found[0], found[1], False
