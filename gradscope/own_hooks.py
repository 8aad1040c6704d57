"""Hooks gradscope registers on a user's module: they serve that module, never a copy of it.

``copy.deepcopy(model)`` (an EMA or teacher model) copies each module's hook
dicts, and pickling (``torch.save(model)``) pickles them.  A plain closure is
shared by the deep copy, so the copy's forwards fed the scope (extra call sites
``0#2``, wrong extremes) and kept the recorder alive after ``close()``; a bound
method is deep-copied with its whole object (a second recorder); and a local
closure cannot be pickled at all ("Can't pickle local object").

An ``OwnHook`` is replaced by ``INERT`` in any copy, deep or pickled: the copy
keeps an entry in its hook dict (torch gives a value no way to leave the dict it
is copied with) that does nothing and returns None, so the copy's numbers are
its own.  ``INERT`` is built from the standard library only (``sys.audit`` with
an event name; a no-op unless an audit hook is installed, and it accepts any
arguments), so a checkpoint saved while watched loads where gradscope is not
installed.  Parameter and tensor hooks need none of this: torch neither
deep-copies nor pickles them (``torch.nn.Parameter.__deepcopy__``,
``Tensor.__reduce_ex__``, "Don't serialize hooks").
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

INERT_EVENT = "gradscope.inert_hook"
# What a copied gradscope hook becomes: callable with any arguments, returns None
# (for torch: "leave the input/output unchanged").
INERT: Callable[..., None] = functools.partial(sys.audit, INERT_EVENT)


class InertCopies:
    """Base of gradscope's hook objects: any copy of one, deep or pickled, is ``INERT``.

    Hooks are Python objects with a Python ``__call__`` (not ``functools.partial``
    subclasses, whose C call torch.compile does not trace into) so that Dynamo
    inlines them as it inlined closures.
    """

    __slots__ = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., None]:
        return INERT

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return functools.partial, (sys.audit, INERT_EVENT)


class OwnHook(InertCopies):
    """A module hook that stays with the module it was registered on: ``fn``, called
    with torch's arguments.  It costs one Python call more than ``fn`` alone (0.15-0.3 us,
    timeit on the shared 2-core test machine); the recorder's per-layer hook, which
    runs at every forward of every hooked layer, has its body in its own
    ``__call__`` instead (``recorder._LayerHook``: 0.1-0.2 us over the closure it
    replaced, against several us for the hook's own work on an unsampled step)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)
