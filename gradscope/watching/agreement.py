"""Under torch.distributed, every rank stops at the same step with the same diagnosis.

A NaN that one rank alone sees (its batch, its loss, an activation of its rows)
must not make that rank alone raise inside ``with gradscope.watch(...)``: the
other ranks would then wait for it in their next collective.  So the decision
to stop is taken from numbers every rank holds after a flush's reduction (one
packed all-reduce, ``gradscope.distributed``), never from one rank's own:

* a sampled step: its statistics, losses and global norms are reduced; a
  non-finite value of any rank is non-finite in the sum, so every rank sees it;
* an unsampled step (``every`` > 1): the per-step check
  (``gradscope.watching.nonfinite``) still reads this rank's flag at that step
  and searches this rank's tensors while they are fresh (before
  ``optimizer.step()``), but only *keeps* the record.  Whether a rank holds
  one travels as one more number of the next flush's reduction (the stop
  flag); from there every rank stops at that flush.

Then, on the error path only, the ranks exchange where each found the first
non-finite value (one ``all_gather_object`` of a small dict) and all keep the
earliest, by step and then in the order things happen in a step — weights,
forward, loss, backward — so the rank whose rows produced it names it for all.

Why not stop at the bad step itself with ``every`` > 1: that needs the flag of
every unsampled step summed over the ranks, a collective per step (DDP's own
gradient all-reduce cannot carry it).  Measured with
``benchmarks/distributed_flag.py`` (2 gloo ranks on a shared 2-core machine at
load ~14): a one-element all-reduce takes 0.41-0.47 ms (median, three runs);
on a DDP step of 40-60 ms there (MLP 4 x 256, batch 64, ``every=10``) its
effect was within the noise (ratio 0.97-1.21 over three runs of 7-15
interleaved rounds).  0.4 ms is 2 % of a 20 ms step, so on the short steps
the ``every=10`` budget (<= 1.02x) is measured on it alone would exceed the
budget, and it adds a point where every rank waits for the slowest at every
step.  So with ``every`` > 1 under a group, training stops at the next
sampled step (at most ``every`` - 1 steps later, or at ``close()``), naming
the first bad step and layer any rank recorded; with ``every=1`` every step
is a flush and training stops at the bad step itself, before ``optimizer.step()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradscope.distributed import ReductionGroup

# The order things happen in a training step (gradscope.watching.nonfinite):
# weights exist first, then the forward (its input, then activations in
# execution order), the loss, then the backward (∂ℓ/∂h in reverse order, then
# weight gradients).
ROLE_ORDER = {"weight": 0, "input": 1, "activation": 2, "loss": 3, "gradient": 4, "weight_grad": 5}
BACKWARD_ROLES = ("gradient", "weight_grad")


class Agreement:
    """Which record every rank keeps (only with a reduction group)."""

    def __init__(self, group: ReductionGroup) -> None:
        self.group = group
        self.collectives = 0  # run so far (tests count them)

    def first_record(self, located: dict[str, Any] | None, positions: Mapping[str, int]) -> dict[str, Any] | None:
        """Every rank's record of where the first non-finite value was; the earliest
        of them (by step, then the order of a training step, then rank) on every rank.
        A collective: call it only where every rank does, from reduced numbers.

        ``positions``: layer name -> execution index (the forward order)."""
        import torch.distributed as dist

        gathered: list[dict[str, Any] | None] = [None] * self.group.size
        dist.all_gather_object(gathered, located, group=self.group.group)
        self.collectives += 1
        return earliest(gathered, positions)


def _event_order(record: dict[str, Any], positions: Mapping[str, int]) -> tuple[int, int, int]:
    role = record.get("role")
    index = positions.get(record.get("layer") or "", 1 << 30)
    if role in BACKWARD_ROLES:
        index = -index  # the backward visits layers in reverse order
    return record.get("step", 0), ROLE_ORDER.get(role or "", len(ROLE_ORDER)), index


def first_of(records: list[dict[str, Any] | None], positions: Mapping[str, int]) -> dict[str, Any] | None:
    """The record of the earliest event among ``records`` (None when there is none).
    Of equal events, the first record whose rank held the value in its own rows
    (``record["seen_here"]``, default True): every rank finds a sampled step's
    NaN in the reduced statistics, the rank whose rows it came from is named."""
    found = [
        ((*_event_order(record, positions), not record.get("seen_here", True)), i, record)
        for i, record in enumerate(records)
        if record
    ]
    return min(found, key=lambda item: (item[0], item[1]))[2] if found else None


def earliest(records: list[dict[str, Any] | None], positions: Mapping[str, int]) -> dict[str, Any] | None:
    """The record of the earliest event among the ranks' (None when no rank found one),
    with the rank that saw it (``record["rank"]``).

    Example:
        >>> positions = {"0": 0, "1": 1}
        >>> rank0 = {"step": 3, "role": "gradient", "layer": "1"}
        >>> rank1 = {"step": 3, "role": "activation", "layer": "0"}
        >>> earliest([rank0, rank1], positions)
        {'step': 3, 'role': 'activation', 'layer': '0', 'rank': 1}
        >>> earliest([None, None], positions) is None
        True
    """
    first = first_of(records, positions)
    if first is None:
        return None
    rank = next(i for i, record in enumerate(records) if record is first)
    out = {**first, "rank": rank}
    out.pop("seen_here", None)
    return out
