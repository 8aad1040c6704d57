"""``gradscope.audit`` (this module is ``gradscope.auditing``, so that importing
it never shadows the function on the package): one or a few forward+backward passes, recorded and diagnosed.

The audit leaves the model exactly as it found it: train/eval flags of every
module, every buffer (BatchNorm running statistics included), every
parameter's ``.grad``, the global grad mode and the global RNG state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradscope.attention_scores import AttentionScores
from gradscope.distributed import NO_REDUCTION, data_parallel_size, resolve_group
from gradscope.errors import GradscopeError, InputError
from gradscope.experts import ExpertProbe
from gradscope.inputs import InputSpec, check_batch_not_empty, compute_loss, resolve_spec, synthetic_input
from gradscope.own_hooks import OwnHook
from gradscope.recorder import Recorder
from gradscope.report import Report

AUDIT_SAMPLE = 2**20


def model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore modes, buffers, ``.grad``, grad mode and RNG state on exit."""
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.grad for p in model.parameters()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grad_enabled = torch.is_grad_enabled()
    cuda_devices = sorted({b.device.index or 0 for b in buffers_and_params(model) if b.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)
        for p, g in grads.items():
            p.grad = g
        for m, mode in modes.items():
            m.training = mode
        torch.set_grad_enabled(grad_enabled)


def buffers_and_params(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


class _LayerTracker:
    """Knows which module is running, so an exception can name the layer.

    Pre- and post-hooks keep a stack of module names; used only around the
    audit's forward, removed with the rest.
    """

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[str] = []
        self.failed_in: str | None = None
        self._handles: list[Any] = []
        for name, module in model.named_modules():
            # OwnHook: a copy the model's forward makes of a module is not tracked (gradscope.own_hooks).
            self._handles.append(module.register_forward_pre_hook(OwnHook(self._enter(name, module))))
            self._handles.append(module.register_forward_hook(OwnHook(self._leave())))

    def _enter(self, name: str, module: nn.Module) -> Callable[..., None]:
        label = f"{name or 'model'} ({type(module).__name__})"

        def hook(mod: nn.Module, args: tuple) -> None:
            self.stack.append(label)

        return hook

    def _leave(self) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, output: Any) -> None:
            if self.stack:
                self.stack.pop()

        return hook

    def innermost(self) -> str | None:
        return self.stack[-1] if self.stack else None

    def innermost_module(self) -> tuple[str, str] | None:
        """(name, class name) of the innermost running module."""
        if not self.stack:
            return None
        name, _, kind = self.stack[-1].rpartition(" (")
        return name, kind.rstrip(")")

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _call_model(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: _to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, tuple) and hasattr(inputs, "_fields"):  # a namedtuple, e.g. a PackedSequence
        return type(inputs)(*(_to_device(v, device) for v in inputs))
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs


def _describe_inputs(inputs: Any) -> tuple[list[int] | None, str | None]:
    from gradscope.outputs import first_float_tensor

    if isinstance(inputs, torch.Tensor):
        return list(inputs.shape), str(inputs.dtype).removeprefix("torch.")
    found = first_float_tensor(inputs)
    if found is not None:
        return list(found[0].shape), str(found[0].dtype).removeprefix("torch.")
    for value in inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (list, tuple)) else []:
        if isinstance(value, torch.Tensor):
            return list(value.shape), str(value.dtype).removeprefix("torch.")
    return None, None


def audit(
    model: nn.Module,
    inputs: Any = None,
    *,
    input_shape: Sequence[int] | None = None,
    input_dtype: torch.dtype | str = torch.float32,
    vocab: int | None = None,
    loss: str | Callable[[Any], torch.Tensor] = "ce",
    batches: int = 1,
    seed: int = 0,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    formats: Sequence[str] = ("fp16",),
    mode: str = "train",
    diagnose: bool = True,
    source: str | None = None,
    model_format: str = "module",
    sequence_modules: Mapping[str, int] | None = None,
    optimizer: Any = None,
    process_group: Any = "auto",
    check_fixes: bool = True,
) -> Report:
    """Record one or more forward+backward passes of ``model`` and diagnose them.

    Args:
        model: the module to audit.  It is left exactly as it was.
        inputs: a tensor, a tuple of positional inputs or a dict of keyword
            inputs.  When None, synthetic inputs are drawn (see ``inputs.py``).
        input_shape: shape of the synthetic input, batch first; inferred from
            the first layer when it is unambiguous.
        input_dtype: float32 (N(0,1)) or int64 (ids in [0, vocab)).
        vocab: vocabulary size for int64 inputs (default: the Embedding's size).
        loss: "ce", "mse", "mean", or a callable output -> scalar.
        batches: number of forward+backward passes merged into the statistics.
            Each pass is one batch's own loss and gradient (no gradient is
            accumulated across passes, as after ``zero_grad``): every statistic,
            the weight gradient's included, is that of the N batches' values
            taken together (count N x the tensor's, moments and extremes over all).
        seed: seeds the synthetic inputs and targets and the model's own
            randomness (dropout) during the audit.
        include, exclude: fnmatch patterns choosing the layers (see Recorder).
        formats: low-precision formats whose range findings to report, among
            fp16, bf16, fp8_e4m3, fp8_e5m2.
        mode: "train" (default: dropout on, BatchNorm on batch statistics) or "eval".
        sequence_modules: ``{"module name": time_dim}`` for modules whose output is a
            sequence (besides nn.RNN/LSTM/GRU, found by themselves): their gradient is
            measured along time (``exploding-/vanishing-through-time``).
        optimizer: the optimizer that will train ``model``: its weight decay is
            audited per parameter group (``weight-decay`` findings, see
            ``gradscope.optimizer_audit``) when ``diagnose`` is true.
        process_group: under torch.distributed, whose statistics to merge:
            "auto" (default) merges over the default group only when the model
            is sharded (FSDP, DTensor parameters), where every rank must run
            the audit anyway, and otherwise runs no collective, so that
            ``if rank == 0: audit(model)`` never waits; None, the default
            group; a ProcessGroup; "none", per-rank statistics.  With a group,
            every rank of it must call ``audit``; synthetic inputs then differ
            between data-parallel ranks (seeded by ``seed`` and the rank), as
            a training batch would.
        check_fixes: try each ``poor-init`` fix on a deep copy of the model (the same
            audit, the same inputs) and withdraw the findings whose fix does not move
            the measured gain at least half-way back to the healthy band
            (``gradscope.init_cure``); skipped when the copy does not fit in memory
            and under a process group.

    Returns:
        A Report; ``report.to_dict()`` is JSON schema 1.

    Raises:
        InputError: the inputs do not fit the model, or its forward raises.

    Example:
        >>> model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
        >>> report = audit(model)
        >>> [layer.name for layer in report.layers], report.run["input_shape"]
        (['0', '1', '2'], [32, 784])
    """
    if batches < 1:
        raise InputError("--batches must be at least 1")
    if mode not in ("train", "eval"):
        raise InputError(f"mode must be 'train' or 'eval', not {mode!r}")
    parameters = sum(p.numel() for p in model.parameters())
    if parameters == 0:
        raise InputError("the model has no parameters: there is no gradient to audit")
    device = model_device(model)
    spec: InputSpec | None = None
    if inputs is None:
        spec = resolve_spec(model, input_shape, input_dtype, vocab)
    else:
        check_batch_not_empty(inputs)
        inputs = _to_device(inputs, device)

    group = resolve_group(process_group, model)
    data_seed = seed
    if group is not None and spec is not None:
        data_parallel = data_parallel_size(model, group)
        data_seed = seed + 1_000_003 * (group.rank // max(1, group.size // data_parallel))
    generator = torch.Generator().manual_seed(data_seed)
    passes: list[PassLoss] = []
    scores = AttentionScores()  # one probe over every pass: its extremes merge across them
    experts = ExpertProbe(model)  # tokens per expert of fused MoE layers, over every pass
    with preserved_state(model), experts:
        torch.manual_seed(seed)
        model.train(mode == "train")
        for p in model.parameters():
            p.grad = None
        # Exact statistics up to 2 * AUDIT_SAMPLE elements per tensor; larger
        # ones (a 224x224 ResNet's early activations) through a 1M-element
        # sample: fractions within 0.0005, the std within 0.07% (see stats).
        with Recorder(
            model,
            include=include,
            exclude=exclude,
            record_inputs=True,
            sample=AUDIT_SAMPLE,
            sequence_modules=sequence_modules,
            process_group=group if group is not None else NO_REDUCTION,
            bounded=True,  # no temporary grows with a tensor: the audit's peak is the model's
        ) as recorder:
            for _ in range(batches):
                batch = inputs if spec is None else synthetic_input(spec, generator, device)
                # Every pass starts and ends with no ``.grad``: its weight-gradient
                # statistics are of its own batch's gradient, never of a running sum.
                passes.append(_one_pass(model, recorder, batch, loss, generator, scores))
            record = recorder.finish()

    shape, dtype_name = (list(spec.shape), str(spec.dtype).removeprefix("torch.")) if spec else _describe_inputs(inputs)
    run: dict[str, Any] = {
        "input_shape": shape,
        "input_dtype": dtype_name,
        "loss": loss if isinstance(loss, str) else "custom",
        "loss_from": passes[-1].description if passes else "",
        "batches": batches,
        "seed": seed,
        "mode": mode,
        "device": str(device),
        "formats": list(formats),
        "inputs": "synthetic" if spec is not None else "given",
    }
    if spec is not None and spec.vocab is not None:
        run["vocab"] = spec.vocab
    run.update(_loss_facts(passes))
    if scores.by_module:
        run["attention_scores"] = scores.summary()
    if scores.unread:
        run["attention_scores_unread"] = scores.unread
    if experts.sites:
        run["experts"] = experts.summary()
    reduction = recorder.reduction_summary()
    if reduction != "single process":
        run["reduction"] = reduction
    if spec is not None and spec.inferred_from:
        run["input_inferred_from"] = spec.inferred_from
    report = Report(
        record=record,
        model={
            "source": source or type(model).__name__,
            "format": model_format,
            "type": type(model).__name__,
            "parameters": parameters,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        },
        run=run,
    )
    if diagnose:
        from gradscope.diagnose import diagnose as run_diagnosis

        run_diagnosis(report, model=model)
        if check_fixes and group is None:
            from gradscope.init_cure import check_init_fixes

            def reaudit(patient: nn.Module) -> Report:
                return audit(
                    patient,
                    inputs=inputs,
                    input_shape=input_shape,
                    input_dtype=input_dtype,
                    vocab=vocab,
                    loss=loss,
                    batches=batches,
                    seed=seed,
                    include=include,
                    exclude=exclude,
                    formats=formats,
                    mode=mode,
                    sequence_modules=sequence_modules,
                    process_group="none",
                    check_fixes=False,
                )

            check_init_fixes(report, model, device, reaudit)
        if optimizer is not None:
            from gradscope.optimizer_audit import add_optimizer_audit

            add_optimizer_audit(report, optimizer, model)
    return report


@dataclass
class PassLoss:
    """What one pass's loss says about the run (``compute_loss``)."""

    description: str
    value: float  # this process's loss on its batch
    classes: int | None  # softmax cross-entropy built by gradscope: the class count
    logits: int | None  # and the element count of the logits it read


def _loss_facts(passes: list[PassLoss]) -> dict[str, Any]:
    """The run's loss entries: the mean loss over the passes, and for a cross-entropy
    gradscope built, the class count and logits size (``diagnose.logits`` reads them)."""
    if not passes:
        return {}
    facts: dict[str, Any] = {"loss_value": sum(p.value for p in passes) / len(passes)}
    if passes[-1].classes is not None:
        facts["loss_classes"] = passes[-1].classes
        facts["loss_logits"] = passes[-1].logits
    return facts


def _one_pass(
    model: nn.Module,
    recorder: Recorder,
    batch: Any,
    loss: str | Callable[[Any], torch.Tensor],
    generator: torch.Generator,
    scores: AttentionScores | None = None,
) -> PassLoss:
    """Forward, loss, backward, parameter capture; errors become one-line InputErrors.

    Expects every ``.grad`` to be None and leaves it so: the weight gradient
    recorded is this batch's alone (``.grad`` accumulates across backwards, so a
    gradient left over would be added to the next pass's).
    """
    tracker = _LayerTracker(model)
    recorder.start()
    try:
        with torch.enable_grad():
            with contextlib.ExitStack() as stack:
                if scores is not None:
                    scores.where = tracker.innermost_module  # this pass's modules
                    stack.enter_context(scores)
                output = _call_model(model, batch)
    except (GradscopeError, KeyboardInterrupt):
        raise
    except Exception as exc:
        where = tracker.innermost()
        at = f" in {where}" if where else ""
        raise InputError(f"the model's forward raised{at}: {type(exc).__name__}: {_first_line(exc)}") from exc
    finally:
        recorder.stop()
        tracker.close()
    with torch.enable_grad():
        result = compute_loss(output, loss, generator)
    del output
    if not result.loss.requires_grad:
        recorder.record.note("the loss does not require grad: no parameter is trainable, so no gradient was recorded")
    else:
        release = _GradientRelease(model, recorder, result.loss)
        try:
            result.loss.backward()
        except Exception as exc:
            raise InputError(f"the backward pass raised: {type(exc).__name__}: {_first_line(exc)}") from exc
        finally:
            release.close()
    # Weights, and the gradients not captured (and released) during backward.
    recorder.capture_parameters()
    for param in model.parameters():
        param.grad = None  # every gradient of this pass is recorded: none reaches the next pass
    recorder.flush()
    # One host read per pass, after the backward: an audit is not a hot path.
    return PassLoss(result.description, float(result.loss.detach()), result.classes, result.logits)


class _GradientRelease:
    """Takes each recorded weight's gradient statistics as soon as backward has
    accumulated it, then frees every parameter's ``.grad``.

    A plain forward+backward ends holding one gradient per parameter; with this
    the audit holds one at a time (preserved_state restores the caller's
    ``.grad`` afterwards), so its peak memory is at most the plain step's
    (``benchmarks/memory.py --audit``).  The statistics are those of the same
    ``.grad`` read after backward: the hook runs once the gradient is whole.

    Only where ``.grad`` is the whole, final gradient when the hook runs: one
    process with plain parameters (DDP, FSDP and DTensor write or reduce
    gradients after accumulation), and a backward in which no reentrant
    activation checkpoint runs an inner backward (that accumulates a shared
    parameter's gradient twice); otherwise nothing is registered and gradients
    are read after backward as before.
    """

    def __init__(self, model: nn.Module, recorder: Recorder, loss: torch.Tensor) -> None:
        self._handles: list[Any] = []
        if not _releasable(model, loss):
            return
        sites: dict[int, list[str]] = {}
        for layer in recorder.record.layers:
            ref = recorder.weight_ref(layer.name)
            param = ref.registered() if ref is not None else None
            if param is not None:
                sites.setdefault(id(param), []).append(layer.name)
        seen: set[int] = set()
        for param in model.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                self._handles.append(
                    param.register_post_accumulate_grad_hook(self._hook(recorder, sites.get(id(param))))
                )

    @staticmethod
    def _hook(recorder: Recorder, keys: list[str] | None) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if keys:
                recorder.capture_parameters(weights=False, grads=True, only=keys)
            param.grad = None

        return hook

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _releasable(model: nn.Module, loss: torch.Tensor) -> bool:
    from gradscope.distributed import is_distributed

    if is_distributed() or not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
        return False
    if any(type(p) is not nn.Parameter for p in model.parameters()):
        return False  # DTensor, FSDP1 flat parameters, other subclasses: gradients written elsewhere
    return not _has_inner_backward(loss)


def _has_inner_backward(loss: torch.Tensor) -> bool:
    """Whether the graph holds a reentrant checkpoint (``torch.utils.checkpoint``
    with ``use_reentrant=True``), whose backward runs a backward of its own."""
    stack = [loss.grad_fn]
    visited: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"
