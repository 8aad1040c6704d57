"""Peak memory of a training step with and without gradscope, and gradscope's own state.

Each configuration runs in a fresh subprocess (peak RSS only grows within a
process), trains a few steps, and reports its peak resident set size.  The
size of gradscope's host-side state (the merged statistics) is reported per
layer and for two batch sizes, to show it does not depend on the batch.

    python benchmarks/memory.py [--models mlp,cnn,transformer] [--steps 5]

``--audit``: the peak memory of ``gradscope.audit`` against one plain
forward+backward of the same model and batch (a ResNet-50 and GPT-2 124M by
default, see ``models.py``), each in a fresh subprocess:

    python benchmarks/memory.py --audit [--large resnet50:32,gpt2:8]

How the peak is read (Linux): glibc's malloc is pinned to serve every block
above 64 KiB by its own mmap and to return it at free (its default raises that
threshold as blocks are freed, so freed tensors would stay resident and the
peak would depend on the order of allocations); once the model and the batch
are built, the kernel's high-water mark is reset (``/proc/self/clear_refs``),
so the peak is that of the step itself, above the model and the batch.
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


_MMAP_THRESHOLD = 64 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def _pin_malloc() -> None:
    """Serve large blocks by mmap and give them back at free (see the module docstring)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _MMAP_THRESHOLD)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


def _audit_child(model_key: str, batch: int, mode: str) -> dict:
    import gc
    import time

    _pin_malloc()
    import torch

    sys.path.insert(0, str(HERE))
    from models import LARGE_WORKLOADS

    # imported before the baseline: their modules are not the step's memory
    import gradscope
    import gradscope.diagnose  # noqa: F401

    torch.manual_seed(0)
    work = LARGE_WORKLOADS[model_key](batch)
    x, y = work.make_batch()
    gc.collect()
    exact = _reset_peak()
    base_kib = _status_kib("VmRSS") or 0
    start = time.perf_counter()
    if mode == "plain":
        work.loss_fn(work.model(x), y).backward()
        findings = None
    else:
        report = gradscope.audit(work.model, x)
        findings = len(report.findings)
    seconds = time.perf_counter() - start
    peak_kib = _status_kib("VmHWM") if exact else None
    if peak_kib is None:  # no /proc: the process's peak, model construction included
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "model": work.name,
        "base_mib": base_kib / 1024,
        "peak_mib": peak_kib / 1024,
        "step_mib": (peak_kib - base_kib) / 1024,
        "seconds": seconds,
        "findings": findings,
        "exact": exact,
    }


def _audit_run(model_key: str, batch: int, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--audit-child", model_key, str(batch), mode]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def audit_table(specs: str) -> None:
    print(
        "| model | plain forward+backward: peak / above model+batch "
        "| `gradscope.audit`: peak / above model+batch | ratio |"
    )
    print("|---|---|---|---|")
    for spec in specs.split(","):
        key, _, batch_text = spec.partition(":")
        batch = int(batch_text) if batch_text else 8
        plain = _audit_run(key, batch, "plain")
        audited = _audit_run(key, batch, "audit")
        print(
            f"| {plain['model']} | {plain['peak_mib']:.0f} MiB / {plain['step_mib']:.0f} MiB "
            f"| {audited['peak_mib']:.0f} MiB / {audited['step_mib']:.0f} MiB "
            f"| {audited['step_mib'] / plain['step_mib']:.2f}x |",
            flush=True,
        )
        print(
            f"<!-- {key}: plain {plain['seconds']:.0f} s, audit {audited['seconds']:.0f} s, "
            f"model+batch {plain['base_mib']:.0f} MiB -->",
            flush=True,
        )


def _run(model_key: str, monitor: str, steps: int, batch_scale: float = 1.0) -> dict:
    cmd = [sys.executable, __file__, "--child", model_key, monitor, str(steps), str(batch_scale)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,cnn,transformer")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--audit", action="store_true", help="audit vs plain forward+backward peak memory")
    parser.add_argument("--large", default="resnet50:32,gpt2:8", help="model:batch pairs for --audit")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--audit-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.audit_child:
        key, batch, mode = args.audit_child
        print(json.dumps(_audit_child(key, int(batch), mode)))
        return 0
    if args.audit:
        audit_table(args.large)
        return 0
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
