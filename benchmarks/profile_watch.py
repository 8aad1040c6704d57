"""Where a watched training step spends its time: milliseconds per step in each
part of gradscope, next to the unwatched step and the floor.

    python benchmarks/profile_watch.py                    # MLP, every=1, tier full
    python benchmarks/profile_watch.py --model transformer --every 10 --tier light
    python benchmarks/profile_watch.py --ops              # counts, independent of machine load

``--ops`` counts instead of timing: top-level ATen ops per step (from
``torch.profiler``; an op called by another op is not counted again) and
Python function calls per step (``cProfile``), unwatched and watched, and the
ops gradscope adds by name.  On a shared machine the step-time ratio moves by
several percent between runs; these counts do not.

Each part is timed with ``time.perf_counter`` around gradscope's own functions
(on the CPU every op runs synchronously, so the time inside a function is its
cost); nested parts are listed under their parent.  The parts do not add up
to the measured overhead exactly: a hook also slows the model's next kernels
(the hook's work evicts their data from the caches), which only the
step-time ratio of ``benchmarks/overhead.py`` captures.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import WORKLOADS  # noqa: E402

# (label, module path, attribute, nesting level): the functions timed.
PARTS = [
    ("hooks: each tensor's extremes and sample copy", "gradscope.recorder", "Recorder._take", 0),
    ("hooks: non-finite flags (unsampled steps)", "gradscope.watching.nonfinite", "ForwardSentinel.forward", 0),
    ("scope.step", "gradscope.watching.scope", "Scope.step", 0),
    ("gradient norms (every step)", "gradscope.watching.step_norms", "StepNorms.observe", 1),
    ("update ratio: snapshot", "gradscope.watching.update_ratio", "UpdateRatios.take_snapshot", 1),
    ("update ratio: resolve", "gradscope.watching.update_ratio", "UpdateRatios.resolve", 1),
    ("non-finite check (unsampled steps)", "gradscope.watching.nonfinite", "StepCheck.record", 1),
    ("flush", "gradscope.watching.scope", "Scope._flush", 1),
    ("parameter statistics (every 10 steps)", "gradscope.recorder", "Recorder.capture_parameters", 2),
    ("reduce and merge samples (sums, histograms)", "gradscope.recorder", "Recorder._merge_pending", 2),
    ("finalize statistics vectors", "gradscope.recorder", "finalize", 2),
    ("merge into the run aggregate", "gradscope.watching.aggregate", "RunningRecord.merge", 2),
    ("diagnosis (every 10 steps)", "gradscope.watching.scope", "Scope._diagnose", 2),
    ("weights over time (every 10 steps)", "gradscope.watching.weights", "WeightWatch.launch", 2),
]


def _instrument(totals: collections.Counter) -> None:
    import importlib

    for label, module_name, attribute, _level in PARTS:
        module = importlib.import_module(module_name)
        owner: Any = module
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        original: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, _original: Callable[..., Any] = original, _label: str = label, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_label] += time.perf_counter() - start

        setattr(owner, name, timed)


def _top_level_ops(events: Any) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            counts[event.name] += 1
    return counts


def count_ops(run: Callable[[int, Callable[[], None]], Any], before_step: Callable[[], None], steps: int) -> tuple:
    """(ATen ops per step by name, Python function calls per step) over ``steps`` steps."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(steps, before_step)
    ops = _top_level_ops(prof.events())
    profiler = cProfile.Profile()
    profiler.enable()
    run(steps, before_step)
    profiler.disable()
    calls = sum(entry[1] for entry in pstats.Stats(profiler).stats.values())  # type: ignore[attr-defined]
    return ops, calls / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", choices=sorted(WORKLOADS))
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--tier", default="full", choices=["full", "light"])
    parser.add_argument("--steps", type=int, default=40, help="timed steps (after 3 untimed ones)")
    parser.add_argument("--ops", action="store_true", help="count ops and Python calls per step instead of timing")
    args = parser.parse_args(argv)

    import gradscope

    totals: collections.Counter = collections.Counter()
    _instrument(totals)
    torch.manual_seed(0)
    work = WORKLOADS[args.model]()
    opt = torch.optim.SGD(work.model.parameters(), lr=1e-6)
    x, y = work.make_batch()

    def run(steps: int, before_step: Callable[[], None]) -> list[float]:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            work.loss_fn(work.model(x), y).backward()
            before_step()
            opt.step()
            times.append(time.perf_counter() - start)
        return times

    run(3, lambda: None)
    if args.ops:
        steps = max(args.every, 10)  # whole sampling periods
        plain_ops, plain_calls = count_ops(run, lambda: None, steps)
        with gradscope.watch(
            work.model, every=args.every, tier=args.tier, raise_on=(), on_finding=lambda finding: None
        ) as scope:
            run(args.every + 2, lambda: scope.step(opt))
            ops, calls = count_ops(run, lambda: scope.step(opt), steps)
        plain_n, watched_n = sum(plain_ops.values()) / steps, sum(ops.values()) / steps
        print(f"{work.name}, watch(every={args.every}, tier={args.tier!r}), torch {torch.__version__}, {steps} steps")
        print(f"ATen ops per step: unwatched {plain_n:.1f}, watched {watched_n:.1f} (+{watched_n - plain_n:.1f})")
        print(f"Python calls per step: unwatched {plain_calls:.0f}, watched {calls:.0f} (+{calls - plain_calls:.0f})")
        extra = ops.copy()
        extra.subtract(plain_ops)
        print("ops gradscope adds, per step:", ", ".join(f"{k[6:]} {v / steps:.1f}" for k, v in extra.most_common(12)))
        return 0
    plain = statistics.median(run(args.steps, lambda: None))
    with gradscope.watch(
        work.model, every=args.every, tier=args.tier, raise_on=(), on_finding=lambda finding: None
    ) as scope:
        run(3, lambda: scope.step(opt))
        totals.clear()
        watched = statistics.median(run(args.steps, lambda: scope.step(opt)))
    print(
        f"{work.name}, watch(every={args.every}, tier={args.tier!r}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.steps} steps"
    )
    own = sum(totals[label] for label, _module, _attribute, level in PARTS if level == 0) / args.steps
    print(
        f"step (median): unwatched {plain * 1e3:.1f} ms, watched {watched * 1e3:.1f} ms; gradscope's own time "
        f"{own * 1e3:.2f} ms per step = {own / plain:.1%} of the unwatched step (the step-time ratio, which "
        "also counts cache effects on the model's kernels, is overhead.py's)"
    )
    print("gradscope's parts, ms per step:")
    for label, _module, _attribute, level in PARTS:
        print(f"  {'  ' * level}{label:<{50 - 2 * level}s} {totals[label] / args.steps * 1e3:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
