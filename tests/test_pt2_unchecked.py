"""A `.pt2` loaded as data runs no code and touches no memory outside its tensors.

Field trial (session 10): two holes in the archive loader, each a class.
1. torch's deserialiser evaluates every symbolic-shape string of the graph
   (``expr_str``) with ``sympy.sympify``, i.e. as Python: a size rewritten as
   ``__import__('os').system(...)`` ran on ``gradscope audit`` with no flag
   (dynamic exports and static ones alike; the consent case itself is in
   tests/test_hostile_files.py, ``pt2_shape_expression``).
2. The graph-op check allowed every ATen operator but three, and some ATen
   kernels trust their arguments to describe memory: a sparse tensor built with
   an index of 1e8 and densified segfaulted the process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from gradscope.loaders.consent import CodeRefused
from gradscope.loaders.pt2 import check_graph_ops, disallowed_op, load_archive
from gradscope.loaders.symbolic import expressions, unsafe_part

# What torch 2.13 writes for shapes (str of sympy expressions): all accepted.
GENUINE = [
    "s77",
    "2*s77",
    "s77 + 1",
    "s0*s1 - 3",
    "Max(1, s77)",
    "FloorDiv(s77, 2)",
    "Mod(s77, 4)",
    "CeilDiv(s0, 8)",
    "Eq(Mod(s77, 2), 0)",
    "(s0 >= 2) & (s0 <= 64)",
    "Ne(s1, 1)",
    "-s2 + 7",
    "s0**2",
    "ToFloat(s0)/2.5",
    "Piecewise((s0, s0 > 2), (2, True))",
    # torch 2.13's own form (the constructor calls of srepr), read off a dynamic export:
    "Add(Symbol('s94', positive=True, integer=True), Integer(-1))",
    "GreaterThan(Symbol('u0', integer=True), Integer(0))",
    "Float(1.5, precision=53)",
    "s0 + oo",
]
# Python that sympify would evaluate: all refused, each for what it is.
HOSTILE = {
    "__import__('os').system('id')": "a call of __import__('os').system",
    "Integer(4).__class__": "Python syntax (Attribute)",
    "s0.func": "Python syntax (Attribute)",
    "eval('1')": "a call of eval",
    "open('/etc/passwd')": "a call of open",
    "Max(s0, key='x')": "a call of Max",
    "Max(eval, 1)": "the name eval",
    "Max(sympify, 1)": "the name sympify",
    "Max('__import__(1)', 1)": "the constant '__import__(1)'",
    "Function('f')(1)": "a call of Function('f')",
    "[s0][0]": "Python syntax (Subscript)",
    "(lambda: 1)()": "a call of lambda: 1",
    "'text'": "the constant 'text'",
    "__builtins__": "the name __builtins__",
    "s0; import os": "text that is no expression",
}


def test_genuine_shape_expressions_are_accepted() -> None:
    for expression in GENUINE:
        assert unsafe_part(expression) is None, expression


def test_python_in_a_shape_expression_is_named() -> None:
    for expression, problem in HOSTILE.items():
        assert unsafe_part(expression) == problem, expression
    assert unsafe_part("s0+" * 10_000 + "1") == "an expression of 30001 characters"


def test_expressions_are_found_wherever_they_sit() -> None:
    graph = {"a": [{"expr_str": "s0"}, {"b": {"as_expr": {"expr_str": "2*s0", "hint": 3}}}], "expr_str": 5}
    assert sorted(expressions(graph)) == ["2*s0", "s0"]


class _Reshaping(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        found = torch.nonzero(x).shape[0]  # an unbacked size: range expressions in the graph
        return self.fc(x.reshape(x.shape[0] // 2, -1)) + found


def test_a_dynamic_export_with_shape_arithmetic_loads_as_data(tmp_path: Path) -> None:
    batch = torch.export.Dim("batch", min=2, max=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(_Reshaping(), (torch.randn(8, 4),), dynamic_shapes=({0: 2 * batch},))
        torch.export.save(program, str(tmp_path / "dynamic.pt2"))
    loaded, _ = load_archive(tmp_path / "dynamic.pt2", trusted=False)
    assert loaded.module()(torch.randn(12, 4)).shape == (6, 4)
    from torch.export.pt2_archive._package import PT2ArchiveReader

    graph = json.loads(PT2ArchiveReader(str(tmp_path / "dynamic.pt2")).read_bytes("models/model.json"))
    found = list(expressions(graph))
    assert any(not e.isidentifier() for e in found), found  # arithmetic really was checked, and passed


class _SparseOutOfBounds(nn.Module):
    """The field trial's archive: an index of 1e8 into a 4-element sparse tensor, densified."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("index", torch.tensor([[10**8]]))
        self.register_buffer("value", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sparse = torch.ops.aten._sparse_coo_tensor_with_dims_and_tensors.default(
            1, 0, [4], self.index, self.value, dtype=torch.float32, layout=torch.sparse_coo, is_coalesced=True
        )
        return self.fc(x) + torch.ops.aten._to_dense.default(sparse)


def test_operators_that_trust_their_arguments_are_refused() -> None:
    aten = torch.ops.aten
    for op in (
        aten._sparse_coo_tensor_with_dims_and_tensors.default,
        aten._sparse_coo_tensor_unsafe.default,
        aten._sparse_csr_tensor_unsafe.default,
        aten._sparse_compressed_tensor_unsafe.default,
        aten._nested_view_from_buffer.default,
        aten._reshape_alias.default,  # views 100,000 elements of a 4-element storage
        aten._index_put_impl_.default,  # unsafe=True skips the index check
        aten._unsafe_index.Tensor,
        aten.set_.source_Storage_storage_offset,
    ):
        assert disallowed_op(op) is not None, op
    # The ordinary operators of exported models stay allowed, "unsafe" in a name or not
    # (_unsafe_view and unsafe_split check sizes; they only skip autograd's alias tracking).
    for op in (aten.linear.default, aten._unsafe_view.default, aten.unsafe_split.Tensor):
        assert disallowed_op(op) is None, op
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(_SparseOutOfBounds(), (torch.randn(2, 4),))
    with pytest.raises(CodeRefused, match="_sparse_coo_tensor_with_dims_and_tensors"):
        check_graph_ops(program, Path("sparse.pt2"))


@pytest.mark.slow
def test_the_out_of_bounds_archive_is_refused_in_a_real_process(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(_SparseOutOfBounds(), (torch.randn(2, 4),)), str(tmp_path / "m.pt2"))
    done = subprocess.run(
        [sys.executable, "-m", "gradscope", "audit", str(tmp_path / "m.pt2")], capture_output=True, text=True
    )
    assert done.returncode == 2, (done.returncode, done.stderr)  # was -11 (SIGSEGV)
    assert len(done.stderr.strip().splitlines()) == 1 and "--trust-code" in done.stderr
