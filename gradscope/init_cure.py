"""Does an init finding's fix cure what the finding measured?

A ``poor-init`` finding predicts from the weights (He et al. 2015's gain
``n_in·Var[w]·factor``) that re-initialising the named layers brings the
measured signal back into the healthy band.  The prediction is a model, and
models have blind spots: a squeeze-excitation gate (``sigmoid(W2 relu(W1
pool(x)))``, Hu et al. 2018) puts out at least ``sigmoid(0)^2 = 1/4`` of second
moment whatever its weights, so the "gain" measured into it from a small pooled
input is the input's smallness, and no init moves it (RegNet in eval mode: 2e3
measured, the advised Kaiming re-init left it at 2e3).

So, at audit time, the fix is tried: the advised snippet runs on a
``copy.deepcopy`` of the model, the same audit runs on the copy (same inputs,
same seed), and the finding's own measurement is read again.  A finding whose
fix does not move its measurement at least half-way (in decades) toward the
healthy band is withdrawn, and ``report.analysis["init_fix_check"]`` says so
with both numbers.  Models whose copy would not fit in memory keep the
weight-based rule unchecked (the analysis says which).
"""

from __future__ import annotations

import contextvars
import copy
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradscope.diagnose import thresholds as th

if TYPE_CHECKING:
    from gradscope.report import Finding, Report

# Room for the copy, its gradients and the audit's activations beside the original:
# the copy of the parameters and buffers times this must fit in the free memory.
COPY_MEMORY_FACTOR = 4
# A fix cures when it takes the measurement at least this fraction of the way
# (in decades) back to the healthy band: a re-init that closes less than half of
# the distance leaves the signal where the finding said it was.
CURE_FRACTION = 0.5

# Set while a fix is being tried: a snippet that audits again (``apply_init(model,
# "auto")`` audits to find its targets) must not try its own findings' fixes,
# which would try theirs, without end.
_TRYING_FIXES: contextvars.ContextVar[bool] = contextvars.ContextVar("gradscope_trying_fixes", default=False)


def stack_gain(report: Report, names: list[str]) -> float | None:
    """The measured end-to-end gain across the named init rows (the product of their
    measured gains, which telescopes along a chained run: ``gradscope.diagnose.init``)."""
    rows = {r["name"]: r for r in report.analysis.get("init") or []}
    gains = [rows[n]["measured_gain"] if n in rows else None for n in names]
    if not gains or any(g is None or not math.isfinite(g) or g <= 0 for g in gains):
        return None
    return math.prod(gains)  # type: ignore[arg-type]


def band_distance(gain: float, low: float = th.INIT_STACK_LOW, high: float = th.INIT_STACK_HIGH) -> float:
    """Decades between ``gain`` and the band ``[low, high]`` (0 inside it)."""
    return max(0.0, math.log10(gain / high), math.log10(low / gain))


def cures(before: float, after: float | None) -> bool:
    """Whether the measurement moved at least ``CURE_FRACTION`` of its distance to the band."""
    if after is None:
        return False
    return band_distance(after) <= (1 - CURE_FRACTION) * band_distance(before)


def _memory_free(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def copy_fits(model: nn.Module, device: torch.device) -> bool:
    """Whether a deep copy of the model (and an audit of it) fits in the device's free memory."""
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    free = _memory_free(device)
    return free is not None and COPY_MEMORY_FACTOR * size < free


def _checkable(finding: Finding) -> bool:
    return finding.code == "poor-init" and finding.fix is not None and bool(finding.evidence.get("stack_layers"))


def check_init_fixes(
    report: Report, model: nn.Module, device: torch.device, reaudit: Callable[[nn.Module], Report]
) -> None:
    """Try each stack ``poor-init`` fix on a copy; withdraw the findings it does not cure."""
    findings = [f for f in report.findings if _checkable(f)]
    if not findings or _TRYING_FIXES.get():
        return
    if not copy_fits(model, device):
        report.analysis["init_fix_check"] = {"checked": False, "reason": "a copy of the model does not fit in memory"}
        return
    checked: list[dict[str, Any]] = []
    withdrawn: list[Finding] = []
    for finding in findings:
        names = list(finding.evidence["stack_layers"])
        before = finding.evidence["measured_gain_end_to_end"]
        token = _TRYING_FIXES.set(True)
        try:
            after = _measure_after_fix(finding, model, reaudit, names)
        finally:
            _TRYING_FIXES.reset(token)
        cured = after is not None and cures(before, after)
        finding.evidence["measured_gain_after_fix"] = after
        checked.append({"layers": finding.layers, "measured_gain": before, "after_fix": after, "cures": cured})
        if after is not None and not cured:
            withdrawn.append(finding)
    report.findings = [f for f in report.findings if all(f is not w for w in withdrawn)]
    withdrawn_layers = {n for f in withdrawn for n in f.layers}
    for row in report.analysis.get("init") or []:
        if row["name"] in withdrawn_layers and row.get("flag") == "poor-init":
            row["flag"] = None
    report.analysis["init_fix_check"] = {"checked": True, "findings": checked}


def _measure_after_fix(
    finding: Finding, model: nn.Module, reaudit: Callable[[nn.Module], Report], names: list[str]
) -> float | None:
    """The finding's measurement on a copy of the model with its fix applied; None when
    the fix's snippet does not run on the copy (then the finding stays, unchecked)."""
    assert finding.fix is not None
    patient = copy.deepcopy(model)
    _drop_call_hooks(patient)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            # The snippet is gradscope's own (``diagnose.init.init_fix``): init calls on ``model``.
            exec(finding.fix.code, {"model": patient, "nn": nn, "torch": torch})  # noqa: S102
        return stack_gain(reaudit(patient), names)
    except Exception:  # noqa: BLE001  (an unchecked finding is kept as the weights predict it)
        return None
    finally:
        del patient


# The call hooks a module instance holds (torch.nn.Module's own attributes).
_CALL_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _drop_call_hooks(copied: nn.Module) -> None:
    """Remove the hooks ``deepcopy`` carried over to the copy: the user's (a logger,
    ``wandb.watch``, a debugging hook) would see the fix's trial as a real call of
    their model.  Only the copy's own dictionaries are cleared; the model keeps its."""
    for module in copied.modules():
        for attribute in _CALL_HOOKS:
            hooks = getattr(module, attribute, None)
            if isinstance(hooks, dict):
                hooks.clear()
