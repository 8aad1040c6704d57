"""Synthetic inputs and losses for an audit, as DESIGN.md specifies them.

Float inputs ~ N(0, 1); int64 inputs uniform over [0, vocab); ``ce`` targets
uniform class indices over the output's last dimension; ``mse`` targets
N(0, 1) of the output's shape; ``mean`` is the mean of the output.  All drawn
from a generator seeded with ``seed`` on the CPU, then moved to the model's
device, so the same seed gives the same inputs on every device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradscope.errors import InputError
from gradscope.outputs import loss_source

LOSSES = ("ce", "mse", "mean")
DEFAULT_BATCH = 32
DEFAULT_SEQUENCE = 16


@dataclass
class InputSpec:
    """How to build synthetic inputs: shape (batch first), dtype, vocabulary."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    vocab: int | None = None
    inferred_from: str | None = None  # the layer the shape was read from, when inferred

    def describe(self) -> str:
        text = f"{list(self.shape)} {str(self.dtype).removeprefix('torch.')}"
        if self.vocab is not None:
            text += f" ids in [0, {self.vocab})"
        return text


def parse_shape(text: str) -> tuple[int, ...]:
    """'32,784' or '32x784' -> (32, 784)."""
    # Every separator must stand between two numbers: "8,x" or "32,,784" is a typo, not (8,).
    parts = text.replace("x", ",").replace(" ", "").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise InputError(f"input shape {text!r} is not a list of integers such as 32,784") from None
    if not shape or any(s <= 0 for s in shape):
        raise InputError(f"input shape {text!r} must be positive integers such as 32,784")
    return shape


# The least an audit holds for a synthetic batch of n elements: the input itself
# (n * itemsize bytes) and one float32 working copy of it while its statistics
# are computed (gradscope records the model's input; see stats.py).  The forward
# and backward need more, so this is a lower bound: a shape refused by it cannot fit.
_WORKING_COPY_BYTES = 4


def input_bytes_lower_bound(shape: Sequence[int], dtype: torch.dtype | str = torch.float32) -> int:
    """Bytes an audit needs at least for a synthetic input of ``shape`` (see above)."""
    numel = math.prod(int(s) for s in shape)
    itemsize = torch.empty((), dtype=parse_dtype(dtype)).element_size()
    return numel * (itemsize + _WORKING_COPY_BYTES)


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup v2 limit."""
    found: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as handle:
            limit = handle.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current", encoding="ascii") as handle:
                found.append(max(0, int(limit) - int(handle.read().strip())))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            return None
    return min(found)


def format_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def check_input_memory(shape: Sequence[int], dtype: torch.dtype | str = torch.float32, what: str = "") -> None:
    """Refuse a synthetic input shape that cannot fit in memory, before allocating it."""
    need = input_bytes_lower_bound(shape, dtype)
    label = what or f"input shape {','.join(str(s) for s in shape)}"
    name = str(parse_dtype(dtype)).removeprefix("torch.")
    if math.prod(shape) >= 2**63:  # beyond what a tensor can index
        raise InputError(f"{label} has {math.prod(shape):.3g} elements, more than a tensor can hold")
    available = available_memory()
    if available is not None and need > available:
        raise InputError(
            f"{label} needs at least {format_bytes(need)} (the {name} input and a float32 working copy), "
            f"more than the {format_bytes(available)} of memory available; pass a smaller shape"
        )


def check_batch_not_empty(inputs: Any, source: str = "the input") -> None:
    """An input batch with no elements is a mistake: nothing would be measured."""
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else [inputs]
    for index, value in enumerate(values):
        if isinstance(value, torch.Tensor) and value.numel() == 0:
            where = "" if not isinstance(inputs, (dict, tuple, list)) else f" (entry {index})"
            if isinstance(inputs, dict):
                where = f" (entry {list(inputs)[index]!r})"
            raise InputError(f"{source} holds an empty batch{where}: shape {list(value.shape)}; nothing to audit")


def parse_dtype(text: str | torch.dtype) -> torch.dtype:
    if isinstance(text, torch.dtype):
        return text
    names = {
        "float32": torch.float32,
        "float": torch.float32,
        "int64": torch.int64,
        "long": torch.int64,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float64": torch.float64,
    }
    if text not in names:
        raise InputError(f"input dtype {text!r} is not one of float32, int64, float16, bfloat16, float64")
    return names[text]


def first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first Linear, Conv or Embedding in registration order (a guess at the
    layer that sees the input; exact for Sequential-style models)."""
    for name, module in model.named_modules():
        if isinstance(
            module, (nn.Linear, nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvNd, nn.RNNBase, nn.Bilinear)
        ):
            return name, module
    return None


def infer_input(model: nn.Module, batch: int = DEFAULT_BATCH) -> InputSpec:
    """An input spec read from the first layer where that is unambiguous.

    Linear(in_features) -> float (batch, in_features); Embedding(num, dim) ->
    int64 ids (batch, 16) over [0, num); RNNs with batch_first -> (batch, 16,
    input_size).  Convolutions leave the spatial size open: that raises
    InputError naming the flag to pass.
    """
    found = first_layer(model)
    if found is None:
        raise InputError(
            "cannot infer the input shape (no Linear, Conv or Embedding layer found); "
            "pass --input-shape, e.g. --input-shape 32,784"
        )
    name, layer = found
    where = f"{name or 'model'} ({type(layer).__name__})"
    if isinstance(layer, nn.Linear):
        return InputSpec((batch, layer.in_features), torch.float32, None, where)
    if isinstance(layer, (nn.Embedding, nn.EmbeddingBag)):
        return InputSpec((batch, DEFAULT_SEQUENCE), torch.int64, layer.num_embeddings, where)
    if isinstance(layer, nn.RNNBase) and layer.batch_first:
        return InputSpec((batch, DEFAULT_SEQUENCE, layer.input_size), torch.float32, None, where)
    if isinstance(layer, nn.modules.conv._ConvNd):
        dims = len(layer.kernel_size)
        example = ",".join([str(batch), str(layer.in_channels)] + ["32"] * dims)
        raise InputError(f"cannot infer the spatial size for {where}; pass --input-shape, e.g. --input-shape {example}")
    raise InputError(f"cannot infer the input shape from {where}; pass --input-shape")


def resolve_spec(
    model: nn.Module,
    input_shape: Sequence[int] | None,
    input_dtype: torch.dtype | str,
    vocab: int | None,
) -> InputSpec:
    """The synthetic-input spec: the given shape, or one inferred from the
    first layer; int64 inputs take their vocabulary from ``vocab`` or the
    model's first Embedding."""
    if input_shape is not None:
        spec = InputSpec(tuple(int(s) for s in input_shape), parse_dtype(input_dtype), vocab)
        check_input_memory(spec.shape, spec.dtype)
    else:
        spec = infer_input(model)
        if vocab is not None:
            spec.vocab = vocab
    if not spec.dtype.is_floating_point and spec.vocab is None:
        embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
        if embedding is None:
            raise InputError("integer inputs need a vocabulary size; pass --vocab N")
        spec.vocab = embedding.num_embeddings
    return spec


def synthetic_input(spec: InputSpec, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    if spec.dtype.is_floating_point:
        x = torch.randn(spec.shape, generator=generator, dtype=torch.float32).to(spec.dtype)
    else:
        if spec.vocab is None:
            raise InputError("integer inputs need a vocabulary size; pass --vocab N")
        x = torch.randint(0, spec.vocab, spec.shape, generator=generator, dtype=spec.dtype)
    return x.to(device)


@dataclass
class LossResult:
    loss: torch.Tensor
    description: str  # e.g. "ce on output['logits']"
    classes: int | None = None  # softmax cross-entropy built here: the class count
    logits: int | None = None  # and the element count of the tensor it read


def compute_loss(
    output: Any,
    kind: str | Callable[[Any], torch.Tensor],
    generator: torch.Generator,
) -> LossResult:
    """Reduce a model output to a scalar loss, saying which part was used."""
    if callable(kind):
        loss = kind(output)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise InputError("the loss callable must return a scalar tensor")
        return LossResult(loss.reshape(()), "custom loss")
    found = loss_source(output)
    if found is None:
        raise InputError(
            f"the model returned no floating-point tensor to build a loss from (got {type(output).__name__})"
        )
    tensor, path, already_loss = found
    where = f"output{path}"
    if already_loss:
        return LossResult(tensor.reshape(()), f"the model's own loss ({where})")
    out = tensor.float()
    if kind == "ce":
        if out.dim() < 2 or out.shape[-1] < 2:
            target = torch.randn(out.shape, generator=generator).to(out.device)
            loss = nn.functional.mse_loss(out, target)
            return LossResult(loss, f"mse on {where} (ce needs a class dimension; shape {list(out.shape)})")
        classes = out.shape[-1]
        target = torch.randint(0, classes, out.shape[:-1], generator=generator).to(out.device)
        loss = nn.functional.cross_entropy(out.reshape(-1, classes), target.reshape(-1))
        return LossResult(loss, f"ce on {where} ({classes} classes)", classes, out.numel())
    if kind == "mse":
        target = torch.randn(out.shape, generator=generator).to(out.device)
        return LossResult(nn.functional.mse_loss(out, target), f"mse on {where}")
    if kind == "mean":
        return LossResult(out.mean(), f"mean of {where}")
    raise InputError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)} or pass a callable")
