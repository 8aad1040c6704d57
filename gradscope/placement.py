"""Parameters as the model knows them, wherever a sharding engine put them.

Under FSDP2 (``fully_shard``) and tensor parallelism a parameter is a DTensor
whose ``to_local()`` is this rank's shard; under FSDP1 with
``use_orig_params=False`` the module's parameters are gone and live as slices
of one ``FlatParameter`` per wrapped unit (``_param_infos`` says which module
and attribute each slice was, ``_shapes`` its shape, ``_shard_param_infos``
where this rank's part of it sits in the local shard); with
``use_orig_params=True`` the module keeps a parameter object that is a 1-D
view of this rank's part.  Each of them frees or swaps storage between forward
and backward (FSDP reshards after forward; reading a ``Parameter`` kept from
the forward reads freed memory), so nothing here keeps a parameter: a
``ParameterRef`` names a (module, attribute) pair and ``resolve`` looks the
tensor up when its statistics are taken.

A resolved parameter (``Local``) is a plain tensor with its reduction rule:

* ``sharded``: this rank holds a disjoint part; statistics of all ranks' parts
  are merged (sums add, extremes combine) to give the whole parameter's.
* otherwise a replica (a plain parameter under DDP, a ``Replicate`` placement,
  an FSDP1 unit that is not sharded): every rank holds the same numbers, so
  only one rank (``owned``) contributes and it is counted once — as Megatron-LM
  and torchtitan count replicated parameters in the global gradient norm.

Names are the model's own: the wrapper components FSDP1
(``_fsdp_wrapped_module``), activation checkpointing
(``_checkpoint_wrapped_module``) and ``torch.compile`` (``_orig_mod``) insert
are dropped, and FSDP2's dynamic ``FSDP<cls>`` classes are reported as ``<cls>``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

# Module-name components inserted by wrappers, not by the model's author:
# FSDP1's FullyShardedDataParallel, torch.distributed.algorithms checkpoint_wrapper,
# torch.compile's OptimizedModule.
WRAPPER_COMPONENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
_FSDP2_BASE = "FSDPModule"  # torch.distributed.fsdp.FSDPModule, matched by name (no import cost)


def clean_name(name: str) -> str:
    """``name`` without the components wrappers insert ("" stays "")."""
    if not name:
        return name
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)


def layer_type(module: nn.Module) -> str:
    """The class name of the module as the model defined it.

    ``fully_shard`` swaps a module's class for a dynamic ``FSDP<cls>``
    subclass of (FSDPModule, cls): the name reported is ``cls``'s, so that the
    diagnosis recognises a Linear as a Linear.
    """
    cls = type(module)
    if any(base.__name__ == _FSDP2_BASE for base in cls.__mro__[1:]):
        for base in cls.__mro__[1:]:
            if base.__name__ != _FSDP2_BASE and not any(b.__name__ == _FSDP2_BASE for b in base.__mro__):
                return base.__name__
    return cls.__name__


def is_wrapper(module: nn.Module) -> bool:
    """A module that only wraps another (FSDP1 unit, checkpoint wrapper, compiled module)."""
    return (
        hasattr(module, "_fsdp_wrapped_module")
        or hasattr(module, "_checkpoint_wrapped_module")
        or (hasattr(module, "_orig_mod") and isinstance(getattr(module, "_orig_mod", None), nn.Module))
    )


def owns_parameters(module: nn.Module) -> bool:
    """Whether the module registers a parameter of its own (an FSDP1
    FlatParameter, registered on the wrapped module, is not one)."""
    return any(p is not None and not _is_flat_parameter(p) for p in module._parameters.values())


def registered_parameter(module: nn.Module, attr: str) -> Any:
    """``module._parameters[attr]``, or None.  Not ``.get``: a TorchScript
    module's ``_parameters`` is an ``OrderedDictWrapper`` without it, and a
    scripted Sequential is audited child by child (loaders.hookless.unrolled)."""
    params = module._parameters
    return params[attr] if attr in params else None


def _is_dtensor(tensor: Any) -> bool:
    return hasattr(tensor, "to_local") and hasattr(tensor, "placements")


def _is_flat_parameter(tensor: Any) -> bool:
    return hasattr(tensor, "_param_infos") and hasattr(tensor, "_shard_param_infos")


def is_sharded(tensor: Any) -> bool:
    """A DTensor (FSDP2, tensor parallel) or an FSDP1 flat parameter: not this rank's
    whole tensor, which only a collective would read."""
    return _is_dtensor(tensor) or _is_flat_parameter(tensor)


class Local(NamedTuple):
    """One parameter as this rank holds it now (plain tensors, nothing kept)."""

    value: torch.Tensor  # this rank's part (the whole parameter for a replica); may be empty
    grad: torch.Tensor | None
    sharded: bool  # a disjoint part: merged across ranks
    owned: bool  # whether this rank's statistics count (False: a replica another rank counts)
    requires_grad: bool


@dataclass(frozen=True)
class ParameterRef:
    """Where a parameter is found: a module attribute, or a slice of an FSDP1 flat parameter."""

    name: str  # the model's own qualified name, e.g. "encoder.0.weight"
    module: nn.Module
    attr: str
    flat_shape: tuple[int, ...] | None = None  # FSDP1: the original shape (the module lost it)
    handle: Any = None  # FSDP1 FlatParamHandle, when the parameter lives in a FlatParameter
    index: int = -1  # its position in the handle's flat parameter

    @property
    def shape(self) -> tuple[int, ...]:
        """The whole (unsharded) parameter's shape (a DTensor's shape is the global
        one); read when asked, since a lazy module materialises its parameters
        in its first forward."""
        if self.flat_shape is not None:
            return self.flat_shape
        param = registered_parameter(self.module, self.attr)
        return tuple(param.shape) if param is not None else ()

    def registered(self) -> torch.Tensor | None:
        """The parameter object registered now (what an optimizer holds): the
        module's attribute, or the FSDP1 FlatParameter the parameter lives in."""
        if self.handle is not None:
            return self.handle.flat_param
        return registered_parameter(self.module, self.attr)

    def resolve(self, owner_rank: bool) -> Local | None:
        """The parameter now.  ``owner_rank``: whether this rank counts replicas
        (rank 0 of the reduction group; True when nothing is reduced)."""
        if self.handle is not None:
            return _resolve_flat(self.handle, self.index, owner_rank)
        param = registered_parameter(self.module, self.attr)
        if param is None:
            return None
        if _is_dtensor(param):
            return _resolve_dtensor(param)
        grad = stored_values(param.grad)
        return Local(param.detach(), grad, sharded=False, owned=owner_rank, requires_grad=param.requires_grad)


def stored_values(grad: torch.Tensor | None) -> torch.Tensor | None:
    """A gradient as statistics can read it: itself when dense; a sparse one's
    stored values (``nn.Embedding(sparse=True)`` gives a COO gradient holding the
    rows the batch touched, which ``reshape``, ``take`` and ``dot`` cannot read).
    Its norm is the gradient's norm (duplicates are summed by ``coalesce``); its
    other statistics describe the touched rows, the only ones the update moves."""
    if grad is None or grad.layout == torch.strided:
        return grad
    if grad.layout == torch.sparse_coo:
        return grad.detach().coalesce().values()
    return grad.detach().values()  # compressed layouts (CSR, CSC, BSR, BSC)


def _local_of(tensor: Any) -> torch.Tensor:
    # A detached DTensor's local tensor: a view of this rank's storage that
    # follows in-place optimizer updates.
    return tensor.detach().to_local()


def _owns(param: Any) -> bool:
    """Whether this rank counts its part of a DTensor: it is in the mesh, and at
    coordinate 0 of every mesh dimension the tensor is replicated over."""
    coordinate = param.device_mesh.get_coordinate()
    if coordinate is None:
        return False
    return all(c == 0 for c, p in zip(coordinate, param.placements, strict=True) if p.is_replicate())


def _resolve_dtensor(param: Any) -> Local:
    """A DTensor: its local tensor, merged over Shard dimensions, counted once
    over Replicate ones (the rank at coordinate 0 of each replicated mesh dim)."""
    placements = param.placements
    coordinate = param.device_mesh.get_coordinate()
    if coordinate is None:  # this rank is outside the parameter's mesh
        empty = torch.empty(0, dtype=param.dtype, device=_local_of(param).device)
        return Local(empty, None, sharded=True, owned=False, requires_grad=param.requires_grad)
    owned = all(c == 0 for c, p in zip(coordinate, placements, strict=True) if p.is_replicate())
    sharded = any(p.is_shard() for p in placements)
    grad = param.grad
    if grad is not None:
        if tuple(grad.placements) != tuple(placements):
            # The gradient laid out otherwise than its parameter: a pending sum (Partial),
            # whose local part is not a part of the gradient, or a replica of a sharded
            # parameter's gradient (an Embedding under RowwiseParallel gets a Replicate
            # gradient for its Shard(0) weight), whose local part is the whole gradient on
            # every rank.  Laid out as the parameter, this rank's part pairs with its part
            # of the value and every element is counted once: Replicate -> Shard is a
            # local slice, Partial -> Shard a reduce-scatter, Partial -> Replicate an
            # all-reduce (collectives every rank reaches: parameters are resolved in the
            # same order on each).
            grad = grad.redistribute(device_mesh=param.device_mesh, placements=placements)
        grad = _local_of(grad)
    return Local(_local_of(param), grad, sharded=sharded, owned=owned, requires_grad=param.requires_grad)


def _resolve_flat(handle: Any, index: int, owner_rank: bool) -> Local:
    """One original parameter inside an FSDP1 FlatParameter."""
    flat = handle.flat_param
    info = flat._shard_param_infos[index]
    data = flat.detach()
    requires_grad = bool(flat.requires_grad)
    if handle.uses_sharded_strategy and handle.is_sharded(data):
        grad = handle.sharded_grad
        if not info.in_shard:
            empty = data.new_empty(0)
            return Local(empty, None if grad is None else empty, sharded=True, owned=True, requires_grad=requires_grad)
        start, numel = info.offset_in_shard, info.numel_in_shard
        part = grad.detach()[start : start + numel] if grad is not None else None
        return Local(data[start : start + numel], part, sharded=True, owned=True, requires_grad=requires_grad)
    # Unsharded (NO_SHARD, or between forward and backward): every rank holds it all.
    start = _unpadded_offset(flat, index)
    numel = int(flat._numels[index])
    grad = flat.grad
    part = grad.detach()[start : start + numel] if grad is not None and grad.numel() >= start + numel else None
    return Local(data[start : start + numel], part, sharded=False, owned=owner_rank, requires_grad=requires_grad)


def _unpadded_offset(flat: Any, index: int) -> int:
    """Where original parameter ``index`` starts in an unsharded FlatParameter.  With
    ``use_orig_params=True`` FSDP1 pads each parameter to an aligned offset
    (``_numels_with_padding``, ``_is_padding_mask``); summing ``_numels`` alone
    read the padding (filled with 42) as the next parameter's values."""
    numels, padding = getattr(flat, "_numels_with_padding", None), getattr(flat, "_is_padding_mask", None)
    if numels is None or padding is None:
        return sum(int(n) for n in flat._numels[:index])
    offset, seen = 0, 0
    for numel, is_padding in zip(numels, padding, strict=True):
        if not is_padding:
            if seen == index:
                return offset
            seen += 1
        offset += int(numel)
    raise IndexError(f"parameter {index} is not in this FlatParameter")


class ParameterTable:
    """Every parameter of a model by module, under the model's own names.

    Built from the model as it is when first needed (after ``fully_shard`` or
    FSDP1 wrapping, whichever came first); it keeps modules and names, never a
    parameter.
    """

    def __init__(self, model: nn.Module) -> None:
        # FSDP1: (module id) -> {attribute: (handle, index in the flat parameter, shape)}
        flat: dict[int, dict[str, tuple[Any, int, tuple[int, ...]]]] = {}
        for module in model.modules():
            handle = getattr(module, "_handle", None)
            flat_param = getattr(handle, "flat_param", None)
            if flat_param is None or not _is_flat_parameter(flat_param):
                continue
            primary: dict[tuple[int, str], int] = {}
            for i, info in enumerate(flat_param._param_infos):
                shape = tuple(int(s) for s in flat_param._shapes[i])
                flat.setdefault(id(info.module), {})[info.param_name] = (handle, i, shape)
                primary[(id(info.module), info.param_name)] = i
            # Tied parameters (an output head sharing the embedding's weight): FSDP1
            # keeps one slice, and the other owners in _shared_param_infos point at it.
            for shared in getattr(flat_param, "_shared_param_infos", ()):
                at = primary.get((id(shared.prim_module), shared.prim_param_name))
                if at is not None:
                    shape = tuple(int(s) for s in flat_param._shapes[at])
                    flat.setdefault(id(shared.module), {})[shared.param_name] = (handle, at, shape)
        self._by_module: dict[int, list[ParameterRef]] = {}
        self._all: list[ParameterRef] = []
        # id -> parameter, held only while the table is built: a TorchScript
        # module hands out a fresh Python object per access, and a dead one's
        # id could be reused and mistaken for a tied parameter.
        seen: dict[int, Any] = {}
        seen_slices: set[tuple[int, int]] = set()  # (handle, index) of FSDP1 slices listed once
        for module_name, module in model.named_modules():
            refs: list[ParameterRef] = []
            prefix = clean_name(module_name)
            flattened = flat.pop(id(module), {})
            for attr, param in module._parameters.items():
                if param is None or _is_flat_parameter(param):
                    continue
                full = f"{prefix}.{attr}" if prefix else attr
                hit = flattened.pop(attr, None)
                if hit is not None:  # FSDP1 use_orig_params=True: a view into the flat parameter
                    refs.append(ParameterRef(full, module, attr, hit[2], hit[0], hit[1]))
                else:
                    refs.append(ParameterRef(full, module, attr))
                tied = id(param) in seen or (hit is not None and (id(hit[0]), hit[1]) in seen_slices)
                seen[id(param)] = param
                if hit is not None:
                    seen_slices.add((id(hit[0]), hit[1]))
                if not tied:  # a tied parameter: its norm counts once
                    self._all.append(refs[-1])
            for attr, (handle, i, shape) in flattened.items():  # use_orig_params=False: no attribute left
                full = f"{prefix}.{attr}" if prefix else attr
                refs.append(ParameterRef(full, module, attr, shape, handle, i))
                if (id(handle), i) not in seen_slices:
                    seen_slices.add((id(handle), i))
                    self._all.append(refs[-1])
            if refs:
                self._by_module[id(module)] = refs

    def of_module(self, module: nn.Module) -> list[ParameterRef]:
        """The parameters a module owns directly, in registration order."""
        return self._by_module.get(id(module), [])

    def __iter__(self) -> Iterator[ParameterRef]:
        """Every distinct parameter of the model once."""
        return iter(self._all)

    def __len__(self) -> int:
        return len(self._all)


def main_weight_ref(refs: list[ParameterRef]) -> ParameterRef | None:
    """The parameter that stands for a layer's weight: ``weight``, else the first
    matrix-shaped one (``weight_ih_l0`` of an LSTM), else the first one."""
    if not refs:
        return None
    for ref in refs:
        if ref.attr == "weight":
            return ref
    for ref in refs:
        if len(ref.shape) >= 2:
            return ref
    return refs[0]


def local_gradients(refs: list[ParameterRef], owner_rank: bool) -> list[tuple[str, torch.Tensor | None]]:
    """(name, this rank's part of the gradient) of each parameter; None where this
    rank has none or holds a replica another rank counts.

    Plain parameters (DDP, one process) take one dictionary lookup each: this
    runs every step.
    """
    out: list[tuple[str, torch.Tensor | None]] = []
    for ref in refs:
        if ref.handle is None:
            param = registered_parameter(ref.module, ref.attr)
            if param is None:
                out.append((ref.name, None))
                continue
            if not _is_dtensor(param):
                out.append((ref.name, stored_values(param.grad) if owner_rank else None))
                continue
            grad: Any = param.grad
            if grad is None or tuple(grad.placements) == tuple(param.placements):
                # The common DTensor case without building the parameter's local view.
                out.append((ref.name, _local_of(grad) if grad is not None and _owns(param) else None))
                continue
        local = ref.resolve(owner_rank)
        out.append((ref.name, local.grad if local is not None and local.owned else None))
    return out


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached, gathered whole when it is a DTensor shard
    (``full_tensor()``: a collective every rank of its mesh must reach; a Replicate
    one is its local tensor, no communication).  A loss computed under tensor
    parallelism's ``loss_parallel()`` is such a DTensor."""
    value = tensor.detach()
    return value.full_tensor() if hasattr(value, "full_tensor") else value
