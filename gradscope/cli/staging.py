"""Outputs that appear only once everything succeeded.

Each output is first written under a hidden temporary name next to where it
belongs (the same filesystem, so the final ``rename`` is atomic): a report
file as ``.NAME.gradscope-XXXX.tmp``, a TensorBoard run as a hidden directory
in the nearest existing ancestor.  ``commit`` moves all of them into place at
the end; any exception (an error, Ctrl-C, SIGTERM) removes them instead, so a
failed or interrupted command leaves nothing behind.  SIGINT and SIGTERM are
held back while outputs are moved or removed, so that the move is never cut
in half.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from gradscope.cli.paths import existing_ancestor
from gradscope.errors import InputError

_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}
STAGING_MARK = ".gradscope-"  # in every staged name, so tests (and people) can recognise leftovers


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Delay SIGINT/SIGTERM until the block is done (they are delivered right after)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _default_mode(existing: Path, directory: bool) -> int:
    """The existing file's mode, else what ``open``/``mkdir`` would give under the umask."""
    with contextlib.suppress(OSError):
        return existing.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


class Staging:
    """The staged outputs of one command (a context manager: discards on any exception)."""

    def __init__(self, before_commit: Callable[[], None] | None = None) -> None:
        self._files: list[tuple[Path, Path]] = []  # (staged, target)
        self._directories: list[tuple[Path, Path]] = []
        self._before_commit = before_commit
        self.committed = False

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self.committed:
            self.discard()

    def file(self, target: Path) -> Path:
        """A hidden empty file in ``target``'s folder to write the output into."""
        fd, staged = tempfile.mkstemp(prefix=f".{target.name}{STAGING_MARK}", suffix=".tmp", dir=target.parent)
        os.close(fd)
        self._files.append((Path(staged), target))
        return Path(staged)

    def write_text(self, target: Path, text: str) -> None:
        with self.writing(target):
            staged = self.file(target)
            with staged.open("w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())

    @contextlib.contextmanager
    def writing(self, target: Path, *, also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
        """Failures while writing ``target``'s staged copy (a full disk, a quota) name
        ``target``, the path the user gave, not the hidden staging name.  ``also``:
        more exception types that mean "the write failed" (torch.save raises RuntimeError)."""
        try:
            yield
        except (OSError, *also) as exc:  # type: ignore[misc]  # mypy cannot see through the unpacking
            if isinstance(exc, OSError) and exc.strerror:
                reason = exc.strerror
            else:
                lines = str(exc).strip().splitlines()
                reason = lines[-1] if lines else type(exc).__name__
            raise InputError(f"cannot write {str(target)!r}: {reason}") from exc

    def directory(self, target: Path) -> Path:
        """A hidden empty directory, on ``target``'s filesystem, to write a run into."""
        anchor = existing_ancestor(target) if not target.is_dir() else target.parent
        staged = tempfile.mkdtemp(prefix=f".{target.name}{STAGING_MARK}", suffix=".tmp", dir=anchor)
        self._directories.append((Path(staged), target))
        return Path(staged)

    def commit(self) -> None:
        """Move every staged output into place (signals held, so none is half-moved)."""
        if self._before_commit is not None:
            self._before_commit()  # e.g. a signal arrived and model code swallowed its exception
        with signals_held():
            for staged, target in self._files:
                os.chmod(staged, _default_mode(target, directory=False))  # mkstemp makes 0600
            for staged, target in self._directories:
                os.chmod(staged, _default_mode(target, directory=True))  # mkdtemp makes 0700
                _move_directory(staged, target)
            for staged, target in self._files:
                os.replace(staged, target)
            self.committed = True

    def discard(self) -> None:
        with signals_held():
            for staged, _target in self._files:
                with contextlib.suppress(OSError):
                    staged.unlink()
            for staged, _target in self._directories:
                shutil.rmtree(staged, ignore_errors=True)
            self._files.clear()
            self._directories.clear()


def _move_directory(staged: Path, target: Path) -> None:
    """Rename ``staged`` to ``target``: a new path (parents created), or an empty directory."""
    if target.is_dir():
        try:
            target.rmdir()  # only succeeds while it is empty: an existing run is never replaced
        except OSError:
            raise InputError(f"{str(target)!r} is no longer empty; the run was not written there") from None
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staged, target)
