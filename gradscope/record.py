"""What a recording holds, host side: plain dataclasses with a JSON round trip.

A *layer* is a call site: a module called twice in one forward (torchvision's
ResNet calls one ReLU module two or three times per block) gives two layers,
``relu`` and ``relu#2``, each with its own statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gradscope.liveness import UnitLiveness
from gradscope.stats import Stats
from gradscope.timeprofile import TimeProfile

ROLES = ("input", "activation", "gradient", "weight", "weight_grad")


@dataclass
class LayerRecord:
    """Everything recorded about one call site of one module."""

    name: str  # the call-site name: module name, plus "#k" for the k-th call (k >= 2)
    module: str  # the module's qualified name in the model
    type: str  # the module's class name
    index: int  # position in forward execution order
    call: int = 1  # which call of the module this is (1-based)
    output_path: str = ""  # where the recorded tensor sat in the output ("" = the output itself)
    output_shape: list[int] | None = None
    output_dtype: str | None = None
    weight_name: str | None = None  # which parameter the weight statistics describe
    weight_shape: list[int] | None = None
    fan_in: int | None = None
    fan_out: int | None = None
    parameters: int = 0  # parameters owned directly by the module
    shares_weights_with: str | None = None  # first call site of the same module
    stats: dict[str, Stats] = field(default_factory=dict)  # role -> merged statistics
    # sequence layers: role ("gradient", "input_gradient") -> RMS per time step (gradscope.sequence)
    time: dict[str, TimeProfile] = field(default_factory=dict)
    # ReLU-family layers: which units fired at least once (gradscope.liveness)
    units: UnitLiveness | None = None

    def get(self, role: str) -> Stats | None:
        return self.stats.get(role)

    @property
    def activation(self) -> Stats | None:
        return self.stats.get("activation")

    @property
    def gradient(self) -> Stats | None:
        return self.stats.get("gradient")

    @property
    def weight(self) -> Stats | None:
        return self.stats.get("weight")

    @property
    def weight_grad(self) -> Stats | None:
        return self.stats.get("weight_grad")

    @property
    def input(self) -> Stats | None:
        return self.stats.get("input")

    def add(self, role: str, stats: Stats) -> None:
        previous = self.stats.get(role)
        self.stats[role] = stats if previous is None else previous.merge(stats)

    def add_time(self, role: str, profile: TimeProfile) -> None:
        previous = self.time.get(role)
        self.time[role] = profile if previous is None else previous.merge(profile)

    def add_units(self, liveness: UnitLiveness) -> None:
        self.units = liveness if self.units is None else self.units.merge(liveness)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "index": self.index,
            "module": self.module,
            "call": self.call,
        }
        for role in ROLES:
            s = self.stats.get(role)
            out[role] = s.to_dict() if s is not None else None
        out.update(
            output_path=self.output_path,
            output_shape=self.output_shape,
            output_dtype=self.output_dtype,
            weight_name=self.weight_name,
            weight_shape=self.weight_shape,
            fan_in=self.fan_in,
            fan_out=self.fan_out,
            parameters=self.parameters,
            shares_weights_with=self.shares_weights_with,
        )
        if self.time:  # only sequence layers carry it
            out["time"] = {role: profile.to_dict() for role, profile in self.time.items()}
        if self.units is not None:  # only ReLU-family layers carry it
            out["units"] = self.units.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerRecord:
        layer = cls(
            name=data["name"],
            module=data.get("module", data["name"]),
            type=data["type"],
            index=data["index"],
            call=data.get("call", 1),
            output_path=data.get("output_path", ""),
            output_shape=data.get("output_shape"),
            output_dtype=data.get("output_dtype"),
            weight_name=data.get("weight_name"),
            weight_shape=data.get("weight_shape"),
            fan_in=data.get("fan_in"),
            fan_out=data.get("fan_out"),
            parameters=data.get("parameters", 0),
            shares_weights_with=data.get("shares_weights_with"),
        )
        for role in ROLES:
            if data.get(role) is not None:
                layer.stats[role] = Stats.from_dict(data[role])
        for role, profile in (data.get("time") or {}).items():
            layer.time[role] = TimeProfile.from_dict(profile)
        if data.get("units"):
            layer.units = UnitLiveness.from_dict(data["units"])
        return layer


@dataclass
class Record:
    """A whole recording: layers in forward execution order, plus what was missed."""

    layers: list[LayerRecord] = field(default_factory=list)
    input: Stats | None = None  # the model's (first floating) input, when there was one
    not_executed: list[str] = field(default_factory=list)  # hooked modules that never ran
    notes: list[str] = field(default_factory=list)  # things recorded partially, said once
    steps: int = 0  # flushes merged into this record
    # torch.distributed: role -> "global" (merged over ranks) or "per rank"; empty
    # for one process.  Written into every statistics block of that role.
    reduction: dict[str, str] = field(default_factory=dict)

    def layer(self, name: str) -> LayerRecord:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def state_bytes(self) -> int:
        """Bytes held by the statistics vectors: gradscope's per-run state, which
        depends on the number of layers, never on the batch size."""
        total = self.input.vector.nbytes if self.input is not None else 0
        for layer in self.layers:
            total += sum(s.vector.nbytes for s in layer.stats.values())
        return total

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def to_dict(self) -> dict[str, Any]:
        layers = [layer.to_dict() for layer in self.layers]
        data_input = self.input.to_dict() if self.input is not None else None
        if self.reduction:
            for layer in layers:
                for role, how in self.reduction.items():
                    if isinstance(layer.get(role), dict):
                        layer[role]["reduction"] = how
            if data_input is not None and "input" in self.reduction:
                data_input["reduction"] = self.reduction["input"]
        out: dict[str, Any] = {
            "layers": layers,
            "input": data_input,
            "not_executed": list(self.not_executed),
            "notes": list(self.notes),
            "steps": self.steps,
        }
        if self.reduction:
            out["reduction"] = dict(self.reduction)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        return cls(
            layers=[LayerRecord.from_dict(d) for d in data.get("layers", [])],
            input=Stats.from_dict(data["input"]) if data.get("input") else None,
            not_executed=list(data.get("not_executed", [])),
            notes=list(data.get("notes", [])),
            steps=data.get("steps", 0),
            reduction=dict(data.get("reduction", {})),
        )
