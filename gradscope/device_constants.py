"""Small host-known tensors (indices, masks, counts) on a device, copied there
once per distinct value.

Why: ``torch.tensor(values, device="cuda")`` copies from pageable host memory,
a copy that synchronises the host with the stream; built every step (a
presence mask under torch.distributed) or every flush, it would drain the GPU
as surely as reading a value back.  The values these callers need change
rarely (which parameters hold a gradient, which weights are measured), so the
device copy is made once and reused; the cache is bounded.  A new value (a
statistics layout with a new sequence length, under dynamic padding) is copied
through pinned memory without blocking (``host_copy.copy_to_device``).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from gradscope import host_copy


@lru_cache(maxsize=256)
def on_device(values: tuple[float | int | bool, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)``, made once per
    (values, device, dtype).  Read-only: callers must not write into it."""
    # A miss (a new layout: with dynamic padding, every new sequence length) must
    # not stall the stream either: pinned memory and a non-blocking copy.
    return host_copy.copy_to_device(values, device, dtype)
