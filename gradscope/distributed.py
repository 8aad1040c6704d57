"""torch.distributed support: merge statistics across ranks, let one rank write.

Activations and ``∂ℓ/∂h`` differ per rank (each sees its own data), so their
statistics are merged across ranks at flush: moments with Chan's formula,
minima/maxima, counts and histograms summed.  Weights and weight gradients
are not merged: under DDP the gradients are all-reduced before the optimizer
sees them, so every rank holds the same numbers and rank 0's copy is the one
the optimizer uses.  (FSDP shards them; see docs/distributed.md.)

Ranks may have recorded different layers (a conditional branch taken on one
rank only), so the ranks first agree on the union of statistic keys with
``all_gather_object`` and then exchange one dense tensor each.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from gradscope.stats import merge_stats

REDUCED_ROLES = frozenset({"activation", "gradient", "input", "model_input"})


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


def collective_device() -> torch.device:
    """Where tensors must live for the default process group's backend."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def merge_across_ranks(keys: Sequence[Hashable], vectors: torch.Tensor) -> tuple[list[Hashable], torch.Tensor]:
    """Merge statistics vectors (``(len(keys), SIZE)``, one row per key) over all ranks.

    Every rank must call this at the same point (it is collective).  Returns
    the union of keys (in rank order of first appearance) and their merged rows.
    """
    import torch.distributed as dist

    size = dist.get_world_size()
    all_keys: list[list[Hashable] | None] = [None] * size
    dist.all_gather_object(all_keys, list(keys))
    union: list[Hashable] = []
    position: dict[Hashable, int] = {}
    for rank_keys in all_keys:
        for key in rank_keys or []:
            if key not in position:
                position[key] = len(union)
                union.append(key)
    device = collective_device()
    aligned = torch.zeros(len(union), vectors.shape[-1], dtype=torch.float64, device=device)
    if len(keys):
        index = torch.tensor([position[k] for k in keys], device=device)
        aligned[index] = vectors.to(device, torch.float64)
    gathered = [torch.empty_like(aligned) for _ in range(size)]
    dist.all_gather(gathered, aligned)
    merged = gathered[0]
    for other in gathered[1:]:
        merged = merge_stats(merged, other)  # an all-zero row is an empty side
    return union, merged
