"""The exception guard the Hugging Face callback installs on its Trainer: found
from the call stack, closes once per raise, never replaces the user's exception."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from gradscope.integrations.guard import close_on_exception, find_owner


class Owner:
    """A stand-in for a Trainer: holds callbacks, and a train() that may raise."""

    def __init__(self, callback: object, error: BaseException | None) -> None:
        self.callback_handler = SimpleNamespace(callbacks=[callback])
        self.error = error
        self.found: object = None

    def train(self) -> str:
        self.found = find_owner(self.callback_handler.callbacks[0])  # as an event handler would
        if self.error is not None:
            raise self.error
        return "trained"


def test_owner_is_found_and_close_runs_only_when_train_raises() -> None:
    closed: list[str] = []
    callback = object()
    owner = Owner(callback, error=None)
    assert close_on_exception(owner, callback, lambda: closed.append("closed"))
    assert close_on_exception(owner, callback, lambda: closed.append("twice"))  # guarded once per callback
    assert owner.train() == "trained" and closed == []
    assert owner.found is owner
    owner.error = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        owner.train()
    assert closed == ["closed"]


def test_a_failing_close_does_not_replace_the_training_error(caplog: pytest.LogCaptureFixture) -> None:
    callback = object()
    owner = Owner(callback, error=ValueError("the user's own error"))

    def broken_close() -> None:
        raise OSError("disk full")

    close_on_exception(owner, callback, broken_close)
    with caplog.at_level(logging.WARNING, logger="gradscope"), pytest.raises(ValueError, match="the user's own"):
        owner.train()
    assert any("disk full" in r.getMessage() and "ValueError" in r.getMessage() for r in caplog.records)


def test_no_owner_without_a_holder_on_the_stack() -> None:
    assert find_owner(object()) is None
    assert close_on_exception(SimpleNamespace(), object(), lambda: None) is False
