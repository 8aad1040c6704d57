"""The JSON report: exactly one document of schema 1 (see DESIGN.md).

Strict JSON: ``report.to_dict()`` already writes NaN and infinities as the
strings "nan"/"inf"/"-inf", and ``allow_nan=False`` makes sure nothing slips
through as a bare ``NaN`` literal, which most JSON parsers reject.
"""

from __future__ import annotations

import json

from gradscope.report import Report


def render_json(report: Report, *, indent: int | None = 2) -> str:
    """``report.to_dict()`` as one strict JSON document, without a trailing newline."""
    return json.dumps(report.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False)
