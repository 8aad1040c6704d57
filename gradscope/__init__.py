"""gradscope: per-layer gradient health for PyTorch, with the fix.

``import gradscope`` imports torch lazily and changes nothing else.
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
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradscope' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
