"""Watching a training run: ``gradscope.watch(model, every=N)`` returns a ``Scope``.

The package is called ``watching`` (not ``watch``) so that importing it never
shadows the ``gradscope.watch`` function on the ``gradscope`` package.
"""

from gradscope.watching.scope import FlushResult, Scope, watch

__all__ = ["FlushResult", "Scope", "watch"]
