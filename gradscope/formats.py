"""Low-precision floating-point formats whose range gradscope checks.

Every limit is read from ``torch.finfo`` (never typed in by hand): the largest
finite value, the smallest normal, and the smallest subnormal, which for the
IEEE-like formats here is ``smallest_normal * eps`` (fp16: 2^-14 * 2^-10 =
2^-24; bf16: 2^-126 * 2^-7 = 2^-133; fp8 e4m3fn: 2^-6 * 2^-3 = 2^-9; fp8 e5m2:
2^-14 * 2^-2 = 2^-16).  e4m3fn (max 448) is deliberately not e4m3fnuz (max 240).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class FloatFormat:
    """The range of one floating-point format, in values and in binary exponents."""

    name: str
    dtype_name: str
    max: float
    smallest_normal: float
    smallest_subnormal: float

    @property
    def max_exponent(self) -> int:
        """floor(log2(max)): the highest binade that still holds finite values."""
        return math.floor(math.log2(self.max))

    @property
    def normal_exponent(self) -> int:
        """log2(smallest normal): values in lower binades lose precision."""
        return round(math.log2(self.smallest_normal))

    @property
    def subnormal_exponent(self) -> int:
        """log2(smallest subnormal): values in lower binades flush to zero."""
        return round(math.log2(self.smallest_subnormal))


_DTYPE_NAMES = {
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}

FORMAT_NAMES: tuple[str, ...] = tuple(_DTYPE_NAMES)


@cache
def get_format(name: str) -> FloatFormat:
    """The FloatFormat called ``name`` (one of FORMAT_NAMES), limits from torch.finfo."""
    import torch

    if name not in _DTYPE_NAMES:
        raise ValueError(f"unknown format {name!r}; choose one of {', '.join(FORMAT_NAMES)}")
    dtype = getattr(torch, _DTYPE_NAMES[name])
    info = torch.finfo(dtype)
    return FloatFormat(
        name=name,
        dtype_name=_DTYPE_NAMES[name],
        max=float(info.max),
        smallest_normal=float(info.smallest_normal),
        smallest_subnormal=float(info.smallest_normal * info.eps),
    )


def format_for_dtype(dtype: object) -> str | None:
    """The format name for a torch dtype, or None for float32/float64 and non-floats."""
    text = str(dtype).removeprefix("torch.")
    for name, dtype_name in _DTYPE_NAMES.items():
        if dtype_name == text:
            return name
    return None
