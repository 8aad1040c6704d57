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


# Where a value came from when the user typed it (click.core.ParameterSource); the
# rest are click's defaults, which never make an option "given".
_TYPED = ("COMMANDLINE", "ENVIRONMENT", "PROMPT")


@dataclass
class InputChoice:
    """The parsed input options, and which of them the user gave (``given``)."""

    input_shape: str | None
    input_dtype: str
    vocab: int | None
    inputs_file: str | None
    batches: int
    loss: str
    seed: int
    formats: str
    mode: str
    given: frozenset[str] = frozenset()

    @classmethod
    def from_command(cls, values: dict[str, Any]) -> InputChoice:
        """The choice of the running command, remembering which options were typed:
        an option that does not apply is an error only when the user gave it."""
        ctx = click.get_current_context()
        given = frozenset(name for name in values if getattr(ctx.get_parameter_source(name), "name", None) in _TYPED)
        return cls(**values, given=given)

    def check_before_loading(self) -> None:
        """What can be checked before any model code runs: the flags' values, options
        that cannot apply together, and the synthetic input's size (a memory
        estimate, before allocating anything)."""
        from gradscope.errors import InputError
        from gradscope.inputs import check_input_memory, parse_shape

        if self.inputs_file and self.input_shape:
            raise InputError("pass either --inputs or --input-shape, not both")
        self._check_applies_before_loading()
        self.formats_tuple()
        if self.input_shape:
            check_input_memory(parse_shape(self.input_shape), self.input_dtype, f"--input-shape {self.input_shape}")

    def _check_applies_before_loading(self) -> None:
        """--input-dtype and --vocab describe synthetic inputs; --vocab only integer ones."""
        from gradscope.errors import InputError

        if self.inputs_file:
            for option, name in (("--input-dtype", "input_dtype"), ("--vocab", "vocab")):
                if name in self.given:
                    raise InputError(
                        f"{option} applies to synthetic inputs, but --inputs {self.inputs_file!r} gives the inputs "
                        f"(with their own dtype); drop {option}"
                    )
        float_inputs = self.input_dtype == "float32" and ("input_dtype" in self.given or self.input_shape)
        if self.vocab is not None and float_inputs:
            raise InputError(
                f"--vocab {self.vocab} applies to int64 (token id) inputs, but the inputs are float32; "
                "pass --input-dtype int64 or drop --vocab"
            )

    def check_applied(self, run: dict[str, Any]) -> None:
        """After the audit: --input-dtype and --vocab, when given, shaped its inputs.

        Without --input-shape the inputs come from the model (its first layer, a
        TorchScript guess, a .pt2's saved example), which may decide the dtype: a
        given option the audit could not use is an error, never silently dropped.
        """
        from gradscope.errors import InputError

        synthetic = run.get("inputs") == "synthetic"
        dtype = str(run.get("input_dtype", ""))
        if not synthetic:
            reason = "the inputs saved in the model file were used"
        elif run.get("input_inferred_from"):
            reason = f"the inputs were {dtype}, read from {run['input_inferred_from']}"
        else:
            reason = f"the inputs were {dtype}"
        if "input_dtype" in self.given and dtype != self.input_dtype:
            raise InputError(
                f"--input-dtype {self.input_dtype} was not applied: {reason}; pass --input-shape with it "
                "(or drop --input-dtype)"
            )
        if self.vocab is not None and not (synthetic and not dtype.startswith(("float", "bfloat", "complex"))):
            raise InputError(
                f"--vocab {self.vocab} was not applied: {reason}; --vocab is for int64 (token id) inputs "
                "(pass --input-shape and --input-dtype int64 with it, or drop --vocab)"
            )

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
