"""The one source of gradscope's version: the installed package metadata."""

from __future__ import annotations

from functools import cache


@cache
def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _dist_version

    try:
        return _dist_version("gradscope")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"
