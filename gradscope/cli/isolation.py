"""Keeping model code (and torch) inside the CLI's contract while it runs.

* ``stdout_to_stderr``: file descriptor 1 points at stderr while user code runs
  (``os.dup2``), so ``print``, ``os.write(1, ...)``, ``sys.__stdout__`` and child
  processes all land on stderr; the real stdout comes back for the report.
* ``torch_logs_captured``: records of torch's loggers (a damaged ``.pt2`` logs a
  whole traceback) are kept in memory instead of printed; ``--debug`` leaves
  logging alone, so they show there.
* ``signals_to_exceptions``: SIGINT and SIGTERM raise ``Interrupted`` (a
  ``KeyboardInterrupt``) and are remembered, so a command stops with 128 + the
  signal number even when model code catches the exception.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterator
from types import FrameType
from typing import Any

# Exit codes of an interrupted command: the shell convention, 128 + signal number.
EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143

CAPTURED_LOGGERS = ("torch", "tensorboard")
_MAX_CAPTURED_RECORDS = 200  # enough to show what happened under --debug, bounded


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalState:
    """The first signal received while a command ran (None: none)."""

    received: int | None = None


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    if SignalState.received is None:
        SignalState.received = signum
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_to_exceptions() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Interrupted`` inside the block (main thread only)."""
    SignalState.received = None
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def check_not_interrupted() -> None:
    """Raise ``Interrupted`` when a signal arrived, even if model code swallowed it."""
    if SignalState.received is not None:
        raise Interrupted(SignalState.received)


def _flush_everything() -> None:
    for stream in (sys.stdout, sys.__stdout__, sys.stderr, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    # C code (a C extension's printf) buffers in libc's stdio; fflush(NULL) flushes every stream.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """fd 1 and ``sys.stdout`` go to stderr inside the block; both are restored after."""
    _flush_everything()
    try:
        saved: int | None = os.dup(1)
    except OSError:  # fd 1 is closed: nothing to restore but the closed state
        saved = None
    try:
        os.dup2(2, 1)
    except OSError:
        if saved is not None:
            os.close(saved)
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _flush_everything()  # what user code left in buffers belongs to stderr
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


class CapturedLogs(logging.Handler):
    """Keeps the last records of the captured loggers."""

    def __init__(self) -> None:
        super().__init__()
        self.records: deque[logging.LogRecord] = deque(maxlen=_MAX_CAPTURED_RECORDS)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _captured(name: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in CAPTURED_LOGGERS)


@contextlib.contextmanager
def torch_logs_captured() -> Iterator[CapturedLogs]:
    """Route every record of torch's (and TensorBoard's) loggers to memory.

    torch attaches its own stderr handlers to many loggers, some only when a
    submodule is first imported; intercepting ``Logger.callHandlers`` for the
    command's duration catches them all, whichever handlers exist.
    """
    sink = CapturedLogs()
    original = logging.Logger.callHandlers

    def call_handlers(self: logging.Logger, record: logging.LogRecord) -> None:
        if _captured(record.name):
            sink.handle(record)
            return
        original(self, record)

    logging.Logger.callHandlers = call_handlers  # type: ignore[method-assign]
    try:
        yield sink
    finally:
        logging.Logger.callHandlers = original  # type: ignore[method-assign]


def describe_exit(code: Any) -> str:
    """How ``sys.exit(code)`` was called, for the error line."""
    if code is None:
        return "sys.exit()"
    return f"sys.exit({code!r})"
