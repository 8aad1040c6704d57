"""gradscope's exceptions.  Each message is one actionable line."""

from __future__ import annotations

from typing import Any


class GradscopeError(Exception):
    """Base class.  ``record`` carries structured context when there is some
    (for a non-finite value: step, layer, role, dtype, produced or received)."""

    def __init__(self, message: str, record: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.record = record or {}


class InputError(GradscopeError):
    """The user's input cannot be used: a missing file, a wrong shape, a model
    whose forward raises.  The CLI maps it to exit code 2."""
