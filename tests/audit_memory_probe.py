"""Peak memory of one plain forward+backward and of ``gradscope.audit`` of a deep MLP.

Run as a script in a fresh process (``tests/test_audit_memory.py`` does):

    python tests/audit_memory_probe.py

It prints one JSON line: for each, the step's peak resident memory above the
model and the batch, what it left resident (bytes), and the sizes the test's
bounds are made of.  How the peak
is read is ``benchmarks/memory.py --audit``'s: glibc's malloc pinned to mmap
every block above 64 KiB and return it at free, then the kernel's peak-RSS mark
reset before each step (so both can run in one process).  Both first run once on a
tiny model, so that one-time costs of the process (imports, first use of each
kernel: about 8 MiB for the plain step and 16 MiB for the audit on this
machine) are not counted as the step's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json

WIDTH, DEPTH, BATCH = 1024, 16, 512
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def pin_malloc() -> bool:
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024))


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def main() -> dict:
    pinned = pin_malloc()
    import torch
    from torch import nn

    import gradscope
    import gradscope.diagnose  # noqa: F401  (imported before the baseline, not during the step)

    torch.set_num_threads(1)

    def plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        nn.functional.cross_entropy(model(x), y).backward()
        for param in model.parameters():
            param.grad = None

    def audit(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        # The recording alone: this default-init stack gets a poor-init finding, whose
        # fix the audit otherwise tries on a copy of the model (measured below).
        gradscope.audit(model, x, check_fixes=False)

    def audit_with_fix_trial(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        report = gradscope.audit(model, x)
        assert report.analysis["init_fix_check"]["checked"], report.analysis.get("init_fix_check")

    tiny = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10))
    for step in (plain, audit):
        step(tiny, torch.randn(4, 8), torch.randint(0, 10, (4,)))
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(WIDTH, 10))
    x = torch.randn(BATCH, WIDTH)
    y = torch.randint(0, 10, (BATCH,))
    activation = BATCH * WIDTH * 4
    out: dict = {
        "pinned": pinned,
        "largest_activation_bytes": activation,
        # each ReLU's output, saved by it and by the next Linear: one per block
        "saved_activation_bytes": DEPTH * activation,
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    for step in (plain, audit, audit_with_fix_trial):
        gc.collect()
        reset_peak()
        base = status_bytes("VmRSS")
        step(model, x, y)
        peak = status_bytes("VmHWM")
        gc.collect()
        out[step.__name__] = {"step_bytes": peak - base, "after_bytes": status_bytes("VmRSS") - base}
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
