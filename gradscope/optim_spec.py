"""``--optimizer SPEC``: a planned optimizer configuration, for an audit to check.

Grammar (whitespace ignored)::

    SPEC   := NAME [":" ARGS]
    NAME   := a torch.optim class, any case: sgd, adam, adamw, rmsprop, adagrad, ...
    ARGS   := KEY "=" VALUE ("," KEY "=" VALUE)*
    KEY    := a keyword argument of that class (lr, weight_decay, momentum, betas, ...)
    VALUE  := a number (1e-3, 0.9, 10) | true | false | "(" VALUE ("," VALUE)* ")"

Examples: ``adamw:lr=1e-3,weight_decay=0.01``, ``sgd:lr=0.1,momentum=0.9,weight_decay=5e-4``,
``adam:lr=3e-4,betas=(0.9,0.98)``.  The optimizer is built over the model's trainable
parameters, in one group.  Every mistake is one ``InputError`` line (CLI exit 2).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from gradscope.errors import InputError

USAGE = "--optimizer NAME[:key=value,...], e.g. adamw:lr=1e-3,weight_decay=0.01"


def optimizer_classes() -> dict[str, type]:
    """Lower-case name -> class, for every optimizer torch.optim exports."""
    import torch

    out = {}
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
            out[name.lower()] = cls
    return out


@dataclass
class OptimizerSpec:
    """A parsed SPEC: the class and its keyword arguments."""

    cls: type
    kwargs: dict[str, Any]
    text: str

    def build(self, parameters: Any) -> Any:
        """The optimizer over ``parameters``; construction errors become one InputError line."""
        try:
            return self.cls(parameters, **self.kwargs)
        except (ValueError, TypeError) as exc:
            raise InputError(f"--optimizer {self.text!r}: {self.cls.__name__}: {_first_line(exc)}") from exc


def _split_args(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced ')'")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise ValueError("unbalanced '('")
    parts.append("".join(current))
    return parts


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.startswith("(") and text.endswith(")"):
        inner = text[1:-1]
        return tuple(_value(v) for v in _split_args(inner) if v)
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number, true/false or a (tuple)") from None
    is_int = text.lstrip("+-").isdigit()
    return int(text) if is_int else number


def parse_optimizer_spec(spec: str) -> OptimizerSpec:
    """Parse SPEC (see the module docstring).

    Raises:
        InputError: an unknown class, a keyword the class does not take, a malformed value.

    Example:
        >>> parsed = parse_optimizer_spec("adamw:lr=1e-3,weight_decay=0.01")
        >>> parsed.cls.__name__, parsed.kwargs
        ('AdamW', {'lr': 0.001, 'weight_decay': 0.01})
    """
    text = "".join(spec.split())
    name, _, args = text.partition(":")
    classes = optimizer_classes()
    cls = classes.get(name.lower())
    if cls is None:
        raise InputError(f"--optimizer: unknown optimizer {name!r}; choose among {', '.join(sorted(classes))}")
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "params")]
    kwargs: dict[str, Any] = {}
    try:
        pieces = _split_args(args) if args else []
    except ValueError as exc:
        raise InputError(f"--optimizer {spec!r}: {exc}; usage: {USAGE}") from exc
    for piece in pieces:
        key, eq, raw = piece.partition("=")
        if not eq or not key or not raw:
            raise InputError(f"--optimizer {spec!r}: expected key=value, got {piece!r}; usage: {USAGE}")
        if key not in accepted:
            raise InputError(f"--optimizer: {cls.__name__} takes no {key!r}; it takes {', '.join(accepted)}")
        try:
            kwargs[key] = _value(raw)
        except ValueError as exc:
            raise InputError(f"--optimizer {spec!r}: {key}: {exc}") from exc
    return OptimizerSpec(cls=cls, kwargs=kwargs, text=spec)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
