"""Peak memory of a training step with and without gradscope, and gradscope's own state.

Each configuration runs in a fresh subprocess (peak RSS only grows within a
process), trains a few steps, and reports its peak resident set size.  The
size of gradscope's host-side state (the merged statistics) is reported per
layer and for two batch sizes, to show it does not depend on the batch.

    python benchmarks/memory.py [--models mlp,cnn,transformer] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _child(model_key: str, monitor: str, steps: int, batch_scale: float) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from models import WORKLOADS

    work = WORKLOADS[model_key]()
    x, y = work.make_batch()
    if batch_scale != 1.0:
        keep = max(1, int(x.shape[0] * batch_scale))
        x, y = x[:keep], y[:keep]
    opt = torch.optim.SGD(work.model.parameters(), lr=1e-6)
    state_bytes = 0
    layers = 0

    def train(before_step) -> None:  # noqa: ANN001
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            work.loss_fn(work.model(x), y).backward()
            before_step()
            opt.step()

    if monitor == "none":
        train(lambda: None)
    else:
        import gradscope

        with gradscope.watch(work.model, every=1, raise_on=()) as scope:
            train(lambda: scope.step(opt))
        record = scope.report.record if not callable(scope.report) else scope.report().record
        state_bytes = record.state_bytes()
        layers = len(record.layers)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": peak_kib / 1024, "state_bytes": state_bytes, "layers": layers}


def _run(model_key: str, monitor: str, steps: int, batch_scale: float = 1.0) -> dict:
    cmd = [sys.executable, __file__, "--child", model_key, monitor, str(steps), str(batch_scale)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,cnn,transformer")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        key, monitor, steps, scale = args.child
        print(json.dumps(_child(key, monitor, int(steps), float(scale))))
        return 0
    print(
        "| model | peak RSS unwatched | peak RSS watch(every=1) | ratio "
        "| gradscope state | per layer | state at 1/4 batch |"
    )
    print("|---|---|---|---|---|---|---|")
    for key in args.models.split(","):
        base = _run(key, "none", args.steps)
        watched = _run(key, "watch", args.steps)
        small = _run(key, "watch", args.steps, 0.25)
        per_layer = watched["state_bytes"] / max(watched["layers"], 1)
        print(
            f"| {key} | {base['peak_mib']:.0f} MiB | {watched['peak_mib']:.0f} MiB | "
            f"{watched['peak_mib'] / base['peak_mib']:.2f}x | {watched['state_bytes'] / 1024:.0f} KiB | "
            f"{per_layer / 1024:.1f} KiB | {small['state_bytes'] / 1024:.0f} KiB |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
