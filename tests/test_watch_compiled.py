"""A model whose hooks never fire (compiled, or traced, before watch attached) is
said to be so, once, with the fix; an eager model never hears it."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import gradscope

NO_HOOKS = "no layer was recorded although gradients arrived"


def _train(model: nn.Module, run: nn.Module, caplog: pytest.LogCaptureFixture) -> gradscope.watching.scope.Scope:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with caplog.at_level(logging.WARNING, logger="gradscope"), gradscope.watch(model) as scope:
        for _ in range(3):
            opt.zero_grad()
            run(torch.randn(4, 4)).pow(2).mean().backward()
            scope.step(opt)
            opt.step()
    return scope


def test_a_graph_traced_before_watch_attached_gets_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # torch.jit.trace, like torch.compile run before watch, holds a graph of the
    # model's parameters that never calls the hooked modules.
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, torch.randn(2, 4))
    scope = _train(model, traced, caplog)
    assert model[0].weight.grad is not None  # it did train the watched parameters
    assert scope.report().layers == []
    notes = [note for note in scope.report().record.notes if NO_HOOKS in note]
    assert len(notes) == 1 and "compile" in notes[0]
    assert sum(NO_HOOKS in r.getMessage() for r in caplog.records) == 1  # once, not per step


def test_an_eager_model_gets_no_such_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    scope = _train(model, model, caplog)
    assert [layer.name for layer in scope.report().layers] == ["0", "1", "2"]
    assert not any(NO_HOOKS in note for note in scope.report().record.notes)
    assert not any(NO_HOOKS in r.getMessage() for r in caplog.records)


# -- hooks inside torch.compile (issue 14 item 3) ---------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(16, 16), nn.ReLU())], nn.Linear(16, 2))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


@pytest.mark.slow
@pytest.mark.parametrize(("make", "shape"), [(_mlp, (8, 16)), (_cnn, (4, 3, 8, 8))])
@pytest.mark.parametrize("every", [1, 2])
def test_watched_hooks_add_no_graph_break(make: Any, shape: tuple[int, ...], every: int) -> None:
    """torch._dynamo.explain of a watched model: as many graphs and breaks as the
    same function unwatched (one graph, none), on a sampled and an unsampled step."""
    model = make()
    x = torch.randn(*shape)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        return model(batch).pow(2).mean()

    torch._dynamo.reset()
    plain = torch._dynamo.explain(loss_of)(x)
    scope = gradscope.watch(model, every=every, raise_on=(), on_finding=lambda f: None)
    try:
        for _ in range(2):  # step 0 sampled; with every=2 step 1 is not
            torch._dynamo.reset()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                watched = torch._dynamo.explain(loss_of)(x)
            # gradscope's own code traced without a word to the user (a cached helper
            # made Dynamo warn "lru_cache-wrapped function at stats.py")
            assert not [w for w in caught if "gradscope" in str(w.message) or "lru_cache" in str(w.message)]
            assert (watched.graph_count, watched.graph_break_count) == (plain.graph_count, plain.graph_break_count)
            assert watched.graph_break_count == 0, [str(r.reason)[:200] for r in watched.break_reasons]
            loss_of(x).backward()
            scope.step()
    finally:
        scope.close()


def _run(model: nn.Module, forward: Any, steps: int, every: int) -> gradscope.watching.scope.Scope:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.manual_seed(1)
    batches = [(torch.randn(8, 16), torch.randn(8, 2)) for _ in range(steps)]
    with gradscope.watch(model, every=every, raise_on=(), on_finding=lambda f: None) as scope:
        for x, y in batches:
            opt.zero_grad()
            loss = nn.functional.mse_loss(forward(x), y)
            loss.backward()
            scope.step(opt, loss=loss)
            opt.step()
    return scope


@pytest.mark.slow
def test_compiled_statistics_equal_eager_and_compile_once_per_mode() -> None:
    """The same training run eager and compiled (aot_eager: Dynamo and AOTAutograd,
    the compiler's tracing without a code generator's rounding): per-layer
    activation, weight and weight-gradient statistics and the per-step norms and
    losses agree to 1e-6; ∂ℓ/∂h is absent under compile and the record says so; the
    model compiles once per recording mode (sampled, unsampled), not once per layer."""
    from torch._dynamo.utils import counters

    eager_model, compiled_model = _mlp(), _mlp()
    eager = _run(eager_model, eager_model, steps=4, every=2)
    torch._dynamo.reset()
    counters.clear()
    compiled = _run(compiled_model, torch.compile(compiled_model, backend="aot_eager"), steps=4, every=2)
    assert counters["stats"]["unique_graphs"] <= 2
    assert any("torch.compile" in note for note in compiled.report().record.notes)
    e_flushes, c_flushes = list(eager.recent), list(compiled.recent)
    assert [f.step for f in e_flushes] == [f.step for f in c_flushes]
    assert sum(bool(f.record.layers) for f in c_flushes) == 2  # sampled steps 0 and 2
    for e_flush, c_flush in zip(e_flushes, c_flushes, strict=True):
        assert [n for _, n in c_flush.global_norms] == pytest.approx([n for _, n in e_flush.global_norms], rel=1e-6)
        assert [v for _, v in c_flush.losses] == pytest.approx([v for _, v in e_flush.losses], rel=1e-6)
        e_layers = {layer.name: layer for layer in e_flush.record.layers}
        c_layers = {layer.name: layer for layer in c_flush.record.layers}
        assert set(c_layers) == set(e_layers)
        for name, c_layer in c_layers.items():
            e_layer = e_layers[name]
            assert "gradient" in e_layer.stats and "gradient" not in c_layer.stats
            for role in ("activation", "weight", "weight_grad"):
                if role not in e_layer.stats:
                    continue
                assert torch.allclose(c_layer.stats[role].vector, e_layer.stats[role].vector, rtol=1e-6, atol=0)
