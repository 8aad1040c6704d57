"""Strict JSON has no NaN or infinity: gradscope writes them as strings."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any


def json_safe(value: Any) -> Any:
    """NaN/±inf become "nan"/"inf"/"-inf"; enums their values; tuples lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    return value


def json_float(value: Any) -> float:
    """The inverse for one number: accepts floats, ints and the strings above."""
    return float(value)
