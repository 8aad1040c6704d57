"""``path/to/file.py:factory`` and ``package.module:factory`` specifications.

The factory is a callable returning an ``nn.Module`` (called without
arguments) or an ``nn.Module`` attribute.  Importing user code runs it, which
is what the user asked for by naming it; errors in that code become one-line
LoadErrors.  The factory runs with torch's, Python's and NumPy's global
generators seeded (``--seed``), so a factory using the default random init
builds the same weights on every run.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from gradscope.loaders.detect import LoadError

_DOTTED = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def split_spec(spec: str) -> tuple[str, str] | None:
    """('file.py' or 'pkg.mod', 'factory') when ``spec`` names a factory, else None.

    A spec that is an existing file is a file, even when it contains a colon.

    Example:
        >>> split_spec("package.module:build"), split_spec("models/net.py:make"), split_spec("model.pt2")
        (('package.module', 'build'), ('models/net.py', 'make'), None)
    """
    if Path(spec).is_file() or ":" not in spec:
        return None
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        return None
    if not _DOTTED.match(attr):
        raise LoadError(f"{attr!r} in {spec!r} is not a Python name; use file.py:factory or package.module:factory")
    if target.endswith(".py") or "/" in target or "\\" in target or Path(target).exists():
        return target, attr
    if _DOTTED.match(target):
        return target, attr
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def import_file(path: Path) -> Any:
    """Import a Python file as a module with a unique name (its directory on sys.path
    while it runs, so it can import its neighbours)."""
    from gradscope.loaders.detect import check_file

    check_file(path, "Python file")
    if path.suffix != ".py":
        raise LoadError(f"{str(path)!r} is not a .py file; a factory spec is path/to/file.py:factory")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"_gradscope_user_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LoadError(f"cannot import {str(path)!r}")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except LoadError:
        raise
    except BaseException as exc:
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise LoadError(f"importing {str(path)!r} raised {_first_line(exc)}") from exc
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def import_module(name: str) -> Any:
    """Import ``package.module``, with the working directory on sys.path as under
    ``python -m`` (the ``gradscope`` script alone would not see a local package)."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return _import(name)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise LoadError(f"cannot find Python module {name!r} (not installed or not on PYTHONPATH)") from exc
        raise LoadError(f"importing {name!r} raised {_first_line(exc)}") from exc
    except Exception as exc:
        raise LoadError(f"importing {name!r} raised {_first_line(exc)}") from exc


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Seed the global generators a factory's init draws from, and restore them afterwards.

    ``torch.manual_seed`` seeds the CPU generator and every CUDA device's; Python's
    ``random`` and NumPy's legacy global generator are seeded too, for factories
    that use them.  The previous CPU, ``random`` and NumPy states come back on
    exit, so a library caller's own random stream is undisturbed.
    """
    if seed is None:
        yield
        return
    try:
        import numpy
    except ImportError:  # numpy is optional
        numpy = None  # type: ignore[assignment]
    saved = (torch.get_rng_state(), random.getstate(), numpy.random.get_state() if numpy is not None else None)
    torch.manual_seed(seed)
    random.seed(seed)
    if numpy is not None:
        numpy.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        if numpy is not None:
            numpy.random.set_state(saved[2])


def build_from_spec(spec: str, seed: int | None = None) -> nn.Module | ExportedProgram:
    """The module a factory spec names: import, look up, call if callable.

    ``seed`` (when not None) seeds the global generators while the module is
    imported and the factory called (see ``seeded``).

    An ``ExportedProgram`` (what ``torch.export.export`` returns) is accepted
    too; ``load_model`` audits it as an exported archive.

    Raises:
        LoadError: the file or module cannot be imported, the name is missing,
            calling it raises, or it does not give an ``nn.Module``.
    """
    parts = split_spec(spec)
    if parts is None:
        raise LoadError(f"{spec!r} is not a factory spec; use path/to/file.py:factory or package.module:factory")
    with seeded(seed):
        return _build(*parts)


def _build(target: str, attr: str) -> nn.Module | ExportedProgram:
    is_file = target.endswith(".py") or "/" in target or "\\" in target or Path(target).exists()
    module = import_file(Path(target)) if is_file else import_module(target)
    if not hasattr(module, attr):
        public = sorted(n for n, v in vars(module).items() if not n.startswith("_") and callable(v))[:8]
        hint = f" (it defines: {', '.join(public)})" if public else ""
        raise LoadError(f"{target} has no attribute {attr!r}{hint}")
    obj = getattr(module, attr)
    if isinstance(obj, (nn.Module, ExportedProgram)):
        return obj
    if not callable(obj):
        raise LoadError(f"{target}:{attr} is a {type(obj).__name__}, neither an nn.Module nor a factory returning one")
    try:
        built = obj()
    except TypeError as exc:
        raise LoadError(
            f"calling {target}:{attr}() failed: {_first_line(exc)} (the factory must take no arguments)"
        ) from exc
    except Exception as exc:
        raise LoadError(f"calling {target}:{attr}() raised {_first_line(exc)}") from exc
    if not isinstance(built, (nn.Module, ExportedProgram)):
        raise LoadError(f"{target}:{attr}() returned a {type(built).__name__}, not an nn.Module")
    return built
