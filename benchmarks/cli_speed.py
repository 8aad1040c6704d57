"""How fast the ``gradscope`` command is where people wait.

Prints:
* the wall time of ``gradscope --help`` and ``gradscope audit --help``
  (median of 5 fresh processes; target < 0.5 s: torch is imported lazily);
* the wall time of ``gradscope audit`` on a ResNet-50-style CNN (bottleneck
  blocks [3, 4, 6, 3], about 25.6M parameters, He et al. 2016) at batch 8,
  224x224 inputs, as a fresh process (torch import included) and the
  in-process audit alone (target < 10 s on 2 CPU cores).

Run: ``python benchmarks/cli_speed.py [--threads 2] [--batch 8]``.  The
factory ``resnet50`` below is what the audited command loads
(``benchmarks/cli_speed.py:resnet50``).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def resnet50(num_classes: int = 1000):  # noqa: ANN201 - torch is imported lazily
    """A ResNet-50-style network: 7x7 stem, bottleneck stages [3, 4, 6, 3], in-place ReLU."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int) -> None:
            super().__init__()
            cout = width * 4
            self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)  # called three times per block, like torchvision's
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + (x if self.down is None else self.down(x)))

    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    torch.manual_seed(0)
    return nn.Sequential(*layers)


def _wall(cmd: list[str], env: dict[str, str]) -> float:
    return _timed(cmd, env)[0]


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+sys) of a fresh process.  CPU time is what a
    shared machine distorts least: on an idle 2-core machine wall >= CPU / 2."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the issue's target is 2 cores)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per --help timing")
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    gradscope = [sys.executable, "-m", "gradscope"]
    for label, extra in (("gradscope --help", ["--help"]), ("gradscope audit --help", ["audit", "--help"])):
        times = [_wall(gradscope + extra, env) for _ in range(args.repeats)]
        print(f"{label:<28} median {statistics.median(times):.3f} s  (min {min(times):.3f}, n={len(times)})")

    shape = f"{args.batch},3,224,224"
    cmd = gradscope + [
        "audit",
        f"{HERE}:resnet50",
        "--input-shape",
        shape,
        "--format",
        "json",
        "--output",
        os.devnull,
        "--fail-on",
        "never",
    ]
    total, total_cpu = _timed(cmd, env)

    import torch

    from gradscope.loaders import audit_loaded, load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(f"{HERE}:resnet50")
    params = sum(p.numel() for p in loaded.module.parameters())
    start, cpu = time.perf_counter(), time.process_time()
    report = audit_loaded(loaded, input_shape=(args.batch, 3, 224, 224))
    in_process, in_process_cpu = time.perf_counter() - start, time.process_time() - cpu
    x = torch.randn(args.batch, 3, 224, 224)
    start, cpu = time.perf_counter(), time.process_time()
    loaded.module(x).sum().backward()  # the same forward+backward with no gradscope, for scale
    plain, plain_cpu = time.perf_counter() - start, time.process_time() - cpu
    print(
        f"ResNet-50-style CNN: {params / 1e6:.1f}M parameters, {len(report.layers)} recorded call sites, "
        f"batch {args.batch}, 224x224, {args.threads} threads"
    )
    print(f"  gradscope audit (fresh process, torch import included): {total:.2f} s wall, {total_cpu:.2f} s CPU")
    print(
        f"  audit_loaded in process (forward+backward+statistics+diagnosis): {in_process:.2f} s wall, "
        f"{in_process_cpu:.2f} s CPU"
    )
    print(f"  plain forward+backward without gradscope: {plain:.2f} s wall, {plain_cpu:.2f} s CPU")
    print(f"  load average while running: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
