"""``.pt2`` archives (``torch.export.save``) loaded as data, not as code.

What ``torch.export.load`` does (torch/export/pt2_archive/_package.py,
``load_pt2``), and where it runs code from the file:

* ``models/<name>.json`` - the graph, as JSON.  Its symbolic-shape strings
  (``expr_str``) are evaluated as Python by ``sympy.sympify``
  (``gradscope.loaders.symbolic`` checks them first).  Its operators are looked up by
  name with ``getattr`` from ``torch``, ``operator`` or ``math`` (serde/
  serialize.py, ``deserialize_operator``), so a name like
  ``torch.serialization.os.system`` resolves to a Python callable that runs
  when the graph runs; an ATen operator can act outside the tensor world too
  (``aten.from_file(..., shared=True)`` creates and overwrites files).
* ``data/weights/*`` and ``data/constants/*`` - raw tensor bytes, except
  entries marked ``use_pickle`` (tensor subclasses), which torch unpickles with
  ``weights_only=False``; custom-class and opaque constants are unpickled by
  TorchScript's and Python's full unpicklers.
* ``data/sample_inputs/<name>.pt`` - ``torch.load(weights_only=True)``, and on
  failure *silently retried* with ``weights_only=False``.
* ``data/aotinductor/**`` - compiled shared libraries, loaded with ``dlopen``.

``load_archive`` reads the same parts with torch's own readers, but unpickles
every pickled part with ``weights_only=True`` and refuses the parts that need
more (``CodeRefused``), ignores compiled code it does not need, and checks
every operator the graph calls against an allow-list before anything calls
it.  With ``trusted=True`` (``--trust-code``) the pickled parts get the full
unpickler and the operators are not checked, as ``torch.export.load`` does.

Output types the archive names but this process has not registered with
pytree (a Hugging Face ``ModelOutput`` when ``transformers`` is not imported)
would make deserialisation fail; their specs are read as plain dicts with the
same keys, which is what those types flatten to.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import operator
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gradscope.loaders.consent import CodeRefused, refuse
from gradscope.loaders.detect import LoadError
from gradscope.loaders.pickles import describe_imports, unsafe_globals
from gradscope.loaders.symbolic import first_unsafe_expression

_DATA_ALTERNATIVE = "re-export it from the Python model with torch.export.save"
MODEL_NAME = "model"  # the program torch.export.load returns (torch/export/__init__.py)


# -- torch's logging ------------------------------------------------------------------


@contextlib.contextmanager
def captured_torch_logs() -> Iterator[list[str]]:
    """Keep torch's log records (e.g. the traceback ``torch.export.load`` logs for a
    damaged archive) off stderr; yields the list of captured lines.

    torch configures the ``torch`` logger with its own handler and no
    propagation (torch/_logging/_internal.py), so it is that logger whose
    handlers are swapped for the duration.
    """
    lines: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            with contextlib.suppress(Exception):
                lines.append(self.format(record))

    root = logging.getLogger("torch")
    saved = (list(root.handlers), root.propagate)
    root.handlers = [_Keep()]
    root.propagate = False
    try:
        yield lines
    finally:
        root.handlers, root.propagate = saved


# -- the operator allow-list -------------------------------------------------------

# ATen and prims operators compute on tensors; these few reach outside that world.
# aten::from_file maps a file (shared=True creates or overwrites it), aten::save
# is TorchScript's torch.save, aten::_print writes to stdout.
_DENIED_OPS = {"aten::from_file", "aten::save", "aten::_print"}
# And these trust their arguments to describe memory they may touch: a kernel that
# skips a bounds check reads or writes outside a tensor's storage when the graph
# hands it a lying size or index (field trial: aten._sparse_coo_tensor_with_dims_and_tensors
# with an index of 1e8, then aten._to_dense, segfaulted the process).  Measured on
# torch 2.13: _reshape_alias views 100,000 elements of a 4-element storage with no
# error; _index_put_impl_(unsafe=True) and the _unsafe_index family skip index
# checks by design.  Views that validate (as_strided, narrow, slice, select,
# prims.as_strided) stay allowed.
_UNCHECKED_OPS = {
    "aten::_reshape_alias",
    "aten::_index_put_impl_",
    "aten::_unsafe_index",
    "aten::_unsafe_index_put",
    "aten::_unsafe_masked_index",
    "aten::_unsafe_masked_index_put_accumulate",
    "aten::set_",
}
# Sparse and nested constructors build a layout from index or offset tensors they
# do not validate (check_sparse_tensor_invariants is off by default): every operator
# whose name says it makes, takes apart or converts those layouts.
_UNCHECKED_LAYOUT_WORDS = ("sparse", "nested", "_compressed", "_coo", "_csr", "_csc", "_bsr", "_bsc")
_TENSOR_NAMESPACES = {"aten", "prims"}


def _unchecked(schema: Any) -> bool:
    """Whether an ATen/prims operator trusts its inputs to describe memory (above)."""
    name = str(schema.name)
    return (
        name in _UNCHECKED_OPS
        or any(word in name for word in _UNCHECKED_LAYOUT_WORDS)
        or any(arg.name == "unsafe" for arg in schema.arguments)
    )


# Higher-order operators torch.export emits for control flow, grad mode and
# autocast regions, and functionalised mutation; their subgraphs and the
# operators they wrap are checked too.
_ALLOWED_HIGHER_ORDER = {
    "cond",
    "while_loop",
    "map_impl",
    "scan",
    "associative_scan",
    "wrap_with_set_grad_enabled",
    "wrap_with_autocast",
    "invoke_subgraph",
    "auto_functionalized",
    "auto_functionalized_v2",
    "with_effects",
    "flex_attention",
}


def _safe_python_functions() -> set[int]:
    """ids of the plain Python callables export graphs use for symbolic shapes."""
    names = (
        "getitem add sub mul truediv floordiv mod pow neg pos abs eq ne lt le gt ge "
        "and_ or_ xor not_ invert lshift rshift truth"
    ).split()
    functions: list[Any] = [getattr(operator, name) for name in names]
    functions += [value for name, value in vars(math).items() if callable(value) and not name.startswith("_")]
    for name in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum", "_check"):
        if hasattr(torch, name):
            functions.append(getattr(torch, name))
    functions += [getattr(torch, "_check_is_size", None), getattr(torch._C, "_set_grad_enabled", None)]
    return {id(f) for f in functions if f is not None}


_SAFE_FUNCTIONS = _safe_python_functions()


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target._schema.name).replace("::", ".") + (
            f".{target._overloadname}" if target._overloadname != "default" else ""
        )
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    return str(getattr(target, "__qualname__", None) or target)


def disallowed_op(target: Any) -> str | None:
    """None when ``target`` may be called by an archive's graph, else its name."""
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        if (
            target.namespace in _TENSOR_NAMESPACES
            and schema.name not in _DENIED_OPS
            and not _unchecked(schema)
            and not any(arg.name in ("filename", "path", "file") for arg in schema.arguments)
        ):
            return None
        return _op_name(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return None if target.name() in _ALLOWED_HIGHER_ORDER else _op_name(target)
    if isinstance(target, torch._ops.OpOverloadPacket):  # a name without overload: every overload must pass
        overloads = [getattr(target, name) for name in target.overloads()]
        return next((bad for op in overloads if (bad := disallowed_op(op))), None) if overloads else str(target)
    if not isinstance(target, str) and id(target) in _SAFE_FUNCTIONS:
        return None
    return _op_name(target)


def _callables_in(args: Any) -> Iterator[Any]:
    """Operators passed as arguments (``auto_functionalized(op, ...)``, ``with_effects(token, op, ...)``)."""
    import torch.utils._pytree as pytree

    for leaf in pytree.tree_leaves(args):
        if isinstance(leaf, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
            yield leaf
        elif callable(leaf) and not isinstance(leaf, (torch.fx.Node, torch.Tensor, torch.nn.Module, type)):
            yield leaf


def check_graph_ops(program: Any, path: Path) -> None:
    """Raise CodeRefused when any graph of ``program`` (its subgraphs included) calls
    something outside the allow-list, before anything calls it."""
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            bad = f"a {node.op} node" if node.op != "call_function" else disallowed_op(node.target)
            if bad is None:
                bad = next((name for c in _callables_in((node.args, node.kwargs)) if (name := disallowed_op(c))), None)
            if bad is not None:
                raise refuse(
                    path,
                    f"is a torch.export archive whose graph calls {bad}, which is not a checked tensor operation "
                    "(such calls can act outside the tensor world, e.g. aten.from_file creates and overwrites files, "
                    "or touch memory outside a tensor, e.g. a sparse constructor with unchecked indices)",
                    _DATA_ALTERNATIVE,
                )


# -- the mode the program was exported in ------------------------------------------


def export_mode(program: Any) -> str | None:
    """ "train", "eval" or "mixed": what the graph's mode-dependent operators were
    fixed to when the program was exported; None when no operator depends on it.

    Read from the ``train``/``training`` arguments of dropout and batch-norm
    operators (``aten.dropout(input, p, train)``, ``aten.batch_norm(..., training, ...)``)
    and from batch-norm's explicit eval variant.
    """
    seen: set[bool] = set()
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            target = node.target
            if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
                continue
            if "no_training" in target._schema.name:
                seen.add(False)
                continue
            for index, arg in enumerate(target._schema.arguments):
                if arg.name not in ("train", "training") or str(arg.type) != "bool":
                    continue
                value = node.args[index] if index < len(node.args) else node.kwargs.get(arg.name, arg.default_value)
                if isinstance(value, bool):
                    seen.add(value)
    if not seen:
        return None
    return "mixed" if len(seen) == 2 else ("train" if True in seen else "eval")


# -- output types this process does not know -----------------------------------------


def _plain_spec(node: Any, unknown: set[str]) -> Any:
    """A serialised treespec with unregistered keyed types turned into dicts (same keys)."""
    from torch.utils._pytree import SERIALIZED_TYPE_TO_PYTHON_TYPE

    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    if isinstance(kind, str) and kind not in SERIALIZED_TYPE_TO_PYTHON_TYPE:
        try:
            keys = json.loads(node.get("context") or "null")
        except (TypeError, ValueError):
            keys = None
        if isinstance(keys, list) and all(isinstance(k, str) for k in keys):
            unknown.add(kind)
            node = dict(node, type="builtins.dict")
    children = node.get("children_spec")
    if isinstance(children, list):
        node = dict(node, children_spec=[_plain_spec(child, unknown) for child in children])
    return node


def plain_output_types(serialized: Any) -> set[str]:
    """Rewrite, in place, the call specs of a deserialised-to-dataclass program; returns the types replaced."""
    unknown: set[str] = set()
    for entry in serialized.graph_module.module_call_graph:
        signature = entry.signature
        if signature is None:
            continue
        for attr in ("in_spec", "out_spec"):
            text = getattr(signature, attr)
            try:
                protocol, spec = json.loads(text)
            except (TypeError, ValueError):
                continue
            setattr(signature, attr, json.dumps([protocol, _plain_spec(spec, unknown)]))
    return unknown


# -- reading the parts ---------------------------------------------------------------


class _Parts:
    """Reads one model's tensors out of the archive, unpickling only as allowed."""

    def __init__(self, reader: Any, path: Path, trusted: bool) -> None:
        self.reader = reader
        self.path = path
        self.trusted = trusted

    def unpickle(self, data: bytes, part: str, member: str) -> Any:
        """A torch.save payload: weights-only unless trusted; the refusal names its imports."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "Weights only load failed" not in str(exc):
                raise LoadError(f"{str(self.path)!r}: the {part} ({member}) is damaged: {_first(exc)}") from None
        if not self.trusted:
            imports = describe_imports(unsafe_globals(io.BytesIO(data)))
            raise refuse(
                self.path,
                f"is a torch.export archive whose {part} ({member}) is a pickled Python object{imports}; "
                "unpickling it can run arbitrary code",
                _DATA_ALTERNATIVE,
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)

    def tensors(self, config_file: str, folder: str, part: str, model: str) -> dict[str, Any]:
        """The weights or constants of ``model``: raw bytes viewed as tensors (aliasing kept),
        pickled entries through ``unpickle``; non-tensor constants only when trusted."""
        from torch._export.serde.serialize import deserialize_size, deserialize_storage_offset, deserialize_stride
        from torch.export.pt2_archive import _package as package
        from torch.export.pt2_archive import constants as names

        names_in_archive = set(self.reader.get_file_names())
        legacy = f"{folder}{model}.pt"
        if legacy in names_in_archive:  # archives from torch 2.6-2.7 keep one torch.save file
            return self.unpickle(self.reader.read_bytes(legacy), part, legacy)
        config_name = config_file.format(model)
        if config_name not in names_in_archive:
            raise LoadError(f"{str(self.path)!r} is a torch.export archive without its {part} ({config_name})")
        config = package._load_payload_config(self.reader, config_name)
        flat = package._build_file_map(self.reader, config, folder)  # raw bytes only, nothing unpickled
        result: dict[str, Any] = {}
        for fqn, meta in config.config.items():
            member = f"{folder}{meta.path_name}"
            if meta.path_name.startswith(names.CUSTOM_OBJ_FILENAME_PREFIX):
                result[fqn] = self._object(member, part, torch._C._pickle_load_obj, "a TorchScript object")
            elif meta.path_name.startswith(names.OPAQUE_OBJ_FILENAME_PREFIX):
                result[fqn] = self._object(member, part, pickle.loads, "a pickled Python object")
            elif meta.use_pickle:
                result[fqn] = self.unpickle(self.reader.read_bytes(member), part, member)
            else:
                tensor_meta = meta.tensor_meta
                if tensor_meta is None:
                    raise LoadError(f"{str(self.path)!r}: {member} has no tensor metadata")
                tensor = torch.as_strided(
                    flat[meta.path_name],
                    deserialize_size(tensor_meta.sizes),
                    deserialize_stride(tensor_meta.strides),
                    deserialize_storage_offset(tensor_meta.storage_offset),
                )
                if getattr(meta, "is_param", False):
                    tensor = torch.nn.Parameter(tensor, requires_grad=tensor_meta.requires_grad)
                result[fqn] = tensor
        return result

    def _object(self, member: str, part: str, load: Any, what: str) -> Any:
        if not self.trusted:
            raise refuse(
                self.path,
                f"is a torch.export archive whose {part} ({member}) is {what}; loading it can run arbitrary code",
                _DATA_ALTERNATIVE,
            )
        return load(self.reader.read_bytes(member))

    def example_inputs(self, model: str) -> Any:
        from torch.export.pt2_archive import constants as names

        member = names.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)
        if member not in set(self.reader.get_file_names()):
            return None
        data = self.reader.read_bytes(member)
        return self.unpickle(data, "example inputs", member) if data else None


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _refuse_native_code(names_in_archive: list[str], path: Path) -> None:
    from torch.export.pt2_archive import constants as names

    folders = [getattr(names, n, None) for n in ("AOTINDUCTOR_DIR", "EXECUTORCH_DIR", "MTIA_DIR")]
    compiled = next((n for n in names_in_archive if any(f and n.startswith(f) for f in folders)), None)
    if compiled is not None:
        raise refuse(
            path,
            f"is a torch.export archive with compiled native code ({compiled}); loading it runs that code",
            _DATA_ALTERNATIVE + " without AOTInductor packaging",
        )


def _refuse_code_in_expressions(graph_bytes: bytes, path: Path) -> None:
    """Refuse a graph whose shape expressions are Python code (``gradscope.loaders.symbolic``):
    torch evaluates them with ``sympy.sympify`` while it deserialises."""
    try:
        found = first_unsafe_expression(graph_bytes)
    except ValueError as exc:
        raise LoadError(
            f"{str(path)!r} is a damaged torch.export archive: its graph is not JSON ({_first(exc)})"
        ) from None
    if found is not None:
        expression, problem = found
        shown = expression if len(expression) <= 60 else expression[:57] + "..."
        raise refuse(
            path,
            f"is a torch.export archive whose graph holds a shape expression with {problem} ({shown!r}); "
            "torch evaluates those expressions as Python (sympy.sympify) when it loads the archive",
            _DATA_ALTERNATIVE,
        )


@contextlib.contextmanager
def _log_on_error(log: list[str]) -> Iterator[None]:
    """Attach what torch logged to the LoadError (``torch_log``), for ``--debug`` to show."""
    try:
        yield
    except LoadError as exc:
        exc.torch_log = list(log)  # type: ignore[attr-defined]
        raise


def _torch_export_load(path: Path) -> Any:
    """``torch.export.load`` itself (consent given), its logging kept off stderr."""
    with captured_torch_logs() as log, _log_on_error(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.export.load(str(path))
        except Exception as exc:
            raise LoadError(f"{str(path)!r} is not a loadable torch.export archive: {_first(exc)}") from None


def load_archive(path: Path, *, trusted: bool) -> tuple[Any, list[str]]:
    """(ExportedProgram, notes) of the archive's ``model`` program.

    Raises:
        CodeRefused: a part is code and ``trusted`` is False.
        LoadError: the archive is damaged or not one torch can read (one line).
    """
    try:
        from torch._export.serde import schema
        from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass
        from torch.export.pt2_archive import _package as package
        from torch.export.pt2_archive import constants as names
    except ImportError as exc:  # an older torch: its archive layout predates pt2_archive
        if trusted:
            return _torch_export_load(path), []
        raise LoadError(
            f"this torch ({torch.__version__}) has no pt2_archive reader gradscope can use safely: {_first(exc)}; "
            "pass --trust-code to load it with torch.export.load if you trust its source"
        ) from None
    notes: list[str] = []
    with captured_torch_logs() as log, _log_on_error(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            reader = package.PT2ArchiveReader(str(path))
            archive_names = reader.get_file_names()
            version = reader.read_string(names.ARCHIVE_VERSION_PATH)
        except Exception as exc:
            raise LoadError(f"{str(path)!r} is not a readable torch.export archive: {_first(exc)}") from None
        if version != names.ARCHIVE_VERSION_VALUE:
            raise LoadError(
                f"{str(path)!r} is a torch.export archive of version {version!r}; this torch reads version "
                f"{names.ARCHIVE_VERSION_VALUE!r} (re-export it with this torch)"
            )
        if not trusted:
            _refuse_native_code(archive_names, path)
        model_file = names.MODELS_FILENAME_FORMAT.format(MODEL_NAME)
        if model_file not in archive_names:
            raise LoadError(f"{str(path)!r} is a torch.export archive without a program named {MODEL_NAME!r}")
        parts = _Parts(reader, path, trusted)
        graph_bytes = reader.read_bytes(model_file)
        if not trusted:
            _refuse_code_in_expressions(graph_bytes, path)
        try:
            serialized = _bytes_to_dataclass(schema.ExportedProgram, graph_bytes)
            unknown = plain_output_types(serialized)
            state = parts.tensors(names.WEIGHTS_CONFIG_FILENAME_FORMAT, names.WEIGHTS_DIR, "weights", MODEL_NAME)
            constants = parts.tensors(
                names.CONSTANTS_CONFIG_FILENAME_FORMAT, names.CONSTANTS_DIR, "constants", MODEL_NAME
            )
            example = parts.example_inputs(MODEL_NAME)
            program = ExportedProgramDeserializer(None).deserialize(serialized, state, constants, example)
        except LoadError:
            raise
        except Exception as exc:
            raise LoadError(
                f"{str(path)!r} is a damaged torch.export archive: {type(exc).__name__}: {_first(exc)}"
            ) from None
    if not trusted:
        check_graph_ops(program, path)
    if unknown:
        shown = ", ".join(sorted(t.rsplit(".", 1)[-1] for t in unknown))
        notes.append(f"output types not importable here ({shown}) were read as dicts with the same keys")
    return program, notes


__all__ = ["CodeRefused", "captured_torch_logs", "check_graph_ops", "export_mode", "load_archive"]
