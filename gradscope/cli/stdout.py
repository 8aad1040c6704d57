"""Writing the report to stdout, with every failure as one line and exit 2.

A reader that went away (EPIPE: ``gradscope ... | head -1``), a full device
(ENOSPC: ``> /dev/full``), a closed stdout (``>&-``) and an encoding that cannot
hold the report's characters (``PYTHONIOENCODING=ascii``) each end the command
with ``gradscope: error: ...`` on stderr and exit 2, never a traceback nor a
silent exit 0.  ``standard_streams_open`` runs first: when the process starts
with fd 0, 1 or 2 closed, ``/dev/null`` takes that number, so that no file the
command opens (a model, an output) can become "stdout" by accident.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TextIO

from gradscope.errors import GradscopeError


class StdoutError(GradscopeError):
    """stdout cannot take the report."""


class _Streams:
    stdout_closed_at_start = False


def standard_streams_open() -> None:
    """Put ``/dev/null`` on any of fds 0-2 that is closed; remember a closed stdout."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:  # the lowest free number is normally the closed one
                os.dup2(null, fd)
                os.close(null)
            if fd == 1:
                _Streams.stdout_closed_at_start = True


def silence_stdout() -> None:
    """After a failed write, point fd 1 at /dev/null and drop the buffered rest, so
    Python does not retry (and print "Exception ignored ...") when it exits."""
    stream = sys.stdout
    try:
        is_fd1 = stream is not None and stream.fileno() == 1
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError
        is_fd1 = False
    if is_fd1:
        with contextlib.suppress(OSError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.close(null)
    if stream is not None:
        with contextlib.suppress(Exception):
            stream.flush()


def emit(text: str, stream: TextIO | None = None) -> None:
    """Write ``text`` to stdout (or ``stream``, the stdout captured earlier) and flush
    it; raise StdoutError (one line) on any failure."""
    stream = stream if stream is not None else sys.stdout
    if stream is None or _Streams.stdout_closed_at_start or getattr(stream, "closed", False):
        raise StdoutError("cannot write the report: stdout is closed (redirect it, or use --output FILE)")
    encoding = getattr(stream, "encoding", None) or "utf-8"
    errors = getattr(stream, "errors", None) or "strict"
    try:
        text.encode(encoding, errors)
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start : exc.end]
        raise StdoutError(
            f"cannot write the report: stdout's encoding {encoding!r} has no {bad!r} "
            "(set PYTHONIOENCODING=utf-8, or use --output FILE)"
        ) from None
    except LookupError:
        pass  # an encoding Python does not know by that name: let the write decide
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:
        silence_stdout()
        raise StdoutError("cannot write the report: stdout was closed by its reader (broken pipe)") from None
    except UnicodeEncodeError as exc:
        raise StdoutError(f"cannot write the report: stdout's encoding {encoding!r} failed ({exc.reason})") from None
    except OSError as exc:
        silence_stdout()
        raise StdoutError(f"cannot write the report to stdout: {exc.strerror or exc}") from None
    except ValueError:  # "I/O operation on closed file"
        raise StdoutError("cannot write the report: stdout is closed (redirect it, or use --output FILE)") from None
