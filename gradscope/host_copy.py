"""A device vector to the host without stalling the device's stream.

A flush packs every statistic into one float64 vector per device.  On CUDA the
vector is copied with ``non_blocking=True`` into a host buffer allocated once
and reused (pinned: a copy from pageable memory is staged synchronously by the
driver), and a CUDA event recorded after the copy says when it has landed
(``event.query()`` asks without blocking).  The host reads the buffer only
then, one flush later (``gradscope.watching.flush``), so the stream is never
drained to read statistics.

On the CPU the packed vector is already in host memory: it is used as is (the
"copy" has landed at once).  Other accelerators copy synchronously (no event
to ask), which is correct, merely not asynchronous.

The other way, host numbers a device computation needs (element counts,
index lists: ``gradscope.device_constants``) go through ``copy_to_device``:
on CUDA a copy from pageable memory first synchronises the stream (CUDA
runtime, "API synchronization behavior": memcpy from pageable host memory),
one from pinned memory does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

HOST_DTYPE = torch.float64


class HostBuffers:
    """One reused host buffer per device, grown by doubling (never shrunk), pinned
    for CUDA.  Only one copy per device may be in flight: whoever holds a
    ``HostCopy`` reads it (``HostCopy.wait``) before the next copy of that device."""

    def __init__(self) -> None:
        self._buffers: dict[torch.device, torch.Tensor] = {}

    def take(self, device: torch.device, numel: int) -> torch.Tensor:
        """The first ``numel`` elements of ``device``'s buffer."""
        buffer = self._buffers.get(device)
        if buffer is None or buffer.numel() < numel:
            size = max(numel, 2 * buffer.numel() if buffer is not None else 1024)
            buffer = torch.empty(size, dtype=HOST_DTYPE, pin_memory=device.type == "cuda")
            self._buffers[device] = buffer
        return buffer.narrow(0, 0, numel)


@dataclass
class HostCopy:
    """A vector on its way to the host: ``values`` are valid once ``ready()``."""

    values: torch.Tensor
    event: Any = None  # a CUDA event recorded after the copy; None: landed already

    def ready(self) -> bool:
        """Whether the copy has landed (never blocks)."""
        return self.event is None or bool(self.event.query())

    def wait(self) -> torch.Tensor:
        """The values on the host, waiting for the copy only if it has not landed.
        A clone: the buffer is reused by the next copy of its device."""
        if self.event is not None and not self.event.query():
            self.event.synchronize()
        return self.values.clone() if self.event is not None or self.values.is_pinned() else self.values


def copy_to_host(vector: torch.Tensor, buffers: HostBuffers) -> HostCopy:
    """Start the copy of a 1-D ``vector`` to the host (see the module docstring).

    Every host read of a flush goes through here (tests count the calls)."""
    device = vector.device
    if device.type == "cpu":
        return HostCopy(vector.to(HOST_DTYPE))  # already host memory (a fresh vector the caller packed)
    if device.type != "cuda":
        return HostCopy(vector.to("cpu", HOST_DTYPE))  # no event to ask: a synchronous copy
    host = buffers.take(device, vector.numel())
    host.copy_(vector.to(HOST_DTYPE), non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return HostCopy(host, event)


def copy_by_device(vectors: list[torch.Tensor], buffers: HostBuffers) -> list[tuple[list[int], HostCopy]]:
    """Start the copy of several 1-D vectors: one packed vector per device (their
    indices in ``vectors`` and its copy), for callers whose pieces may live on
    several devices.  ``buffers`` holds one copy per device in flight.  The packed
    vector is always fresh (``torch.cat`` copies even one piece): on the CPU the
    "copy" is that vector, and a view of a live tensor would change under it."""
    by_device: dict[torch.device, list[int]] = {}
    for i, vector in enumerate(vectors):
        by_device.setdefault(vector.device, []).append(i)
    return [
        (indices, copy_to_host(torch.cat([vectors[i] for i in indices]), buffers)) for indices in by_device.values()
    ]


def copy_to_device(values: Sequence[float | int | bool], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Host numbers as a tensor on ``device`` without stalling its stream: on CUDA
    staged in pinned memory and copied with ``non_blocking=True`` (PyTorch's
    caching host allocator keeps the pinned block until the copy has run, so it
    may be dropped at once); elsewhere an ordinary copy.  With
    ``copy_to_host``, the only way gradscope moves values between host and
    device (``tests/device_traffic.py`` holds it to that)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
