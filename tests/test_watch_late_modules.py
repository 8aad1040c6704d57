"""A module added mid-run (a new head by ``add_module``, progressive growing) gets
the same hooks as the original ones: its activations are recorded and a NaN/Inf
it produces is named at it, not at a later layer or the loss.  A module removed
or replaced mid-run stops being recorded, without errors, and every hook leaves
with the scope.

The inf is put into the new layer's output by a forward hook of the test that
runs before gradscope's (``prepend=True``), as if the layer had made it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from gradscope.errors import GradscopeError
from gradscope.watching import Scope

ADDED_AT = 4
POISON_AT = ADDED_AT + 3


def poison(module: nn.Module, when: Callable[[], bool]) -> Any:
    """Make ``module``'s output inf when ``when()``, seen by every hook after this one."""

    def hook(m: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor | None:
        return out * float("inf") if when() else None

    return module.register_forward_hook(hook, prepend=True)


def run_growing(every: int, steps: int = 12) -> tuple[list[tuple[int, dict[str, Any]]], Scope, nn.Module]:
    """An MLP that grows a layer at ADDED_AT (appended to the Sequential, trained by a
    new param group); its output is made inf at POISON_AT; errors caught and the batch skipped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    caught: list[tuple[int, dict[str, Any]]] = []
    step_now = [0]
    with Scope(model, every=every) as scope:
        for step in range(steps):
            step_now[0] = step
            if step == ADDED_AT:
                model.add_module("grown", nn.Linear(4, 4))
                opt.add_param_group({"params": model.grown.parameters()})
                poison(model.grown, lambda: step_now[0] == POISON_AT)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            try:
                scope.step(opt)
            except GradscopeError as error:
                caught.append((step, dict(error.record or {})))
                opt.zero_grad()
                continue
            opt.step()
    return caught, scope, model


@pytest.mark.parametrize("every", [1, 10])
def test_a_layer_added_mid_run_is_named_where_it_makes_an_inf(every: int) -> None:
    caught, scope, _ = run_growing(every)
    assert [step for step, _ in caught] == [POISON_AT]
    record = caught[0][1]
    assert (record["layer"], record["role"], record["origin"]) == ("grown", "activation", "produced")
    names = [layer.name for layer in scope.report().record.layers]
    assert names[-1] == "grown"  # recorded after its first sampled step, in forward order
    assert scope.report().record.not_executed == []


@pytest.mark.slow
@pytest.mark.parametrize("every", [1, 3])
def test_a_new_head_outside_the_forward_of_a_gpt2_is_recorded_and_named(every: int) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    caught: list[tuple[int, dict[str, Any]]] = []
    step_now = [0]
    with Scope(model, every=every) as scope:
        for step in range(9):
            step_now[0] = step
            if step == ADDED_AT:  # an auxiliary head on the last hidden state, trained from now on
                model.add_module("aux_head", nn.Linear(32, 8))
                opt.add_param_group({"params": model.aux_head.parameters()})
                poison(model.aux_head, lambda: step_now[0] == POISON_AT)
            ids = torch.randint(0, 64, (4, 16), generator=generator)
            opt.zero_grad()
            out = model(input_ids=ids, labels=ids, output_hidden_states=True)
            loss = out.loss
            if step >= ADDED_AT:
                loss = loss + model.aux_head(out.hidden_states[-1]).square().mean()
            loss.backward()
            try:
                scope.step(opt, loss=loss)
            except GradscopeError as error:
                caught.append((step, dict(error.record or {})))
                opt.zero_grad()
                continue
            opt.step()
    assert [step for step, _ in caught] == [POISON_AT]
    record = caught[0][1]
    assert (record["layer"], record["role"]) == ("aux_head", "activation")
    head = next(layer for layer in scope.report().record.layers if layer.name == "aux_head")
    assert head.activation is not None and head.activation.count > 0


def test_a_removed_or_replaced_layer_stops_being_recorded_and_no_hook_is_left(
    assert_no_hooks: Callable[[nn.Module], None],
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4), nn.Linear(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    old_last = model[3]
    with Scope(model, every=1) as scope:
        for step in range(8):
            if step == 3:
                model[3] = nn.Linear(4, 4)  # replaced: the old one is unhooked, the new one hooked
                opt.add_param_group({"params": model[3].parameters()})
            if step == 5:
                del model[3]  # removed: no registration hook fires; it is simply never called again
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            scope.step(opt)
            opt.step()
            if step == 3:
                assert_no_hooks(old_last)
    report = scope.report()
    assert report.record.not_executed == []  # the removed layer is not "not executed"
    assert not [f for f in report.findings if f.code == "nonfinite"]
    assert_no_hooks(model)
    assert_no_hooks(old_last)
