"""The every-step gradient norms taken in backward, while each gradient is still
in the caches (gradscope.watching.hot_norms): the same numbers as a read at
``scope.step``, measured again whenever the gradient changed in between, and
nothing kept alive."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch
from torch import nn

from gradscope.watching import Scope, step_norms
from gradscope.watching.training_state import TrainingState


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)


def _true_norm(model: nn.Module) -> float:
    return float(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None) ** 0.5)


class _Watched:
    """A watched run that records, per step, the norm gradscope read, the norm of
    the gradients ``optimizer.step`` saw (float64), and how many gradients were
    measured at ``scope.step`` instead of in backward."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.read: dict[int, float] = {}
        self.measured_at_step: list[int] = []
        real_read = TrainingState._read_norm

        def read_norm(state: TrainingState, t: int, norm: float, out: object) -> None:
            self.read[t] = norm
            real_read(state, t, norm, out)  # type: ignore[arg-type]

        real_squared = step_norms.squared_norms

        def squared(tensors: list[torch.Tensor]) -> torch.Tensor:
            self.measured_at_step.append(len(tensors))
            return real_squared(tensors)

        monkeypatch.setattr(TrainingState, "_read_norm", read_norm)
        monkeypatch.setattr(step_norms, "squared_norms", squared)

    def run(
        self,
        model: nn.Module,
        steps: int,
        between: Callable[[int, nn.Module], None] = lambda step, model: None,
        micro_batches: int = 1,
    ) -> list[float]:
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        dtype = next(model.parameters()).dtype
        truth = []
        with Scope(model, every=1, diagnose=False) as scope:
            for step in range(steps):
                opt.zero_grad(set_to_none=True)
                for micro in range(micro_batches):
                    x, y = (t.to(dtype) for t in _batch(10 * step + micro))
                    nn.functional.mse_loss(model(x), y).backward()
                between(step, model)
                truth.append(_true_norm(model))
                self.measured_at_step.append(-1)  # marks the step boundary
                scope.step(opt)
                opt.step()
        self.hooks_left = sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
        return truth

    def step_measurements(self) -> list[int]:
        """Gradients measured at scope.step, per step (0: every one was taken in backward)."""
        counts: list[int] = []
        for n in self.measured_at_step:
            if n == -1:
                counts.append(0)
            elif counts:
                counts[-1] += n
        return counts


def test_norms_taken_in_backward_equal_the_gradients_the_optimizer_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    watched = _Watched(monkeypatch)
    model = _model()
    truth = watched.run(model, 6)
    assert [watched.read[t] for t in range(6)] == pytest.approx(truth, rel=1e-6)
    # step 0 finds the parameters (the hooks are placed then); from step 1 on every
    # gradient's square comes from its hook
    assert watched.step_measurements() == [4, 0, 0, 0, 0, 0]
    assert watched.hooks_left == 0


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda model: nn.utils.clip_grad_norm_(model.parameters(), 1e-3), id="clip_grad_norm_"),
        pytest.param(lambda model: [p.grad.mul_(1024.0) for p in model.parameters()], id="in-place-scale"),
        pytest.param(lambda model: [setattr(p, "grad", p.grad * 3.0) for p in model.parameters()], id="new-grad"),
        pytest.param(lambda model: model[0].weight.grad.add_(1.0), id="one-parameter"),
    ],
)
def test_a_gradient_changed_after_backward_is_measured_again(
    monkeypatch: pytest.MonkeyPatch, change: Callable[[nn.Module], object]
) -> None:
    """Clipping, unscaling, a replaced or edited ``.grad`` between backward and
    ``scope.step``: the norm read is the changed gradients', not the hook's."""
    watched = _Watched(monkeypatch)
    model = _model()

    def between(step: int, model: nn.Module) -> None:
        if step == 3:
            change(model)

    truth = watched.run(model, 5, between)
    assert [watched.read[t] for t in range(5)] == pytest.approx(truth, rel=1e-6)
    counts = watched.step_measurements()
    assert counts[3] >= 1 and counts[4] == 0  # measured again at the changed step only


def test_gradient_accumulation_turns_the_hooks_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two backwards per step: the hook would run per micro-batch, so the first
    repeat switches to measuring at ``scope.step``; the norms are the accumulated
    gradients'."""
    watched = _Watched(monkeypatch)
    model = _model()
    truth = watched.run(model, 4, micro_batches=2)
    assert [watched.read[t] for t in range(4)] == pytest.approx(truth, rel=1e-6)
    assert watched.step_measurements() == [4, 4, 4, 4]


def test_half_precision_parameters_are_measured_at_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    watched = _Watched(monkeypatch)
    model = _model().to(torch.bfloat16)
    truth = watched.run(model, 3)
    assert [watched.read[t] for t in range(3)] == pytest.approx(truth, rel=1e-3)
    assert watched.step_measurements() == [4, 4, 4]


def test_no_gradient_is_kept_alive() -> None:
    """The hooks remember a weak reference: a gradient set to None is freed."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Scope(model, every=1, diagnose=False) as scope:
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            x, y = _batch(step)
            nn.functional.mse_loss(model(x), y).backward()
            scope.step(opt)
            opt.step()
        grad = weakref.ref(model[0].weight.grad)
        opt.zero_grad(set_to_none=True)
        gc.collect()
        assert grad() is None
