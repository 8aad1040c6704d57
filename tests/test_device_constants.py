"""Host-known small tensors are copied to their device once per value
(gradscope.device_constants): a per-step ``torch.tensor(..., device="cuda")``
would be a synchronising copy from pageable memory."""

from __future__ import annotations

import torch

from gradscope.device_constants import on_device


def test_the_same_values_give_the_same_device_tensor() -> None:
    first = on_device((True, False, True), torch.device("cpu"), torch.bool)
    again = on_device((True, False, True), torch.device("cpu"), torch.bool)
    assert again is first  # made once, not per call
    assert first.tolist() == [True, False, True] and first.dtype == torch.bool
    other = on_device((True, False, True), torch.device("cpu"), torch.float32)
    assert other is not first and other.tolist() == [1.0, 0.0, 1.0]
    index = on_device((0, 2), torch.device("cpu"), torch.int64)
    out = torch.zeros(3).index_copy_(0, index, torch.tensor([5.0, 7.0]))
    assert out.tolist() == [5.0, 0.0, 7.0]
