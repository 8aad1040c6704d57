"""Cost of the per-step stop flag under torch.distributed (``gradscope.watching.agreement``).

With a reduction group and ``every`` > 1, each unsampled step sums the per-step
non-finite flag over the ranks with a one-element all-reduce, so that every
rank stops at the same step.  This measures, on 2 gloo ranks on this machine:

* the latency of a one-element float32 all-reduce (median over many);
* the step time of DDP training watched with ``every=10``, with the flag's
  all-reduce and without it (``reduce_flag`` unset: each rank's own flag,
  the behaviour before), interleaved in rounds; the ratio of the medians.

    python benchmarks/distributed_flag.py                # defaults
    python benchmarks/distributed_flag.py --rounds 9 --width 512
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _latency(repeats: int) -> float:
    flag = torch.zeros(1)
    for _ in range(50):
        dist.all_reduce(flag)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dist.all_reduce(flag)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _steps(model: nn.Module, ddp: nn.Module, rank: int, width: int, batch: int, steps: int, flag: bool) -> float:
    import gradscope

    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(rank)
    data = [torch.randn(batch, width, generator=generator) for _ in range(4)]
    with gradscope.watch(model, every=10, raise_on=(), on_finding=lambda f: None) as scope:
        if not flag:
            scope._check.reduce_flag = None  # each rank's own flag, no collective
        for step in range(2):  # untimed: first-use costs
            opt.zero_grad()
            ddp(data[step % 4]).pow(2).mean().backward()
            scope.step(opt)
            opt.step()
        dist.barrier()
        start = time.perf_counter()
        for step in range(steps):
            opt.zero_grad()
            loss = ddp(data[step % 4]).pow(2).mean()
            loss.backward()
            scope.step(opt, loss=loss)
            opt.step()
        elapsed = time.perf_counter() - start
    return elapsed / steps


def _worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    logging.getLogger("gradscope").setLevel(logging.CRITICAL)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(args.depth):
        layers += [nn.Linear(args.width, args.width), nn.ReLU()]
    model = nn.Sequential(*layers)
    ddp = nn.parallel.DistributedDataParallel(model)
    result = {"latency_s": _latency(args.repeats), "with": [], "without": []}
    for round_ in range(args.rounds):
        order = [True, False] if round_ % 2 == 0 else [False, True]
        for flag in order:
            step = _steps(model, ddp, rank, args.width, args.batch, args.steps, flag)
            result["with" if flag else "without"].append(step)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run (a multiple of 10)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2000, help="all-reduces timed for the latency")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp, "result.json"))
        mp.start_processes(_worker, args=(_free_port(), args, out), nprocs=2, start_method="spawn")
        result = json.loads(Path(out).read_text())
    with_flag = statistics.median(result["with"])
    without = statistics.median(result["without"])
    print(f"one-element all-reduce, gloo, 2 ranks: median {result['latency_s'] * 1e6:.0f} µs")
    print(
        f"DDP step, MLP {args.depth} x {args.width}, batch {args.batch}, watch(every=10): "
        f"{without * 1e3:.2f} ms without the flag's all-reduce, {with_flag * 1e3:.2f} ms with it "
        f"(ratio {with_flag / without:.3f}, median of {args.rounds} interleaved rounds)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
