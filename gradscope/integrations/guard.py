"""Close a watched run when the training loop raises.

Lightning tells its callbacks (``on_exception``); the Hugging Face ``Trainer``
does not: when ``train()`` raises, ``on_train_end`` never runs, so a callback
alone would leave its hooks on the model and never build its report.  The
callback therefore finds the Trainer that holds it (``on_init_end`` runs inside
``Trainer.__init__``) and wraps that instance's ``train`` in try/except, which
closes the scope deterministically, on the way out, before the exception
reaches the caller.
"""

from __future__ import annotations

import functools
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("gradscope")

_OBSERVED = "_gradscope_observed"  # methods wrapped by observe_results, per callback
_GUARDED = "_gradscope_guarded_callbacks"
_SEARCH_FRAMES = 40  # callback -> handler -> Trainer.__init__ is 3 frames; subclasses add a few


def find_owner(callback: Any) -> Any:
    """The object up the call stack whose ``callback_handler`` holds ``callback``
    (the Trainer running the event being handled), or None."""
    frame: types.FrameType | None = sys._getframe(1)
    for _ in range(_SEARCH_FRAMES):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        handler = getattr(owner, "callback_handler", None)
        if any(c is callback for c in getattr(handler, "callbacks", ())):
            return owner
        frame = frame.f_back
    return None


def close_quietly(close: Callable[[], Any], during: BaseException | None = None) -> None:
    """Run ``close``; if it fails while another exception is on its way out, log
    one line instead of replacing the exception the user needs to see."""
    try:
        close()
    except Exception as exc:
        if during is None:
            raise
        logger.warning("gradscope: closing the watched run after %s failed: %s", type(during).__name__, exc)


def close_on_exception(owner: Any, key: Any, close: Callable[[], Any]) -> bool:
    """Wrap ``owner.train`` so that ``close()`` runs when it raises (once per ``key``).

    Returns False when ``owner`` has no ``train`` to wrap.
    """
    train = getattr(owner, "train", None)
    if not callable(train):
        return False
    guarded: set[int] = owner.__dict__.setdefault(_GUARDED, set())
    if id(key) in guarded:
        return True
    guarded.add(id(key))

    @functools.wraps(train)
    def guarded_train(*args: Any, **kwargs: Any) -> Any:
        try:
            return train(*args, **kwargs)
        except BaseException as exc:
            close_quietly(close, during=exc)
            raise

    owner.train = guarded_train
    return True


def observe_results(owner: Any, method: str, key: Any, observe: Callable[[Any], Any]) -> bool:
    """Wrap ``owner.<method>`` (once per ``key``) so that ``observe`` sees each value
    it returns; the value is returned unchanged.  False when there is no such method."""
    original = getattr(owner, method, None)
    if not callable(original):
        return False
    wrapped: set[tuple[str, int]] = owner.__dict__.setdefault(_OBSERVED, set())
    if (method, id(key)) in wrapped:
        return True
    wrapped.add((method, id(key)))

    @functools.wraps(original)
    def observed(*args: Any, **kwargs: Any) -> Any:
        value = original(*args, **kwargs)
        observe(value)
        return value

    setattr(owner, method, observed)
    return True
