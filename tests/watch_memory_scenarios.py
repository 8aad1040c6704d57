"""Memory scenarios of a watched step, each run in a fresh process by
``tests/test_watch_bounded.py`` (a process whose heap an earlier test already grew
would reuse those pages and hide a leak from RSS).

``python tests/watch_memory_scenarios.py SCENARIO`` prints one JSON object: the
RSS growth in MiB over MICRO_BATCHES calls (after a warm-up of WARMUP), and the
counts the test checks.  SCENARIO: accumulation, no_grad, inference_mode,
no_grad_recorded.
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Callable

import torch
from torch import nn

MICRO_BATCHES = 1_500
WARMUP = 100
WIDTH, DEPTH, ROWS = 64, 4, 4


def deep(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers)


def rss_mib() -> float:
    """Resident set size of this process (Linux /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1])
    return resident * 4096 / 2**20


def micro_batch(i: int) -> torch.Tensor:
    return torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(i))


def growth_over(one: Callable[[int], None]) -> float:
    """RSS growth from after WARMUP calls of ``one(i)`` to after MICRO_BATCHES more."""
    for i in range(WARMUP):
        one(i)
    gc.collect()
    start = rss_mib()
    for i in range(WARMUP, WARMUP + MICRO_BATCHES):
        one(i)
    gc.collect()
    return rss_mib() - start


def run(scenario: str) -> dict[str, object]:
    from gradscope.watching import Scope

    torch.set_num_threads(1)
    model = deep()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    first_layer: list[torch.Tensor] = []  # the truth, computed without calling the hooked module

    def truth(x: torch.Tensor) -> None:
        with torch.no_grad():
            first_layer.append(nn.functional.linear(x, model[0].weight, model[0].bias).double())

    def accumulate(i: int) -> None:
        x = micro_batch(i)
        truth(x)
        (model(x).pow(2).mean() / (WARMUP + MICRO_BATCHES)).backward()

    def evaluate(i: int) -> None:
        x = micro_batch(i)
        context = torch.inference_mode if scenario == "inference_mode" else torch.no_grad
        with context():
            model(x)
        if scenario == "no_grad_recorded":
            truth(x)

    recorded = scenario == "no_grad_recorded"
    with Scope(model, every=1, raise_on=(), diagnose=False, record_no_grad=recorded) as scope:
        if scenario == "accumulation":
            growth = growth_over(accumulate)
        else:
            x = micro_batch(-1)
            model(x).pow(2).mean().backward()  # the step's training forward, then an evaluation loop
            truth(x)
            growth = growth_over(evaluate)
        pending = scope._recorder.pending_count()
        scope.step(opt)
        opt.step()
    record = scope.report().record
    activation = record.layer("0").activation
    expected = torch.cat(first_layer)
    return {
        "growth_mib": growth,
        "pending_at_step": pending,
        "layers": [layer.name for layer in record.layers],
        "count": activation.count,
        "mean": activation.mean,
        "std": activation.std,
        "max": activation.max,
        "input_count": record.input.count if record.input is not None else None,
        "truth_count": expected.numel(),
        "truth_mean": float(expected.mean()),
        "truth_std": float(expected.std(unbiased=False)),
        "truth_max": float(expected.max()),
    }


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1])))
