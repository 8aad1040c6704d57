"""``gradscope.watch``: the public factory of a watched run (a ``Scope``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from gradscope.report import Finding
from gradscope.watching.scope import Scope


def watch(
    model: nn.Module,
    *,
    every: int = 1,
    log_dir: str | None = None,
    formats: Sequence[str] = ("fp16",),
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    on_finding: Callable[[Finding], Any] | None = None,
    raise_on: Sequence[str] = ("nonfinite",),
    tier: str = "full",
    sequence_modules: Mapping[str, int] | None = None,
    stop_on: Sequence[str] = (),
    record_no_grad: bool = False,
    process_group: Any = None,
) -> Scope:
    """Watch a training run; returns a Scope (also a context manager).

    Args:
        model: the model being trained.  Its numbers are never changed.
        every: sample (record per-layer statistics and flush) every N optimizer
            steps; the global gradient norm, the loss and the loss scale are
            tracked every step regardless (the norm on sampled steps only
            with ``tier="light"``).
        log_dir: write TensorBoard dashboards there (rank 0 only).
        formats: low-precision formats to check ranges against.
        include, exclude: fnmatch patterns on module names (see ``Recorder``).
        on_finding: called with each finding (a ``Finding``) when it appears,
            escalates (warning to error) or changes layers, not when it clears.
            Every alert is also logged on the ``gradscope`` logger, one short
            line, whether or not ``on_finding`` is set (silence it with
            ``logging.getLogger("gradscope").setLevel(logging.CRITICAL)``).
        raise_on: finding codes that stop training with a ``GradscopeError``;
            by default the first non-finite value.
        tier: "full" (default), or "light": only layers that own parameters,
            and gradient norms (spikes, clip advice) on sampled steps only.
            Light costs about half as much where steps are short for the
            model's size (README "Cost"); it cannot see dead or saturated
            units of parameter-free activations, nor a spike between samples.
        sequence_modules: ``{"module name": time_dim}`` for modules whose output is
            a sequence (nn.RNN/LSTM/GRU are found by themselves): gradients are
            also measured along time on sampled steps.
        stop_on: finding codes of ``scope.validation`` that stop training with a
            ``GradscopeError`` when they appear: "overfitting" (early stopping).
        record_no_grad: also record forwards run under ``torch.no_grad()`` or
            ``torch.inference_mode()`` (an evaluation loop inside the watched
            run).  By default they are not counted into the training
            statistics (the segments of a reentrant activation checkpoint,
            run under no_grad inside a training forward, still are).
        process_group: under torch.distributed, the ranks whose statistics are
            reduced at each flush (a collective: every rank of it must call
            ``step``): None, the default group; a ProcessGroup; or "none",
            per-rank statistics and no collective (docs/distributed.md).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
        >>> with watch(model, every=2) as scope:
        ...     for _ in range(4):
        ...         opt.zero_grad()
        ...         loss = model(torch.randn(16, 4)).pow(2).mean()
        ...         loss.backward()
        ...         scope.step(opt, loss=loss)
        ...         opt.step()
        >>> scope.report().run["steps"], scope.report().analysis["training"]["sampled_steps"]
        (4, 2)
    """
    return Scope(
        model,
        every=every,
        log_dir=log_dir,
        formats=formats,
        include=include,
        exclude=exclude,
        on_finding=on_finding,
        raise_on=raise_on,
        tier=tier,
        sequence_modules=sequence_modules,
        stop_on=stop_on,
        record_no_grad=record_no_grad,
        process_group=process_group,
    )
