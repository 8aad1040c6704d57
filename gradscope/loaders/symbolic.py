"""The symbolic-shape expressions of a ``.pt2`` graph, checked before torch reads them.

torch's deserialiser turns each ``expr_str`` of the graph JSON (the sizes of a
dynamic or edited shape, ``SymInt``/``SymFloat``/``SymBool`` values) into a
sympy expression with ``sympy.sympify`` (torch/_export/serde/serialize.py,
``_parse_sym_expr``), and sympify evaluates its string as Python: a size
written as ``__import__('os').system(...)`` ran that command on load (field
trial).  torch writes these strings with ``str(sympy_expr)``, so a genuine one
is arithmetic and comparisons over symbol names and numbers, and calls of
sympy's and torch's expression classes (torch 2.13 prints the constructor form:
``Add(Symbol('s94', positive=True, integer=True), Integer(-1))``).  That
is what this module accepts, read with Python's own parser (``ast``, which runs
nothing); anything else (attribute access, subscripts, strings, lambdas, calls
of other names) is code.
"""

from __future__ import annotations

import ast
import builtins
import json
from collections.abc import Iterator
from typing import Any

import sympy

# The longest expression read: torch's grow with the graph's shape arithmetic,
# never to this length; a longer one would only make the parser work (and nest).
MAX_EXPRESSION_CHARS = 20_000

_OPERATORS = (
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd, ast.Not,
    ast.Invert, ast.BitAnd, ast.BitOr, ast.BitXor, ast.LShift, ast.RShift, ast.And, ast.Or,
    ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
)  # fmt: skip
_STRUCTURE = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Tuple, ast.Load)


def _expression_classes() -> set[str]:
    """The names torch's printer may call: sympy's expression classes (``Add``, ``Mul``,
    ``Integer``, ``GreaterThan``, ``Max``, ``floor``, ``Piecewise``…, every public
    subclass of ``sympy.Basic``) and torch.utils._sympy.functions' (``FloorDiv``,
    ``CeilDiv``, ``ModularIndexing``, ``OpaqueUnaryFn_*``…).  Constructing one builds
    a symbolic object; sympy's parsing helpers (``sympify``, ``parse_expr``,
    ``lambdify``) are functions, not classes, and stay out."""
    names: set[str] = set()
    modules: list[Any] = [sympy]
    try:
        from torch.utils._sympy import functions

        modules.append(functions)
    except ImportError:
        pass
    for module in modules:
        for name in dir(module):
            value = getattr(module, name, None)
            if not name.startswith("_") and isinstance(value, type) and issubclass(value, sympy.Basic):
                names.add(name)
    return names


_CALLABLE = _expression_classes()
_BUILTINS = set(dir(builtins))
_SYMPY_NAMES = set(dir(sympy))
# The constants sympy's printer writes by name (infinities, nan, the logical constants).
_SYMPY_CONSTANTS = {"oo", "zoo", "nan", "true", "false", "pi", "E", "I"}


def unsafe_part(expression: str) -> str | None:
    """None when ``expression`` is a symbolic-shape expression, else what in it is not."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        return f"an expression of {len(expression)} characters"
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "text that is no expression"
    return _unsafe_node(tree)


def _unsafe_node(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (bool, int, float)):
            return None
        return f"the constant {node.value!r}"[:80]
    if isinstance(node, ast.Name):
        return None if _plain_name(node.id) else f"the name {node.id}"
    if isinstance(node, ast.Call):
        if _is_symbol_declaration(node):
            return None
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in _CALLABLE or not all(_plain_keyword(k) for k in node.keywords):
            return f"a call of {ast.unparse(node.func)}"[:80]
        # Arguments are expressions again: a string argument would reach sympify's parser.
        return next((bad for arg in node.args if (bad := _unsafe_node(arg))), None)
    if not isinstance(node, _STRUCTURE + _OPERATORS):
        return f"Python syntax ({type(node).__name__})"
    return next((bad for child in ast.iter_child_nodes(node) if (bad := _unsafe_node(child))), None)


def _plain_name(name: str) -> bool:
    """A symbol (``s0``, ``u3``: sympify makes unknown names symbols), an expression
    class, or one of sympy's constants; never a builtin (``eval``, ``open``) or one
    of sympy's functions, which an argument position would hand to sympify."""
    if name.startswith("_") or name in _BUILTINS:
        return False
    return name in _CALLABLE or name in _SYMPY_CONSTANTS or name not in _SYMPY_NAMES


def _plain_keyword(keyword: ast.keyword) -> bool:
    """``precision=53``, ``evaluate=False``: a named number or flag."""
    value = keyword.value
    return keyword.arg is not None and isinstance(value, ast.Constant) and isinstance(value.value, (bool, int, float))


def _is_symbol_declaration(node: ast.Call) -> bool:
    """``Symbol('s26', positive=True, integer=True)``, as str() prints a symbol with
    assumptions: a name and boolean assumptions, nothing evaluated."""
    if not (isinstance(node.func, ast.Name) and node.func.id in ("Symbol", "Dummy")) or len(node.args) != 1:
        return False
    name = node.args[0]
    if not (isinstance(name, ast.Constant) and isinstance(name.value, str) and name.value.isidentifier()):
        return False
    return all(_plain_keyword(k) for k in node.keywords)


def expressions(graph_json: Any) -> Iterator[str]:
    """Every ``expr_str`` string in a deserialised graph JSON, wherever it sits."""
    stack = [graph_json]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "expr_str" and isinstance(item, str):
                    yield item
                else:
                    stack.append(item)
        elif isinstance(value, list):
            stack.extend(value)


def first_unsafe_expression(graph_bytes: bytes) -> tuple[str, str] | None:
    """(expression, what is wrong with it) for the first expression torch would
    evaluate as code, or None.  Raises ValueError for JSON that does not parse."""
    for expression in expressions(json.loads(graph_bytes)):
        problem = unsafe_part(expression)
        if problem is not None:
            return expression, problem
    return None
