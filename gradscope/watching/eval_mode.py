"""``train-mode-inference``: a no-grad forward with Dropout or BatchNorm in training mode.

Evaluating under ``torch.no_grad()`` / ``torch.inference_mode()`` while the model
is still in training mode is the forgotten ``model.eval()``: Dropout keeps
zeroing a fraction p of the units (and rescaling the rest by 1/(1−p)), so the
validation numbers are noisy and pessimistic — the lecture: "No dropout is
applied during inference!" — and BatchNorm normalises with the validation
batch's statistics and updates its running statistics with validation data.

Detection is one forward pre-hook on the root module: it reads the global grad
mode and a list of Python booleans (``module.training``) — no tensor is touched,
nothing is synchronised, and the forward is not recorded by this hook.  The
first such forward is remembered (step, module names); later ones are counted.
A forward that runs with gradients off inside the training step (reentrant
activation checkpointing of the *whole* model) would look the same; checkpointing
submodules does not, since the root's forward then runs with gradients on.

The mirror case, the forgotten ``model.train()`` after an evaluation, is said
under the same code (DESIGN's codes are a contract; its message says which way
the mode is wrong): the last forward before an optimizer step ran with gradients
on and the *root* module in eval mode, with Dropout (p > 0) or BatchNorm in eval
mode inside.  Dropout then regularises nothing and BatchNorm normalises with its
running statistics and never updates them.  Only the root's flag is read: a
submodule put in eval mode on purpose under a model in training mode (BatchNorm
frozen for fine-tuning) is no mistake, and a gradient forward in eval mode that
no optimizer step follows (a saliency map) is no training forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradscope.own_hooks import OwnHook
from gradscope.report import Finding, Fix, Severity

# Names listed in the finding's message and evidence (the count is exact).
MAX_NAMES = 20


def stochastic_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules whose training-mode forward differs from their eval forward: Dropout
    family (p > 0 is checked at the forward) and BatchNorm (batch statistics, running-stat updates)."""
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)):
            out.append((name or "model", module))
    return out


def _idle(module: nn.Module) -> bool:
    """In eval mode where its training-mode forward would differ (Dropout with p > 0, BatchNorm)."""
    if module.training:
        return False
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    return True


def _active(module: nn.Module) -> bool:
    if not module.training:
        return False
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    return True


class EvalModeGuard:
    """Watches the root module's forwards for the forgotten ``model.eval()``."""

    def __init__(self, model: nn.Module) -> None:
        self._modules = stochastic_modules(model)
        self._handle: Any = None
        self.count = 0  # no-grad forwards with such modules in training mode
        self.first_step: int | None = None
        self.names: list[str] = []
        self.types: list[str] = []
        self.step = 0  # the optimizer step the Scope is at (set by the Scope)
        self._reported = False
        # The mirror case: training steps whose last forward had the root in eval mode.
        self.eval_training = 0
        self.eval_first_step: int | None = None
        self.eval_names: list[str] = []
        self.eval_types: list[str] = []
        self._last_forward_idle: list[tuple[str, nn.Module]] | None = None  # of the last gradient forward
        if self._modules:
            # OwnHook: a deep copy of the model does not copy this guard with it (gradscope.own_hooks).
            self._handle = model.register_forward_pre_hook(OwnHook(self._pre_hook))

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            # A training forward (inference_mode implies grad disabled); the root in
            # eval mode is judged at the optimizer step that follows (``stepped``).
            self._last_forward_idle = None if module.training else [(n, m) for n, m in self._modules if _idle(m)]
            return
        active = [(name, m) for name, m in self._modules if _active(m)]
        if not active:
            return
        self.count += 1
        if self.first_step is None:
            self.first_step = self.step
            self.names = [name for name, _ in active[:MAX_NAMES]]
            self.types = sorted({type(m).__name__ for _, m in active})

    def stepped(self, step: int) -> None:
        """Optimizer step ``step`` was observed: its last gradient forward, if the root
        module was in eval mode with Dropout/BatchNorm idle inside, trained in eval mode."""
        idle, self._last_forward_idle = self._last_forward_idle, None
        if not idle:
            return
        self.eval_training += 1
        if self.eval_first_step is None:
            self.eval_first_step = step
            self.eval_names = [name for name, _ in idle[:MAX_NAMES]]
            self.eval_types = sorted({type(m).__name__ for _, m in idle})

    def eval_training_finding(self) -> Finding | None:
        """The forgotten ``model.train()``: training steps with the model in eval mode."""
        if self.eval_first_step is None:
            return None
        kinds = " and ".join(self.eval_types)
        return Finding(
            code="train-mode-inference",
            severity=Severity.WARNING,
            layers=list(self.eval_names),
            message=(
                f"step {self.eval_first_step}: training steps ran with the model in eval mode ({kinds}, "
                f"{len(self.eval_names)} module(s), first {self.eval_names[0]}; {self.eval_training} step(s)): a "
                "forgotten model.train() after evaluation — dropout drops nothing and BatchNorm normalises with its "
                "running statistics without updating them"
            ),
            evidence={
                "direction": "eval mode during training",
                "first_eval_mode_step": self.eval_first_step,  # "first_step" is the alert history's
                "steps": self.eval_training,
                "modules": list(self.eval_names),
                "module_types": list(self.eval_types),
            },
            fix=Fix(
                "switch back to training mode after each evaluation",
                "model.eval()\nwith torch.no_grad():\n    val_loss = evaluate(model, val_loader)\nmodel.train()",
            ),
        )

    def pending(self) -> Finding | None:
        """The finding, the first time it is asked for after the first such forward (once per run)."""
        if self.first_step is None or self._reported:
            return None
        self._reported = True
        return self.finding()

    def finding(self) -> Finding | None:
        if self.first_step is None:
            return None
        kinds = " and ".join(self.types)
        return Finding(
            code="train-mode-inference",
            severity=Severity.WARNING,
            layers=list(self.names),
            message=(
                f"step {self.first_step}: a forward under torch.no_grad()/inference_mode() ran with {kinds} "
                f"in training mode ({len(self.names)} module(s), first {self.names[0]}): a forgotten model.eval() — "
                "dropout still drops units and BatchNorm uses and updates batch statistics on this data"
            ),
            evidence={
                "first_step": self.first_step,
                "forwards": self.count,
                "modules": list(self.names),
                "module_types": list(self.types),
            },
            fix=Fix(
                "switch to eval mode for evaluation and back to training mode afterwards",
                "model.eval()\nwith torch.no_grad():\n    val_loss = evaluate(model, val_loader)\nmodel.train()",
            ),
        )

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
