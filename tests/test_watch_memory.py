"""Bounded memory over any run length: 10,000 watched steps hold no more Python
objects or memory at the end than after the first 2,000, and nothing stays
attached after close."""

from __future__ import annotations

import gc
import sys
import time

import torch
from torch import nn

from gradscope.watching import Scope

STEPS = 10_000
WARMUP = 2_000


def test_memory_flat_over_10000_steps() -> None:
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x, y = torch.randn(4, 4), torch.randn(4, 2)
        measured: dict[int, tuple[int, int]] = {}
        start = time.perf_counter()
        with Scope(model, every=10, raise_on=()) as scope:
            for step in range(1, STEPS + 1):
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                scope.step(opt, loss=loss)
                opt.step()
                if step in (WARMUP, STEPS):
                    gc.collect()
                    measured[step] = (len(gc.get_objects()), sys.getallocatedblocks())
            assert len(scope.recent) == scope.recent.maxlen  # the ring is full, not growing
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(old_threads)
    objects_growth = measured[STEPS][0] - measured[WARMUP][0]
    blocks_growth = measured[STEPS][1] - measured[WARMUP][1]
    print(
        f"{STEPS} steps in {elapsed:.1f}s; growth from step {WARMUP}: {objects_growth} objects, "
        f"{blocks_growth} allocated blocks"
    )
    # 800 flushes happen in between: any per-flush leak of even one object would show as >= 800.
    assert objects_growth < 200
    assert blocks_growth < 2000
    report = scope.report()
    assert report.analysis["training"]["steps"] == STEPS
    assert report.analysis["training"]["sampled_steps"] == STEPS // 10
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not opt._optimizer_step_post_hooks
