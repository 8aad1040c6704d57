"""Watching a training run: ``gradscope.watch(model, every=N)`` returns a ``Scope``.

The package is called ``watching`` (not ``watch``) so that importing it never
shadows the ``gradscope.watch`` function on the ``gradscope`` package.

Its names are imported on first use (PEP 562), so that importing one of its
small modules (``gradscope.watching.flush_result`` from ``gradscope.tensorboard``)
does not import the Scope, which imports the TensorBoard writer: no import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradscope.watching.factory import watch
    from gradscope.watching.flush_result import FlushResult
    from gradscope.watching.scope import Scope

__all__ = ["FlushResult", "Scope", "watch"]

_HOMES = {
    "FlushResult": "gradscope.watching.flush_result",
    "Scope": "gradscope.watching.scope",
    "watch": "gradscope.watching.factory",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'gradscope.watching' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
