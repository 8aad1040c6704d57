"""torch.distributed: which ranks reduce together, and the reduction itself.

What is reduced (docs/distributed.md says it for users):

* activations, ∂ℓ/∂h and layer inputs: each data-parallel rank sees its own
  rows, so their statistics are merged over the group (exactly: counts, power
  sums, histograms add; extremes combine).  ∂ℓ/∂h is then divided by the
  data-parallel degree: each rank's loss is a mean over its own rows, the
  single-process loss over all of them is the mean of the ranks' losses, so a
  rank's ∂ℓ/∂h is W times the single-process one.
* weights and weight gradients: statistics of each rank's local part (see
  ``gradscope.placement``) merged, shards summed and replicas counted once.
* global gradient norm: √(Σ over ranks of the local Σg²), replicas once; the
  loss: the mean over ranks.

How: one flush is a few packed all-reduces whose size depends on the number
of statistics, never on the world size — a sum of every row's counts, power
sums and histogram (plus the caller's extra numbers: losses, squared norms),
and a min of every row's (min, −max).  The ranks must lay rows out the same
way: they agree on the set of keys once (the first flush, or when a rank sees
a new key, signalled by a flag inside the sum itself) with one
``all_gather_object`` of the new keys only.

Nothing here runs a collective unless a group was chosen (``resolve_group``),
and callers never reduce on an exception path, so a failing rank fails fast.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradscope import host_copy
from gradscope.device_constants import on_device
from gradscope.errors import GradscopeError
from gradscope.host_copy import HostBuffers, HostCopy
from gradscope.stats import COUNT, M2, MAX, MCOUNT, MEAN, MIN, NANSEEN, NONFINITE, SIZE

NO_REDUCTION = "none"
AUTO = "auto"  # audit's default: reduce only a sharded model (every rank runs its forward anyway)


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_writer() -> bool:
    """Only rank 0 writes files and prints (True outside torch.distributed)."""
    return rank() == 0


def is_sharded(model: nn.Module) -> bool:
    """Whether some parameter is a DTensor (FSDP2, tensor parallel) or lives in
    an FSDP1 FlatParameter: then every rank must run the model together."""
    for module in model.modules():
        if getattr(module, "_handle", None) is not None and hasattr(module, "_fsdp_wrapped_module"):
            return True
        for param in module._parameters.values():
            if param is not None and hasattr(param, "placements") and hasattr(param, "to_local"):
                return True
    return False


@dataclass(frozen=True)
class ReductionGroup:
    """The ranks whose statistics are merged (a torch.distributed process group)."""

    group: Any  # a ProcessGroup, or None for the default group
    rank: int  # this rank's index in the group
    size: int

    def device(self) -> torch.device:
        """Where tensors must live for the group's backend."""
        import torch.distributed as dist

        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def resolve_group(choice: Any, model: nn.Module | None = None) -> ReductionGroup | None:
    """The group to reduce over, or None for per-rank statistics.

    ``choice``: None, the default group (when torch.distributed is initialised
    with more than one rank); a ProcessGroup; ``"none"``, no reduction (and no
    collective, ever); ``"auto"``, the default group only if ``model`` is
    sharded (``audit``'s default, so that ``if rank == 0: audit(model)`` on an
    unsharded model never waits for the other ranks).
    """
    import torch.distributed as dist

    if isinstance(choice, ReductionGroup):
        return choice
    if isinstance(choice, str):
        if choice == NO_REDUCTION:
            return None
        if choice != AUTO:
            raise GradscopeError(f"process_group: choose None, a ProcessGroup, 'none' or 'auto', not {choice!r}")
        if model is None or not is_distributed() or not is_sharded(model):
            return None
        choice = None
    if not (dist.is_available() and dist.is_initialized()):
        if choice is not None:
            raise GradscopeError("process_group was given but torch.distributed is not initialised")
        return None
    size = dist.get_world_size(choice)
    if size <= 1:
        return None
    return ReductionGroup(choice, dist.get_rank(choice), size)


def data_parallel_size(model: nn.Module, group: ReductionGroup) -> int:
    """How many ranks of ``group`` see different data (and average their gradients).

    Tensor parallelism gives every rank of its mesh the same rows: a model
    with DTensor parameters and no FSDP2 module is tensor parallel over its
    mesh, the rest of the group is data parallel.  FSDP2 shards over the
    data-parallel mesh dimension (the first one).  Otherwise (DDP, FSDP1,
    plain) every rank is a data-parallel rank.
    """
    fsdp2 = False
    fsdp2_size: int | None = None
    mesh = None
    for module in model.modules():
        if any(base.__name__ == "FSDPModule" for base in type(module).__mro__):
            fsdp2 = True
            fsdp2_size = fsdp2_size or _fsdp2_data_parallel_size(module)
        for param in module._parameters.values():
            if mesh is None and param is not None and hasattr(param, "device_mesh"):
                mesh = param.device_mesh
    if fsdp2_size is not None:
        return fsdp2_size
    if mesh is None:
        return group.size
    if fsdp2:
        return int(mesh.size(0))
    return max(1, group.size // int(mesh.size()))


def _fsdp2_data_parallel_size(module: nn.Module) -> int | None:
    """The ranks an FSDP2 module's data is spread over: its shard mesh dimension's
    size times its replicate dimension's (HSDP: a (replicate, shard) mesh; the first
    dimension alone made ∂ℓ/∂h 2x too large on a (1, 2) mesh).  Read from FSDP2's
    mesh info (private in torch 2.13: None when it is not there)."""
    try:
        info = module._get_fsdp_state()._fsdp_param_group.mesh_info  # type: ignore[operator,union-attr]
    except (AttributeError, TypeError):
        return None
    size = 1
    for attr in ("shard_mesh_size", "replicate_mesh_size"):
        size *= int(getattr(info, attr, 1))
    return size


def sum_over_group(group: ReductionGroup | None, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the group's ranks, on ``tensor``'s device (itself without
    a group): one all-reduce every rank must reach, on a copy."""
    if group is None:
        return tensor
    import torch.distributed as dist

    total = tensor.to(group.device(), copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group.group)
    return total.to(tensor.device)


def mean_over_group(group: ReductionGroup, value: float) -> float:
    """``value`` averaged over the group's ranks (a fill on the group's device, not a
    host-to-device copy of a Python number)."""
    total = sum_over_group(group, torch.full((1,), value, dtype=torch.float64, device=group.device()))
    return float(total[0]) / group.size


def row_nonfinite(row: torch.Tensor) -> bool:
    """Whether a statistics row saw a NaN/inf.  Reads the device: for the error path only."""
    return bool(row[NONFINITE] > 0) or not bool(torch.isfinite(row[MIN]) & torch.isfinite(row[MAX]))


def _sum_part(rows: torch.Tensor) -> torch.Tensor:
    """Rows as quantities that add across ranks: counts, S1 = n·mean,
    S2 = M2 + n·mean² (power sums about 0), histograms; MIN/MAX zeroed."""
    out = rows.clone()
    n, mean = rows[:, MCOUNT], rows[:, MEAN]
    out[:, MEAN] = n * mean
    out[:, M2] = rows[:, M2] + n * mean * mean
    out[:, MIN].zero_()  # a fill on the device (an assigned Python number is a tensor copied there)
    out[:, MAX].zero_()
    return out


def _min_part(rows: torch.Tensor) -> torch.Tensor:
    """(min, −max) per row for a MIN all-reduce: +inf for empty rows, and NaN
    replaced (the NaN flag travels in the sum and restores it)."""
    pair = torch.stack([rows[:, MIN], -rows[:, MAX]], dim=-1)
    pair = torch.nan_to_num(pair, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    return torch.where((rows[:, COUNT] == 0).unsqueeze(-1), torch.full_like(pair, math.inf), pair)


def _rows_back(sums: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Reduced sums and minima back to statistics vectors (M2 = S2 − S1²/n,
    float64, as each rank's own rows were computed)."""
    out = sums.clone()
    n = sums[:, MCOUNT]
    safe = torch.where(n > 0, n, torch.ones_like(n))
    mean = sums[:, MEAN] / safe
    out[:, MEAN] = torch.where(n > 0, mean, torch.zeros_like(n))
    out[:, M2] = torch.where(n > 0, (sums[:, M2] - sums[:, MEAN] * mean).clamp_min(0.0), torch.zeros_like(n))
    empty = sums[:, COUNT] == 0
    nan = sums[:, NANSEEN] > 0
    lo, hi = mins[:, 0], -mins[:, 1]
    zero = torch.zeros_like(lo)
    out[:, MIN] = torch.where(empty, zero, torch.where(nan, torch.full_like(lo, math.nan), lo))
    out[:, MAX] = torch.where(empty, zero, torch.where(nan, torch.full_like(hi, math.nan), hi))
    return out


@dataclass
class PendingReduction:
    """A launched ``Reducer`` reduction (see ``Reducer.launch``)."""

    local: dict[Any, torch.Tensor]  # this rank's rows, on the group's device
    new: list[Hashable]  # keys of ``local`` the group had not agreed on at launch
    has_extra: bool
    n_extra: int
    sums: torch.Tensor  # reduced in place once ``works`` are done
    mins: torch.Tensor
    works: list[Any]  # the asynchronous all-reduces still to wait for
    copy: HostCopy | None  # on a CUDA group: sums then mins, on their way to the host


class Reducer:
    """Merges keyed statistics rows and extra numbers over a group, O(1) in its size.

    Every rank of the group must call ``reduce`` at the same points (it is
    collective); the keys may differ between ranks (a branch taken on one rank
    only): their union is agreed on the first time a rank sees a new key.
    """

    def __init__(self, group: ReductionGroup) -> None:
        self.group = group
        self._keys: list[Hashable] = []
        self._position: dict[Hashable, int] = {}
        self.collectives = 0  # all-reduces and gathers run so far (tests count them)

    def reduce(
        self, rows: dict[Any, torch.Tensor], extra: torch.Tensor | None = None
    ) -> tuple[dict[Any, torch.Tensor], torch.Tensor | None]:
        """Merged rows (host float64) for every key any rank holds, and ``extra``
        (a 1-D tensor) summed over the group (host float64)."""
        return self.finish(self.launch(rows, extra))

    def launch(
        self, rows: dict[Any, torch.Tensor], extra: torch.Tensor | None = None, buffers: HostBuffers | None = None
    ) -> PendingReduction:
        """Start ``reduce``: the all-reduces are issued (asynchronously) and, on a
        CUDA group, their results copied towards the host behind them on the stream
        (``gradscope.host_copy``); nothing is read.  Every rank must ``finish`` it
        before launching the next one (the key layout is agreed there)."""
        device = self.group.device()
        local = {k: v.to(device, torch.float64) for k, v in rows.items()}
        new = [k for k in local if k not in self._position]
        n_extra = 0 if extra is None else extra.numel()
        known = self._stack(local, self._keys, device)
        # The head: whether this rank holds a key not agreed on yet (a fill, not a
        # host-to-device copy), then the caller's numbers.
        flag = torch.full((1,), float(len(new) > 0), dtype=torch.float64, device=device)
        parts = [flag] if extra is None else [flag, extra.reshape(-1).to(device, torch.float64)]
        sums = torch.cat([*parts, _sum_part(known).reshape(-1)])
        mins = _min_part(known).reshape(-1)
        works = [work for work in (self._all_reduce(sums, "sum"), self._all_reduce(mins, "min")) if work is not None]
        copy = None
        if device.type == "cuda":
            # NCCL: wait() makes the current stream wait for the reduction; the host goes on.
            for work in works:
                work.wait()
            works = []
            copy = host_copy.copy_to_host(torch.cat([sums, mins]), buffers if buffers is not None else HostBuffers())
        return PendingReduction(local, new, extra is not None, n_extra, sums, mins, works, copy)

    def finish(self, pending: PendingReduction) -> tuple[dict[Any, torch.Tensor], torch.Tensor | None]:
        """The result of a launched reduction on the host (waits for it if it is
        still running).  When some rank held a new key, the group agrees on the
        new layout here and reduces those rows (more collectives: every rank
        reaches this point together, since the flag was summed)."""
        for work in pending.works:
            work.wait()
        # Every read goes through the host copy: on CUDA it was started at launch;
        # elsewhere it is made now, after the reduction (on the CPU the vector is
        # host memory already and used as is).
        copy = pending.copy or host_copy.copy_to_host(torch.cat([pending.sums, pending.mins]), HostBuffers())
        host = copy.wait()
        sums, mins = host[: pending.sums.numel()], host[pending.sums.numel() :]
        n_extra = pending.n_extra
        out_rows = _rows_back(sums[1 + n_extra :].reshape(-1, SIZE), mins.reshape(-1, 2))
        host_extra = sums[1 : 1 + n_extra].clone() if pending.has_extra else None
        merged_rows = out_rows
        if float(sums[0]) > 0:  # some rank holds a key the group has not agreed on yet
            device = self.group.device()
            added = self._agree(pending.new)
            fresh = self._stack(pending.local, added, device)
            fresh_sums, fresh_mins = _sum_part(fresh).reshape(-1), _min_part(fresh).reshape(-1)
            for work in (self._all_reduce(fresh_sums, "sum"), self._all_reduce(fresh_mins, "min")):
                if work is not None:
                    work.wait()
            fresh_rows = _rows_back(fresh_sums.reshape(-1, SIZE), fresh_mins.reshape(-1, 2))
            merged_rows = torch.cat([out_rows, fresh_rows.cpu()])  # rare: the first flush, a new layer
        result: dict[Any, torch.Tensor] = {}
        for key, row in zip(self._keys, merged_rows.unbind(0), strict=True):
            if key in pending.local or row[COUNT] > 0:
                result[key] = row
        return result, host_extra

    @staticmethod
    def _stack(local: dict[Any, torch.Tensor], keys: list[Hashable], device: torch.device) -> torch.Tensor:
        """Rows of ``keys`` in that order (zeros where this rank has none): one
        indexed copy, not a copy per row."""
        out = torch.zeros(len(keys), SIZE, dtype=torch.float64, device=device)
        at = [(i, local[key]) for i, key in enumerate(keys) if key in local]
        if at:
            index = on_device(tuple(i for i, _ in at), device, torch.int64)
            out[index] = torch.stack([row for _, row in at])
        return out

    def _agree(self, new: list[Hashable]) -> list[Hashable]:
        """Append every rank's new keys (in rank order) to the agreed layout."""
        import torch.distributed as dist

        gathered: list[list[Hashable] | None] = [None] * self.group.size
        dist.all_gather_object(gathered, new, group=self.group.group)
        self.collectives += 1
        added: list[Hashable] = []
        for rank_keys in gathered:
            for key in rank_keys or []:
                if key not in self._position:
                    self._position[key] = len(self._keys)
                    self._keys.append(key)
                    added.append(key)
        return added

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> Any:
        """Issue an all-reduce in place (asynchronously: the returned work is
        waited on by whoever reads ``tensor``); None when there is nothing to reduce."""
        import torch.distributed as dist

        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN
        if not tensor.numel():
            return None
        self.collectives += 1
        return dist.all_reduce(tensor, op=reduce_op, group=self.group.group, async_op=True)


def scale_gradient_rows(rows: dict[Any, torch.Tensor], factor: float) -> None:
    """Divide the ∂ℓ/∂h rows (role "gradient") by ``factor``, in place (see the
    module docstring; the histogram shifts by log2(factor) binades, exactly
    for a power of two)."""
    if factor == 1.0:
        return
    from gradscope.stats import Stats
    from gradscope.watching.scaling import divide_stats

    for key, row in rows.items():
        if isinstance(key, tuple) and len(key) == 2 and key[1] == "gradient":
            rows[key] = divide_stats(Stats(row), factor).vector
