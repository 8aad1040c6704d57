"""Where a watched training step spends its time: milliseconds per step in each
part of gradscope, next to the unwatched step and the floor.

    python benchmarks/profile_watch.py                    # MLP, every=1, tier full
    python benchmarks/profile_watch.py --model transformer --every 10 --tier light

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
    ("scope.step", "gradscope.watching.scope", "Scope.step", 0),
    ("gradient norms (every step)", "gradscope.watching.step_norms", "StepNorms.observe", 1),
    ("update ratio: snapshot", "gradscope.watching.update_ratio", "UpdateRatios.take_snapshot", 1),
    ("update ratio: resolve", "gradscope.watching.update_ratio", "UpdateRatios.resolve", 1),
    ("flush", "gradscope.watching.scope", "Scope._flush", 1),
    ("parameter statistics (every 10 steps)", "gradscope.recorder", "Recorder.capture_parameters", 2),
    ("reduce and merge samples (sums, histograms)", "gradscope.recorder", "Recorder._merge_pending", 2),
    ("finalize statistics vectors", "gradscope.recorder", "finalize", 2),
    ("merge into the run aggregate", "gradscope.watching.aggregate", "RunningRecord.merge", 2),
    ("diagnosis (every 10 steps)", "gradscope.watching.scope", "Scope._diagnose", 2),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", choices=sorted(WORKLOADS))
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--tier", default="full", choices=["full", "light"])
    parser.add_argument("--steps", type=int, default=40, help="timed steps (after 3 untimed ones)")
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
