"""Numbers in sentences: significant figures, never a fixed number of decimals.

A fixed-decimal format prints a meaningful small value as 0 (an update ratio of
3e-7 with ``:.2f``) and a large one with a wall of digits (``1494440.5``); the
finding messages format their numbers here instead.  (The report tables use
``gradscope.render._format.number``, the same idea with 4 digits.)
"""

from __future__ import annotations

import math


def special(x: float) -> str | None:
    """How a number with no digits to round is written ("nan", "inf", "-inf", "0"), else None."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return "0" if x == 0 else None


def significant(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant figures: plain between 1e-3 and 1e5, else
    scientific with a short exponent; never "0" for a non-zero ``x``.

    Example:
        >>> significant(3e-7), significant(1494440.5), significant(1348.2), significant(0.0012345)
        ('3e-7', '1.49e6', '1350', '0.00123')
    """
    fixed = special(x)
    if fixed is not None:
        return fixed
    rounded = float(f"{x:.{digits}g}")
    if 1e-3 <= abs(rounded) < 1e5:
        text = f"{rounded:.{max(digits - 1 - math.floor(math.log10(abs(rounded))), 0)}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".") if "." in mantissa else mantissa
    return f"{mantissa}e{int(exponent)}"


def percent(fraction: float, digits: int = 2) -> str:
    """A fraction as a percentage with ``digits`` significant figures: "0.05%"
    rather than "0%", "99.95%" rather than "100%" (exactly 1 is "100%").

    Example:
        >>> percent(0.0005), percent(0.9995), percent(1.0), percent(0.5)
        ('0.05%', '99.95%', '100%', '50%')
    """
    if fraction == 1.0 or fraction == 0.0:
        return f"{fraction * 100:.0f}%"
    value = fraction * 100
    if value > 99:  # the distance to 100 % is what matters
        gap = 100 - value
        decimals = max(1, -math.floor(math.log10(gap)) + digits - 1) if gap > 0 else 1
        return f"{value:.{decimals}f}".rstrip("0").rstrip(".") + "%"
    return significant(value, digits) + "%"


def apart(a: float, b: float, digits: int = 4) -> tuple[str, str]:
    """``a`` and ``b`` with at least ``digits`` significant figures, and as many
    more as they need to read differently (a loss going from 1.00002 to 1.00004
    is not "from 1 to 1"); equal numbers stay equal.

    Example:
        >>> apart(1.00002, 1.00004), apart(0.7, 0.95)
        (('1.00002', '1.00004'), ('0.7', '0.95'))
    """
    for d in range(digits, 16):
        left, right = significant(a, d), significant(b, d)
        if left != right or a == b:
            return left, right
    return significant(a, 16), significant(b, 16)
