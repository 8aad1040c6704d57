"""gradscope: per-layer gradient health for PyTorch, with the fix.

``import gradscope`` imports torch lazily and changes nothing else: the names
below and the public submodules (``gradscope.render``, ``gradscope.fix``, …) are
imported on first use, so ``gradscope.render.render(report)`` works right after
``import gradscope``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "GradscopeError",
    "InputError",
    "Recorder",
    "Report",
    "Finding",
    "Fix",
    "Severity",
    "Stats",
    "audit",
    "tensor_stats",
    "watch",
    "__version__",
]

_EXPORTS = {
    "GradscopeError": "gradscope.errors",
    "InputError": "gradscope.errors",
    "Recorder": "gradscope.recorder",
    "Report": "gradscope.report",
    "Finding": "gradscope.report",
    "Fix": "gradscope.report",
    "Severity": "gradscope.report",
    "Stats": "gradscope.stats",
    "tensor_stats": "gradscope.stats",
    "audit": "gradscope.auditing",
    "watch": "gradscope.watching",
}

# Submodules reachable as attributes right after ``import gradscope`` (the README
# uses ``gradscope.render.render`` and ``gradscope.fix.apply_init``).
_SUBMODULES = frozenset(
    {
        "advice",
        "diagnose",
        "distributed",
        "errors",
        "fix",
        "integrations",
        "recorder",
        "render",
        "report",
        "stats",
        "tensorboard",
        "training",
        "watching",
    }
)

if TYPE_CHECKING:
    from gradscope.auditing import audit
    from gradscope.errors import GradscopeError, InputError
    from gradscope.recorder import Recorder
    from gradscope.report import Finding, Fix, Report, Severity
    from gradscope.stats import Stats, tensor_stats
    from gradscope.watching import watch


def __getattr__(name: str) -> Any:
    # Lazy: `gradscope --help` must not pay for importing torch.
    if name == "__version__":
        from gradscope.version import version

        return version()
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"gradscope.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradscope' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
