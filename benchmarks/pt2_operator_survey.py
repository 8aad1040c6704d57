"""Which operators real ``torch.export`` graphs call: the survey behind the ``.pt2`` allow-list.

``gradscope audit model.pt2`` loads an archive as data only when every operator
its graph calls is on an allow-list (``gradscope/loaders/pt2_operators.py``).
This script regenerates that list:

1. it exports a range of real models built from configs (transformers GPT-2,
   Llama, BERT, T5, ViT, Whisper, wav2vec2, ...; diffusers' UNet2DModel; MONAI;
   plain CNN/RNN/LSTM/GRU; dynamic batch and sequence sizes), each with
   ``torch.export.export`` in eval and train mode, and again after
   ``run_decompositions()``, and collects every ATen/prims operator name their
   graphs (subgraphs included) call;
2. it adds the core ATen operator set (operators tagged ``torch.Tag.core``, the
   opset ``run_decompositions()`` targets), which validate sizes, strides and
   indices against their tensors;
3. it drops every operator the loader's memory rule refuses whatever the list
   says (``gradscope.loaders.pt2.unchecked_memory``: sparse/nested layouts,
   ``unsafe`` arguments, file arguments, ...), and writes the rest.

Run:  PYTHONPATH=. python benchmarks/pt2_operator_survey.py [--check]
``--check`` writes nothing and exits 1 when a surveyed operator is missing from
the committed list (a new torch or transformers emitting something new).
Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gradscope.loaders.pt2 import unchecked_memory  # noqa: E402
from tests.real_architectures import ARCHITECTURES  # noqa: E402

LIST_FILE = ROOT / "gradscope" / "loaders" / "pt2_operators.py"
# Operators torch's own tracing and decompositions emit in ordinary graphs that the
# surveyed exports happen not to call: views and splits that check their sizes and
# skip only autograd's alias tracking (``_unsafe_view`` is what matmul and einsum
# decompose to; ``unsafe_split``/``unsafe_chunk`` are split/chunk without views).
CHECKED_EXTRAS = frozenset(
    {"aten::_unsafe_view", "aten::unsafe_split", "aten::unsafe_split_with_sizes", "aten::unsafe_chunk"}
)
SURVEYED_NAMESPACES = ("aten", "prims")


# -- models beyond tests/real_architectures.py --------------------------------------


class _Recurrent(nn.Module):
    def __init__(self, kind: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = kind(8, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.GELU(), nn.Dropout(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10), nn.LogSoftmax(dim=-1),
    )  # fmt: skip


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 64), nn.Tanh(), nn.Linear(64, 64), nn.Sigmoid(), nn.LayerNorm(64), nn.SiLU(),
        nn.Linear(64, 10),
    )  # fmt: skip


class _Upsampler(nn.Module):
    """Upsampling, transposed convolution, concatenation and padding: decoder parts."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.out = nn.Conv2d(11, 3, 1)
        self.norm = nn.GroupNorm(2, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.leaky_relu(self.norm(self.down(x)))
        y = torch.cat([self.up(h), nn.functional.interpolate(x, scale_factor=1.0, mode="nearest")], dim=1)
        z = nn.functional.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        return nn.functional.pad(self.out(z), (1, 1, 1, 1))


class _DataDependent(nn.Module):
    """Sizes read from data (nonzero, item): unbacked symbols, their range asserts and
    size queries; a tensor constant made in forward; everyday indexing and reductions."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        found = torch.nonzero(x > 0).shape[0]
        torch._check(found >= 0)
        top = x.topk(2, dim=-1).values.sum(-1, keepdim=True)
        picked = x.gather(1, x.argmax(-1, keepdim=True)) + x.masked_fill(x < 0, 0.0).cumsum(-1)[:, -1:]
        scale = torch.tensor([2.0]) * x.abs().max().item()
        hot = nn.functional.one_hot(x.argsort(-1)[:, 0], 8).float()
        h = torch.where(x > 0, x, hot) + scale
        folded = x.reshape(x.shape[0] // 2, -1).repeat(2, 1)[: x.shape[0] // 2].reshape(x.shape)
        return self.fc(folded + h) + top + picked + found


def _tokens(vocab: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))


def _example(kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    shape = tuple(kwargs["input_shape"])
    if kwargs.get("input_dtype") == torch.int64:
        return (_tokens(kwargs.get("vocab", 16), shape),)
    return (torch.randn(shape, generator=torch.Generator().manual_seed(0)),)


Case = tuple[str, Callable[[], nn.Module], tuple[Any, ...], Any]


def _exportable(model: nn.Module) -> nn.Module:
    """A causal LM as one exports it: without the key/value cache (a DynamicCache
    output is no pytree type, so torch.export refuses it)."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False
    return model


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def cases() -> Iterator[Case]:
    """(name, model builder, example inputs, dynamic_shapes) for every surveyed export."""
    for name, build in ARCHITECTURES.items():
        model, kwargs = build()
        model = _exportable(model)
        yield name, (lambda m=model: m), _example(kwargs), None
    yield "mlp", _mlp, (torch.randn(4, 784),), None
    yield "cnn", _cnn, (torch.randn(4, 3, 16, 16),), None
    yield "upsampler", _Upsampler, (torch.randn(2, 3, 16, 16),), None
    yield "data_dependent", _DataDependent, (torch.randn(4, 8),), None
    for kind in (nn.RNN, nn.LSTM, nn.GRU):
        yield kind.__name__.lower(), (lambda k=kind: _Recurrent(k)), (torch.randn(3, 5, 8),), None
    batch = torch.export.Dim("batch", min=2, max=64)
    seq = torch.export.Dim("seq", min=2, max=60)
    yield "cnn_dynamic_batch", _cnn, (torch.randn(4, 3, 16, 16),), ({0: batch},)
    # nn.LSTM specialises the sequence length when exported: only its batch is dynamic.
    yield "lstm_dynamic_batch", (lambda: _Recurrent(nn.LSTM)), (torch.randn(3, 5, 8),), ({0: batch},)
    yield "encoder_dynamic", _encoder, (torch.randn(2, 10, 32),), ({0: batch, 1: seq},)
    gpt2 = _exportable(ARCHITECTURES["hf_gpt2"]()[0])
    yield "hf_gpt2_dynamic", (lambda: gpt2), (_tokens(128, (2, 16)),), ({0: batch, 1: seq},)
    llama = _exportable(ARCHITECTURES["hf_llama"]()[0])
    yield "hf_llama_dynamic", (lambda: llama), (_tokens(128, (2, 16)),), ({1: seq},)


# -- collecting operators --------------------------------------------------------------


def operator_names(program: Any) -> set[str]:
    """``namespace::name`` of every OpOverload the program's graphs (and subgraphs) call,
    directly or as an argument (``auto_functionalized(op, ...)``)."""
    import torch.utils._pytree as pytree

    found: set[str] = set()
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            for target in [node.target, *pytree.tree_leaves((node.args, node.kwargs))]:
                if isinstance(target, torch._ops.OpOverload):
                    found.add(str(target._schema.name))
                elif target is node.target or isinstance(target, torch._ops.HigherOrderOperator):
                    # Python callables and higher-order operators: the loader allows these by
                    # name (gradscope.loaders.pt2), so they are reported, not listed.
                    found.add(f"python::{getattr(target, '__module__', '?')}.{getattr(target, '__name__', target)}")
    return found


def survey(modes: tuple[str, ...] = ("eval", "train")) -> tuple[dict[str, set[str]], list[str]]:
    """operator -> the exports that call it; and the exports that failed (named, with why)."""
    seen: dict[str, set[str]] = {}
    failed: list[str] = []
    for name, build, example, dynamic in cases():
        for mode in modes:
            model = build().train(mode == "train")
            label = f"{name}[{mode}]"
            variants: dict[str, Any] = {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # torch 2.13's run_decompositions fails on GPT-2 in eval mode (it re-traces a
                # view of the non-contiguous attention output); the export itself is kept.
                for variant, make in ((label, None), (f"{label}+decomposed", label)):
                    try:
                        if make is None:
                            variants[variant] = torch.export.export(model, example, dynamic_shapes=dynamic)
                        elif label in variants:
                            variants[variant] = variants[label].run_decompositions()
                    except Exception as exc:  # reported, not fatal
                        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                        failed.append(f"{variant}: {type(exc).__name__}: {first}"[:100].rstrip())
            for variant, exported in variants.items():
                for op in operator_names(exported):
                    seen.setdefault(op, set()).add(variant)
            print(f"surveyed {label}: {len(seen)} operators so far", file=sys.stderr)
    return seen, failed


def core_aten() -> set[str]:
    """The core ATen opset: every aten operator with an overload tagged ``torch.Tag.core``."""
    names: set[str] = set()
    for packet_name in dir(torch.ops.aten):
        packet = getattr(torch.ops.aten, packet_name, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            op = getattr(packet, overload)
            if torch.Tag.core in op.tags:
                names.add(str(op._schema.name))
                break
    return names


def refused_by_rule(name: str) -> bool:
    """Whether the loader's memory rule refuses every overload of ``name``, or any of them."""
    namespace, _, base = name.partition("::")
    packet = getattr(getattr(torch.ops, namespace), base, None)
    if packet is None:
        return True
    return any(unchecked_memory(getattr(packet, o)._schema) for o in packet.overloads())


def render(surveyed: dict[str, set[str]], core: set[str], failed: list[str]) -> tuple[str, list[str]]:
    """The text of pt2_operators.py, and the surveyed operators the rule refuses (reported)."""
    kept_survey = {n for n in surveyed if n.split("::")[0] in SURVEYED_NAMESPACES and not refused_by_rule(n)}
    refused = sorted(n for n in surveyed if n not in kept_survey and not n.startswith("python::"))
    kept_core = {n for n in core | CHECKED_EXTRAS if not refused_by_rule(n)} - kept_survey
    lines = [
        '"""The operators a ``.pt2`` graph may call when gradscope loads it as data.',
        "",
        "Generated by benchmarks/pt2_operator_survey.py (do not edit by hand; rerun it):",
        f"torch {torch.__version__}; the union of the operators that real exports call",
        "(SURVEYED) and the core ATen opset with a few checked views (CORE), less every",
        "operator the loader's memory rule refuses (gradscope.loaders.pt2.unchecked_memory).",
        "Names are ``namespace::name``; every overload of a listed name is allowed unless",
        "the rule refuses that overload.",
        '"""',
        "",
        "# Called by the surveyed exports (torch.export.export, and after run_decompositions()).",
        "SURVEYED = frozenset(",
        "    {",
        *[f'        "{n}",' for n in sorted(kept_survey)],
        "    }",
        ")",
        "# The rest of the core ATen opset (torch.Tag.core), and the checked views and splits",
        "# torch's decompositions emit (CHECKED_EXTRAS in the survey): sizes, strides, indices checked.",
        "CORE = frozenset(",
        "    {",
        *[f'        "{n}",' for n in sorted(kept_core)],
        "    }",
        ")",
        "ALLOWED = SURVEYED | CORE",
        "",
    ]
    if failed:
        lines[8:8] = ["", "Exports that failed in the survey (their operators are not in it):"] + [
            f"  {f}" for f in failed
        ]
    return "\n".join(lines), refused


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed list, write nothing")
    args = parser.parse_args()
    surveyed, failed = survey()
    text, refused = render(surveyed, core_aten(), failed)
    for name in refused:
        print(f"refused by the memory rule although exports call it: {name} ({sorted(surveyed[name])[:3]})")
    for line in failed:
        print(f"export failed: {line}")
    others = sorted(n for n in surveyed if n.startswith("python::"))
    print(f"non-ATen call targets (allowed by name in gradscope.loaders.pt2): {', '.join(others) or 'none'}")
    if args.check:
        from gradscope.loaders.pt2_operators import ALLOWED

        missing = sorted(n for n in surveyed if n not in ALLOWED and n not in refused and n not in others)
        for name in missing:
            print(f"not on the committed list: {name} (called by {sorted(surveyed[name])[:3]})")
        return 1 if missing else 0
    LIST_FILE.write_text(text)
    print(f"wrote {LIST_FILE.relative_to(ROOT)}: {len(surveyed)} surveyed operators")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
