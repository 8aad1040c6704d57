"""Step-time overhead of gradscope, as a ratio to the same training step unwatched.

All monitors train the same model, interleaved in rounds (A B C ..., the
order rotated each round), so machine noise hits them alike.  In each round a
monitor is attached, runs 2 untimed steps (its first-use costs, which a long
run amortises), then the timed steps (a multiple of 10, so watch(every=10)
meets exactly one sampled step), and is removed.  Each round yields one paired
ratio per monitor (its step time over the unmonitored steps of the same
round); the script reports the median ratio over rounds and the interquartile
range (a shared 2-core machine has stalls that a min–max range only reports
as noise).  One model, not a copy per monitor: with a copy each,
watch(every=10) once measured 2% *faster* than no monitor on the CNN, an
artifact of the copies' memory placement as large as the targets.

    python benchmarks/overhead.py                  # all models, all monitors
    python benchmarks/overhead.py --models mlp --rounds 15 --markdown out.md
    python benchmarks/overhead.py --monitors none,watch-1 --clock cpu
    python benchmarks/overhead.py --compile                    # the model under torch.compile
    python benchmarks/overhead.py --device cuda                # on a GPU (CUDA events around timed steps)

The process runs with glibc's allocator told to keep freed memory (the
MALLOC_* variables of ``STEADY_MALLOC``, set by re-running itself; PyTorch's
CPU tuning guide recommends jemalloc or tcmalloc for the same reason): with
glibc's defaults, the training step's large tensors are returned to the system
and faulted in again, 0 to 8,000 page faults per MLP step depending on what
was allocated before (measured 2026-12-02 with ``getrusage``), which moved
the unmonitored step by 10-15% between adjacent rounds and buried a 2% target
in noise.  ``--system-malloc`` measures with the defaults.

``--device cuda`` synchronises only around each timed region (a CUDA event pair
per monitor and round); everything inside, gradscope included, runs as in
training.  ``--compile`` runs the model through ``torch.compile`` with the
monitors' hooks traced into the graph (README "Cost": compiled rows).

Monitors:
  none          the training step alone
  floor         a hook that reads every activation and gradient once (a sum), no sync:
                the least any per-layer monitor can cost
  guarantee     the reads of watch's first-bad-step guarantee alone, by hand: an exact
                aminmax per module output and a dot per gradient, every step
  norm          the exact global gradient norm alone (a dot per gradient), every step
  handwritten   per-leaf ``output.std().item()`` forward hook + ``grad.std().item()``
                tensor hook (what people write by hand; one host sync per tensor)
  recorder      gradscope's Recorder every step: full statistics of activations,
                ∂ℓ/∂h, weights and weight gradients, flushed every step
  watch-1       ``gradscope.watch(every=1)`` (training signals included)
  watch-10      ``gradscope.watch(every=10)``
  light-1       ``gradscope.watch(every=1, tier="light")``: layers with parameters only,
                gradient norms on sampled steps only
  light-10      ``gradscope.watch(every=10, tier="light")``
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import WORKLOADS, Workload  # noqa: E402

Monitor = Callable[[nn.Module, torch.optim.Optimizer], contextlib.AbstractContextManager]


def _leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if next(m.children(), None) is None]


class _Hooks:
    """Forward hooks on leaves that call ``on_output`` and ``on_grad`` (tensor hook)."""

    def __init__(self, model: nn.Module, on_output: Callable, on_grad: Callable) -> None:
        self.handles = []

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                on_output(output)
                if output.requires_grad:
                    output.register_hook(on_grad)

        for m in _leaves(model):
            self.handles.append(m.register_forward_hook(hook))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def no_monitor(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], None]]:
    yield lambda: None


@contextlib.contextmanager
def floor_monitor(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], None]]:
    sink: list[torch.Tensor] = []
    hooks = _Hooks(model, lambda t: sink.append(t.detach().sum()), lambda g: sink.append(g.sum()))
    try:
        yield sink.clear
    finally:
        hooks.close()


@contextlib.contextmanager
def guarantee_floor_monitor(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], None]]:
    """The reads the first-bad-step guarantee needs on every step, by hand and
    nothing else: one exact ``aminmax`` per module output (a passive layer whose
    input is the output just read is skipped, as gradscope does) and a BLAS dot
    per parameter gradient (the exact global norm).  What any design that names
    the first non-finite layer and gradient at every step pays on this machine."""
    from gradscope.watching.nonfinite import passes_finite

    sink: list[Any] = []
    last: list[Any] = [None]

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if not (isinstance(output, torch.Tensor) and output.is_floating_point()):
            return
        if not (passes_finite(module) and args and args[0] is last[0]):
            sink.append(torch.aminmax(output.detach()))
        last[0] = output

    handles = [m.register_forward_hook(hook) for m in _leaves(model)]
    params = [p for p in model.parameters() if p.requires_grad]

    def before_step() -> None:
        sink.clear()
        last[0] = None
        sink.append(torch.stack([torch.dot(g, g) for g in (p.grad.reshape(-1) for p in params if p.grad is not None)]))

    try:
        yield before_step
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def norm_monitor(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], None]]:
    """The exact global gradient norm every step and nothing else (a BLAS dot per
    parameter gradient, as ``squared_norms`` takes it on the CPU): the part of the
    guarantee no design can skip, since spikes, AutoClip and a non-finite gradient
    are all read from it.  It reads every gradient once per step, so on a model
    whose step is memory-light (the MLP) it is a fixed share of the step."""
    params = [p for p in model.parameters() if p.requires_grad]
    sink: list[torch.Tensor] = []

    def before_step() -> None:
        sink.clear()
        sink.append(torch.stack([torch.dot(g, g) for g in (p.grad.reshape(-1) for p in params if p.grad is not None)]))

    yield before_step


@contextlib.contextmanager
def handwritten_monitor(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], None]]:
    values: list[float] = []
    hooks = _Hooks(
        model,
        lambda t: values.append(t.detach().std().item()),
        lambda g: values.append(g.std().item()),
    )
    try:
        yield values.clear
    finally:
        hooks.close()


@contextlib.contextmanager
def recorder_monitor(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], None]]:
    from gradscope.recorder import Recorder

    with Recorder(model, sample=65536) as rec:
        rec.start()

        def before_step() -> None:
            rec.capture_parameters()
            rec.flush()
            rec.start()

        yield before_step


def _watch_monitor(every: int, tier: str = "full") -> Monitor:
    @contextlib.contextmanager
    def monitor(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], None]]:
        import gradscope

        # Findings go to a no-op handler: a benchmark measures the monitor, not the console.
        with gradscope.watch(model, every=every, raise_on=(), on_finding=lambda finding: None, tier=tier) as scope:
            yield lambda: scope.step(opt)

    return monitor


MONITORS: dict[str, Monitor] = {
    "none": no_monitor,
    "floor": floor_monitor,
    "guarantee": guarantee_floor_monitor,
    "norm": norm_monitor,
    "handwritten": handwritten_monitor,
    "recorder": recorder_monitor,
    "watch-1": _watch_monitor(1),
    "watch-10": _watch_monitor(10),
    "light-1": _watch_monitor(1, "light"),
    "light-10": _watch_monitor(10, "light"),
}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


WARMUP_STEPS = 2  # untimed steps after attaching: the monitor's first-use costs


_device = torch.device("cpu")


def _time_steps(
    work: Workload,
    run: Callable[..., torch.Tensor],
    opt: torch.optim.Optimizer,
    before_step: Callable[[], None],
    steps: int,
) -> float:
    """Seconds per step over ``steps`` timed steps, after WARMUP_STEPS untimed ones.

    On CUDA the time is read from a pair of events around the timed steps, with
    one synchronisation at their end: what is inside runs as in training.
    """
    x, y = (t.to(_device) for t in work.make_batch())
    start = 0.0
    start_event = end_event = None
    for i in range(WARMUP_STEPS + steps):
        if i == WARMUP_STEPS:
            if _device.type == "cuda":
                torch.cuda.synchronize()
                start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start_event.record()
            start = _clock()
        opt.zero_grad(set_to_none=True)
        loss = work.loss_fn(run(x), y)
        loss.backward()
        before_step()
        opt.step()
    if start_event is not None and end_event is not None:
        end_event.record()
        end_event.synchronize()
        return start_event.elapsed_time(end_event) / 1e3 / steps
    return (_clock() - start) / steps


def measure(
    work: Workload, monitors: list[str], rounds: int, steps: int, compile: bool = False
) -> dict[str, list[float]]:
    """Seconds per step, per monitor and round (index-aligned across monitors)."""
    work.model.to(_device)
    # A tiny learning rate keeps the numbers steady over many steps.
    opt = torch.optim.SGD(work.model.parameters(), lr=1e-6)
    run: Callable[..., torch.Tensor] = work.model
    if compile:
        # Each monitor's hooks (and watch's sampled / unsampled steps) are a graph of
        # their own, compiled once in round 0 and cached: allow that many.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(monitors))
        run = torch.compile(work.model)
    times: dict[str, list[float]] = {m: [] for m in monitors}
    for r in range(rounds + 1):  # round 0 warms up the allocator, every code path and compilation, untimed
        shift = r % len(monitors)
        for name in monitors[shift:] + monitors[:shift]:
            with MONITORS[name](work.model, opt) as before_step:
                elapsed = _time_steps(work, run, opt, before_step, steps)
            if r:
                times[name].append(elapsed)
    return times


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median_interval(values: list[float], level: float = 0.9, resamples: int = 2000) -> tuple[float, float]:
    """A percentile-bootstrap interval for the median of ``values`` (Efron &
    Tibshirani 1993, ch. 13): the rounds resampled with replacement, the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled
    medians.  Seeded, so a table is reproducible from its rounds.  It says how
    well this run pins the median down: on a shared 2-core machine a 2% target
    is only met when the whole interval lies below it."""
    import random

    draw = random.Random(0)
    medians = [statistics.median(draw.choices(values, k=len(values))) for _ in range(resamples)]
    return _quantile(medians, (1 - level) / 2), _quantile(medians, (1 + level) / 2)


def _available(monitors: list[str]) -> list[str]:
    import gradscope

    try:
        gradscope.watch  # noqa: B018
    except AttributeError:
        monitors = [m for m in monitors if not m.startswith("watch")]
    return monitors


# glibc mallopt settings by environment (man 3 mallopt): large blocks from the heap
# rather than mmap (32 MiB is the largest threshold glibc accepts), and the heap
# never trimmed, so a freed activation's pages are reused without a page fault.
STEADY_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
    "MALLOC_TOP_PAD_": str(256 << 20),
}


def _steady_allocator(argv: list[str] | None) -> None:
    """Re-run this script with STEADY_MALLOC set (mallopt reads it at start-up only)."""
    import os

    if argv is not None or "--system-malloc" in sys.argv or platform.system() != "Linux":
        return
    if all(os.environ.get(k) == v for k, v in STEADY_MALLOC.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_MALLOC})


def main(argv: list[str] | None = None) -> int:
    _steady_allocator(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,cnn,transformer")
    parser.add_argument("--monitors", default=",".join(MONITORS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="steps per monitor per round (a multiple of 10)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this Markdown file")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: process CPU time (all threads), steadier on a shared machine",
    )
    parser.add_argument(
        "--system-malloc", action="store_true", help="keep glibc's allocator defaults (see the module docstring)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model trains")
    parser.add_argument(
        "--compile", action="store_true", help="run the model through torch.compile (hooks traced into the graph)"
    )
    args = parser.parse_args(argv)
    global _clock, _device
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "overhead.py: --device cuda needs a CUDA GPU and a CUDA build of torch; none is available here",
            file=sys.stderr,
        )
        return 2
    _device = torch.device(args.device)
    _clock = CLOCKS[args.clock]
    torch.manual_seed(0)
    chosen = [m for m in args.monitors.split(",") if m and m != "none"]
    unknown = [m for m in chosen if m not in MONITORS]
    if unknown:
        parser.error(f"unknown monitor {unknown[0]!r}; choose among {', '.join(MONITORS)}")
    monitors = _available(["none", *chosen])  # every ratio is to "none"
    header = (
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps, {args.clock} clock, "
        f"device {args.device}{', torch.compile' if args.compile else ''}"
        f"{', glibc malloc defaults' if args.system_malloc else ', steady malloc'}"
        f"{' (CUDA events)' if args.device == 'cuda' else ''}; "
        "median paired ratio to no monitor [90% bootstrap interval of that median] (interquartile range)"
    )
    lines = [header, "", "| model | " + " | ".join(monitors[1:]) + " |", "|---" * len(monitors) + "|"]
    for key in args.models.split(","):
        work = WORKLOADS[key]()
        times = measure(work, monitors, args.rounds, args.steps, compile=args.compile)
        base = statistics.median(times["none"])
        cells = []
        for m in monitors[1:]:
            ratios = [t / b for t, b in zip(times[m], times["none"], strict=True)]
            low, high = median_interval(ratios)
            cells.append(
                f"{statistics.median(ratios):.3f}x [{low:.3f}-{high:.3f}] "
                f"({_quantile(ratios, 0.25):.2f}-{_quantile(ratios, 0.75):.2f})"
            )
        lines.append(f"| {work.name} ({base * 1e3:.0f} ms/step) | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print()
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
