"""Options shared by ``audit`` and ``fix``: which model, which inputs.

Only click here; the values are turned into library calls inside the
commands (``prepare``), where importing torch is fine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

LOSSES = ("ce", "mse", "mean")
INPUT_DTYPES = ("float32", "int64")


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """MODEL argument plus --arch and --trust-code (alias --trust-pickle)."""
    decorators = [
        click.argument("model", metavar="MODEL"),
        click.option(
            "--arch",
            metavar="SPEC",
            help="Factory building the architecture for a state_dict or safetensors MODEL "
            "(file.py:factory or package.module:factory).",
        ),
        click.option(
            "--trust-code",
            "--trust-pickle",
            "trust_code",
            is_flag=True,
            help="Allow a model file that is code: a pickled module (torch.save(model)), a TorchScript file, "
            "a .pt2 part that needs full unpickling or calls non-tensor operators. Without it such files are "
            "refused before any of their code runs; pass it only for files you trust. --trust-pickle is an alias. "
            "--inputs files are always read weights-only.",
        ),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def input_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The synthetic/given input and loss options of DESIGN.md's CLI contract."""
    decorators = [
        click.option(
            "--input-shape",
            metavar="32,784",
            help="Input shape, batch first (inferred from the first layer when unambiguous).",
        ),
        click.option(
            "--input-dtype",
            type=click.Choice(INPUT_DTYPES),
            default="float32",
            show_default=True,
            help="float32 inputs ~ N(0, 1); int64 ids uniform in [0, vocab).",
        ),
        click.option("--vocab", type=click.IntRange(min=1), metavar="N", help="Vocabulary size for int64 inputs."),
        click.option(
            "--inputs",
            "inputs_file",
            metavar="FILE",
            help="A tensor, tuple or dict of tensors saved with torch.save (read with weights_only=True).",
        ),
        click.option(
            "--batches",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Forward+backward passes merged into the statistics.",
        ),
        click.option(
            "--loss",
            type=click.Choice(LOSSES),
            default="ce",
            show_default=True,
            help="ce: uniform class targets; mse: N(0,1) targets; mean: the output's mean.",
        ),
        click.option(
            "--seed",
            type=int,
            default=0,
            show_default=True,
            help="Seed for inputs, targets, dropout and the factory's random init.",
        ),
        click.option(
            "--formats",
            default="fp16",
            show_default=True,
            metavar="fp16,bf16,...",
            help="Low-precision formats to check ranges against (fp16, bf16, fp8_e4m3, fp8_e5m2).",
        ),
        click.option(
            "--mode",
            type=click.Choice(("train", "eval")),
            default="train",
            show_default=True,
            help="Module mode during the audit (dropout, BatchNorm).",
        ),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


@dataclass
class InputChoice:
    """The parsed input options."""

    input_shape: str | None
    input_dtype: str
    vocab: int | None
    inputs_file: str | None
    batches: int
    loss: str
    seed: int
    formats: str
    mode: str

    def check_before_loading(self) -> None:
        """What can be checked before any model code runs: the flags' values and
        the synthetic input's size (a memory estimate, before allocating anything)."""
        from gradscope.errors import InputError
        from gradscope.inputs import check_input_memory, parse_shape

        if self.inputs_file and self.input_shape:
            raise InputError("pass either --inputs or --input-shape, not both")
        self.formats_tuple()
        if self.input_shape:
            check_input_memory(parse_shape(self.input_shape), self.input_dtype, f"--input-shape {self.input_shape}")

    def formats_tuple(self) -> tuple[str, ...]:
        from gradscope.errors import InputError
        from gradscope.formats import FORMAT_NAMES as known

        formats = tuple(f.strip().replace("-", "_") for f in self.formats.split(",") if f.strip())
        unknown = [f for f in formats if f not in known]
        if unknown:
            raise InputError(f"--formats: unknown format {unknown[0]!r}; choose among {', '.join(known)}")
        return formats or ("fp16",)

    def audit_kwargs(self) -> tuple[Any, dict[str, Any]]:
        """(inputs, keyword arguments for ``audit``), validated with one-line InputErrors."""
        from gradscope.inputs import check_batch_not_empty, parse_shape

        self.check_before_loading()
        inputs = None
        if self.inputs_file:
            from gradscope.loaders import load_inputs

            inputs = load_inputs(self.inputs_file)
            check_batch_not_empty(inputs, f"inputs file {self.inputs_file!r}")
        kwargs: dict[str, Any] = {
            "input_shape": parse_shape(self.input_shape) if self.input_shape else None,
            "input_dtype": self.input_dtype,
            "vocab": self.vocab,
            "loss": self.loss,
            "batches": self.batches,
            "seed": self.seed,
            "formats": self.formats_tuple(),
            "mode": self.mode,
        }
        return inputs, kwargs


def optimizer_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """--optimizer SPEC: a planned optimizer whose weight decay the audit checks (grammar: gradscope.optim_spec)."""
    return click.option(
        "--optimizer",
        metavar="SPEC",
        help='Check a planned optimizer\'s weight decay, e.g. "adamw:lr=1e-3,weight_decay=0.01" '
        "(NAME[:key=value,...] over torch.optim classes; tuples as (0.9,0.999)).",
    )(func)


def parse_optimizer_option(spec: str | None) -> Any:
    """The parsed --optimizer SPEC (before any model is loaded), or None."""
    if spec is None:
        return None
    from gradscope.optim_spec import parse_optimizer_spec

    return parse_optimizer_spec(spec)


def audit_planned_optimizer(report: Any, model: Any, planned: Any) -> None:
    """Build the planned optimizer over ``model`` and add its weight-decay audit to ``report``."""
    from gradscope.optimizer_audit import add_optimizer_audit

    params = [p for p in model.parameters() if p.requires_grad]
    add_optimizer_audit(report, planned.build(params), model)
