"""Hostile model files the consent tests build themselves (no tests here).

Every payload, when it runs, creates a marker file through
``torch.from_file(marker, shared=True, size=n)`` - the same primitive that lets
a model file create or overwrite any file - and still yields a usable tensor,
so that with ``--trust-code`` the file loads and audits as a benign one would.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


class _FromFile:
    """Unpickles as ``torch.from_file(marker, True, numel)``: the marker file appears."""

    def __init__(self, marker: Path, numel: int) -> None:
        self.marker, self.numel = str(marker), numel

    def __reduce__(self):  # noqa: ANN204
        return (torch.from_file, (self.marker, True, self.numel))


class FileTensor:
    """Unpickles as a zero tensor of ``shape`` (a Parameter when asked) after creating ``marker``."""

    def __init__(self, marker: Path, shape: tuple[int, ...], parameter: bool = False) -> None:
        self.marker, self.shape, self.parameter = marker, tuple(shape), parameter

    def __reduce__(self):  # noqa: ANN204
        tensor = _Reshaped(self.marker, self.shape)
        return (nn.Parameter, (tensor,)) if self.parameter else tensor.__reduce__()


class _Reshaped:
    def __init__(self, marker: Path, shape: tuple[int, ...]) -> None:
        self.marker, self.shape = marker, shape

    def __reduce__(self):  # noqa: ANN204
        return (torch.Tensor.reshape, (_FromFile(self.marker, math.prod(self.shape)), self.shape))


def torch_save_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# -- .pt2 archives ---------------------------------------------------------------------


class Scaled(nn.Module):
    """fc, a lifted tensor constant and a zeros() call: one archive with every part to poison."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(12, 5)
        self.scale = torch.ones(5)  # a plain attribute: exported as the constant "scale"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale + torch.zeros(5)


def export_scaled(path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(Scaled(), (torch.randn(4, 12),))
        torch.export.save(program, str(path))
    return path


def rewrite_archive(source: Path, target: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
    """Copy a .pt2 archive record by record through torch's own reader and writer, editing the records."""
    from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter

    reader = PT2ArchiveReader(str(source))
    records = {name: reader.read_bytes(name) for name in reader.get_file_names()}
    edit(records)
    skip = {".data/version", ".data/serialization_id", "byteorder"}  # the writer adds its own
    with PT2ArchiveWriter(str(target)) as writer:
        for name, data in records.items():
            if name not in skip:
                writer.write_bytes(name, data)
    return target


def _pickled_entry(records: dict[str, bytes], config: str, fqn: str, member: str, payload: bytes) -> None:
    folder = config.rsplit("/", 1)[0]
    data = json.loads(records[config])
    data["config"][fqn]["use_pickle"] = True
    data["config"][fqn]["path_name"] = member
    records[config] = json.dumps(data).encode()
    records[f"{folder}/{member}"] = payload


def poison_weights(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(records: dict[str, bytes]) -> None:
        payload = torch_save_bytes(FileTensor(marker, (5, 12), parameter=True))
        _pickled_entry(records, "data/weights/model_weights_config.json", "fc.weight", "weight_evil", payload)

    return edit


def poison_constants(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(records: dict[str, bytes]) -> None:
        payload = torch_save_bytes(FileTensor(marker, (5,)))
        _pickled_entry(records, "data/constants/model_constants_config.json", "scale", "tensor_evil", payload)

    return edit


def poison_example_inputs(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(records: dict[str, bytes]) -> None:
        records["data/sample_inputs/model.pt"] = torch_save_bytes(((FileTensor(marker, (4, 12)),), {}))

    return edit


def graph_calls_from_file(marker: Path) -> Callable[[dict[str, bytes]], None]:
    """The graph's ``aten.zeros(5)`` becomes ``aten.from_file(marker, shared=True, size=5)``."""

    def edit(records: dict[str, bytes]) -> None:
        program = json.loads(records["models/model.json"])
        node = next(n for n in program["graph_module"]["graph"]["nodes"] if n["target"].endswith("aten.zeros.default"))
        node["target"] = "torch.ops.aten.from_file.default"
        node["inputs"] = [
            {"name": "filename", "arg": {"as_string": str(marker)}, "kind": 1},
            {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
            {"name": "size", "arg": {"as_int": 5}, "kind": 1},
        ]
        records["models/model.json"] = json.dumps(program).encode()

    return edit


def shape_expression_runs(marker: Path) -> Callable[[dict[str, bytes]], None]:
    """One tensor size of the graph, ``{"as_int": n}``, becomes a symbolic expression that
    torch's deserialiser hands to ``sympy.sympify``, which evaluates it as Python."""

    def edit(records: dict[str, bytes]) -> None:
        program = json.loads(records["models/model.json"])
        values = program["graph_module"]["graph"]["tensor_values"]
        meta = next(iter(values.values()))
        size = meta["sizes"][0]["as_int"]
        payload = f"__import__('pathlib').Path({str(marker)!r}).touch() or Integer({size})"
        meta["sizes"][0] = {"as_expr": {"expr_str": payload, "hint": {"as_int": size}}}
        records["models/model.json"] = json.dumps(program).encode()

    return edit


def with_native_code(records: dict[str, bytes]) -> None:
    records["data/aotinductor/model/model.so"] = b"\x7fELF not really"


# -- TorchScript -------------------------------------------------------------------------


class _Trigger(nn.Module):
    """Its TorchScript ``__setstate__`` runs at ``torch.jit.load`` and creates ``marker``."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.marker = state[0]
        touched = torch.from_file(self.marker, True, 1)
        self.training = state[1] or bool(touched.numel() < 0)  # uses the result: not dead code


class ScriptedWriter(nn.Module):
    """forward creates ``<marker>.forward``; the trigger child creates ``<marker>`` at load."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.marker = marker
        self.trigger = _Trigger(marker)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        touched = torch.from_file(self.marker + ".forward", True, 1)
        return self.fc2(torch.relu(self.fc1(self.trigger(x)))) + touched.sum() * 0


def save_scripted_writer(path: Path, marker: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(ScriptedWriter(str(marker))), str(path))
    return path


# -- pickles ------------------------------------------------------------------------------


def pickled_module(path: Path, marker: Path) -> Path:
    """torch.save(model) of an nn.Sequential whose first weight is the payload."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    model[0]._parameters["weight"] = FileTensor(marker, (16, 12), parameter=True)  # type: ignore[assignment]
    torch.save(model, path)
    return path


def state_dict_payload(reference: nn.Module, marker: Path) -> dict[str, Any]:
    state: dict[str, Any] = dict(reference.state_dict())
    state["fc1.weight"] = FileTensor(marker, tuple(state["fc1.weight"].shape))
    return state


@dataclass
class Case:
    """One hostile file: the CLI arguments naming it, the markers its code creates."""

    name: str
    args: list[str]
    load_markers: list[Path]  # created while loading (trusted)
    run_markers: list[Path] = field(default_factory=list)  # created when the model runs (trusted audit)
    refused_even_trusted: bool = False  # --inputs: never unpickled beyond tensors

    @property
    def markers(self) -> list[Path]:
        return self.load_markers + self.run_markers


def pickle_dump(obj: Any, path: Path) -> Path:
    with path.open("wb") as handle:
        pickle.dump(obj, handle)
    return path
