"""The watch's lifecycle, found wrong in a field trial (/tmp/field_watch), one class each:

* a caught ``GradscopeError`` switched off every later stop: the documented way to
  drop a bad batch (catch, ``zero_grad``, no ``optimizer.step``, go on) let the next
  non-finite step or spike through, and ``optimizer.step`` made the weights NaN.
  Every new event must raise again, at its own step, before ``optimizer.step``,
  naming its own layer, at every ``every`` and on every rank alike;
* gradscope's module hooks went with ``copy.deepcopy(model)`` (an EMA / teacher
  copy fed the scope: call sites ``0#2``, the copy's extremes) and made
  ``torch.save(model)`` / pickle fail on a local closure.  A copy, deep or
  pickled, must carry no live gradscope hook (``gradscope.own_hooks``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import io
import math
import pickle
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from watch_steps import Poison, batch

import gradscope
from gradscope.errors import GradscopeError
from gradscope.own_hooks import INERT
from gradscope.watching.episodes import MAX_LATER

EVERIES = [1, 3, 10]


def _quiet(finding: Any) -> None:
    """on_finding for runs whose alerts are not under test."""


def poisonable_model() -> nn.Sequential:
    """6 -> 16 -> 3 with a ``Poison`` as layer "1" (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), Poison(), nn.Linear(16, 3))


def skipping_loop(
    model: nn.Sequential,
    scope: gradscope.watching.Scope,
    steps: int,
    nan_input: set[int] = frozenset(),  # type: ignore[assignment]
    nan_layer: set[int] = frozenset(),  # type: ignore[assignment]
    spikes: set[int] = frozenset(),  # type: ignore[assignment]
) -> list[dict[str, Any]]:
    """SGD steps that drop a batch whose ``scope.step`` raised (catch, no optimizer.step,
    go on): the record of each error caught, with the step that raised it.  ``nan_input``:
    steps whose batch holds a NaN; ``nan_layer``: steps at which layer "1" outputs NaN;
    ``spikes``: steps whose targets are 1000x (a spiky batch)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    caught = []
    for step in range(steps):
        x, y = batch(step)
        if step in nan_input:
            x[0, 0] = math.nan
        if step in spikes:
            y = y * 1000.0
        model[1].on = step in nan_layer
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        try:
            scope.step(opt, loss=loss)
        except GradscopeError as error:
            caught.append({"raised_at": step, **error.record})
            continue
        opt.step()
    return caught


def finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# -- 1. every caught stop is followed by the next one ----------------------------------

# (first bad step, by a NaN batch: layer "0" receives it; second, by layer "1"
# producing one).  Steps 4, 5 follow each other: no finite sampled step in between
# (one episode) at every=3 and 10; 6 is sampled at every=3; 9 is sampled at every=3
# and not at every=10.
PAIRS = [(4, 5), (6, 9), (3, 10)]


@pytest.mark.parametrize("every", EVERIES)
@pytest.mark.parametrize("first,second", PAIRS)
def test_each_caught_nonfinite_step_is_followed_by_a_stop_at_the_next_one(every: int, first: int, second: int) -> None:
    model = poisonable_model()
    with gradscope.watch(model, every=every, on_finding=_quiet) as scope:
        caught = skipping_loop(model, scope, second + 2, nan_input={first}, nan_layer={second})
    # Each raised in its own step's scope.step, before optimizer.step, naming its own layer.
    assert [(c["raised_at"], c["step"], c["layer"], c["role"], c["origin"]) for c in caught] == [
        (first, first, "0", "activation", "received"),
        (second, second, "1", "activation", "produced"),
    ]
    assert finite(model)  # both bad batches were dropped: no NaN reached the weights
    report = scope.report()
    assert report.analysis["training"]["first_nonfinite"]["step"] == first  # the first stays the first
    (finding,) = [f for f in report.findings if f.code == "nonfinite"]
    assert finding.evidence["step"] == first
    assert finding.evidence["later_nonfinite_steps"] == [second]


@pytest.mark.parametrize("every", EVERIES)
def test_a_user_who_catches_and_still_applies_the_update_is_stopped_at_every_step(every: int) -> None:
    """Caught, but optimizer.step applied anyway (a loop that ignores the error): the
    weights are NaN from then on, and each later step raises, one error per step.  The
    report lists the first MAX_LATER later steps and counts them all."""
    model = poisonable_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    raised = []
    with gradscope.watch(model, every=every, on_finding=_quiet) as scope:
        for step in range(26):
            x, y = batch(step)
            if step == 2:
                x[0, 0] = math.nan
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            with contextlib.suppress(GradscopeError):
                try:
                    scope.step(opt, loss=loss)
                except GradscopeError as error:
                    raised.append((step, error.record["step"]))
                    raise
            opt.step()
    assert raised == [(step, step) for step in range(2, 26)]
    report = scope.report()
    assert report.analysis["training"]["first_nonfinite"]["step"] == 2
    (finding,) = [f for f in report.findings if f.code == "nonfinite"]
    assert MAX_LATER == 20
    assert finding.evidence["later_nonfinite_steps"] == list(range(3, 3 + MAX_LATER))
    assert finding.evidence["later_nonfinite_count"] == 23  # steps 3..25


@pytest.mark.parametrize("every", EVERIES)
def test_each_spike_and_a_later_nan_stop_again_after_a_caught_spike(every: int) -> None:
    """The 'skip spiky batches' recipe: raise_on spikes and NaN.  Spikes at 18 and 19
    (one after the other: the finding is still active, no new alert) and 22, a NaN
    batch at 24: four stops, each at its step.  The spike detector needs
    SPIKE_MIN_HISTORY = 16 norms first (gradscope.watching.norms)."""
    model = poisonable_model()
    with gradscope.watch(model, every=every, raise_on=("nonfinite", "gradient-spike"), on_finding=_quiet) as scope:
        caught = skipping_loop(model, scope, 26, nan_input={24}, spikes={18, 19, 22})
    codes = [(c["raised_at"], c.get("code") or c.get("role")) for c in caught]
    assert codes == [(18, "gradient-spike"), (19, "gradient-spike"), (22, "gradient-spike"), (24, "activation")]
    # Each spike error names its own step, 1000x targets: a norm far above 4x the median (SPIKE_RATIO).
    assert [c["evidence"]["step"] for c in caught[:3]] == [18, 19, 22]
    assert all(c["evidence"]["ratio_to_median"] > 4.0 for c in caught[:3])
    assert finite(model)


# -- 2. copies of a watched model carry no live gradscope hook --------------------------


def is_inert(hook: Any) -> bool:
    """``INERT`` or an unpickled copy of it (a partial of the same function and event)."""
    return isinstance(hook, functools.partial) and (hook.func, hook.args, hook.keywords) == (
        INERT.func,
        INERT.args,
        INERT.keywords,
    )


def hooks_of(model: nn.Module) -> list[Any]:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [hook for m in model.modules() for kind in kinds for hook in getattr(m, kind).values()]


def ema_run(every: int = 1) -> tuple[nn.Module, nn.Module, Any]:
    """The field's EMA / teacher pattern: a deep copy made inside the watch, run with
    grad mode on, on a 100x larger input, between the model's forward and backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, every=every, on_finding=_quiet) as scope:
        ema = copy.deepcopy(model)
        for p in ema.parameters():
            p.requires_grad_(False)
        for step in range(4):
            x, y = batch(step)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            ema(100 * torch.randn(32, 6, generator=torch.Generator().manual_seed(step)))
            loss.backward()
            scope.step(opt, loss=loss)
            opt.step()
    return model, ema, scope


def unwatched_absmax() -> dict[str, float]:
    """The absmax of each layer's output over the same 4 steps, measured by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    top = dict.fromkeys(("0", "1", "2"), 0.0)
    for step in range(4):
        x, y = batch(step)
        h0 = model[0](x)
        h1 = model[1](h0)
        out = model[2](h1)
        for name, value in zip(top, (h0, h1, out), strict=True):
            top[name] = max(top[name], float(value.detach().abs().max()))
        opt.zero_grad()
        nn.functional.mse_loss(out, y).backward()
        opt.step()
    return top


def test_a_deep_copy_made_inside_the_watch_does_not_feed_the_scope() -> None:
    model, ema, scope = ema_run()
    layers = {layer.name: layer for layer in scope.report().record.layers}
    assert sorted(layers) == ["0", "1", "2"]  # no call sites "0#2"...: the copy's forwards are not the model's
    expected = unwatched_absmax()
    for name, layer in layers.items():
        activation = layer.stats["activation"]
        assert activation.count == 4 * 8 * (3 if name == "2" else 16)  # 4 steps x 8 rows x features
        assert activation.absmax == pytest.approx(expected[name], rel=1e-6)  # not the copy's 100x input
    assert hooks_of(model) == []  # close() removed every hook from the watched model
    assert all(hook is INERT for hook in hooks_of(ema))  # the copy's are inert


def test_a_deep_copy_does_not_keep_the_scope_alive_and_computes_as_an_unhooked_copy() -> None:
    model, ema, scope = ema_run()
    recorder = weakref.ref(scope._recorder)
    del scope
    gc.collect()
    assert recorder() is None  # the copy's hooks referenced a recorder (the original's, or a deep copy of it)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(7))
    clean = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    clean.load_state_dict(ema.state_dict())
    assert torch.equal(ema(x), clean(x))  # an inert hook leaves the numbers alone


class _NoGradscope(pickle.Unpickler):
    """Unpickles as where gradscope is not installed: a checkpoint must not need it."""

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "gradscope":
            raise ModuleNotFoundError(f"{module}.{name}: gradscope is not installed here")
        return super().find_class(module, name)


def test_torch_save_and_pickle_of_a_watched_model_work_and_load_without_gradscope() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, every=1, on_finding=_quiet) as scope:
        buffer = io.BytesIO()
        torch.save(model, buffer)  # failed: "Can't pickle local object 'Recorder._forward_hook.<locals>.hook'"
        data = pickle.dumps(model)
        loaded = _NoGradscope(io.BytesIO(data)).load()
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=False)
        for step in range(3):
            x, y = batch(step)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loaded(x)
            saved(x)
            loss.backward()
            scope.step(opt, loss=loss)
            opt.step()
    layers = {layer.name: layer for layer in scope.report().record.layers}
    assert sorted(layers) == ["0", "1", "2"]  # the watched model itself is still recorded, the copies are not
    assert layers["0"].stats["activation"].count == 3 * 8 * 16
    assert hooks_of(model) == []
    for copied in (loaded, saved):
        assert hooks_of(copied) and all(is_inert(hook) for hook in hooks_of(copied))


@contextlib.contextmanager
def module_hooks_registered() -> Iterator[list[Any]]:
    """Every hook registered on any module while inside (torch's registration methods wrapped)."""
    seen: list[Any] = []
    originals = {name: getattr(nn.Module, name) for name in ("register_forward_hook", "register_forward_pre_hook")}

    def wrap(original: Any) -> Any:
        def register(module: nn.Module, hook: Any, *args: Any, **kwargs: Any) -> Any:
            seen.append(hook)
            return original(module, hook, *args, **kwargs)

        return register

    try:
        for name, original in originals.items():
            setattr(nn.Module, name, wrap(original))
        yield seen
    finally:
        for name, original in originals.items():
            setattr(nn.Module, name, original)


def test_every_module_hook_gradscope_registers_is_inert_in_a_copy() -> None:
    """The class: the recorder's root and layer hooks, the eval-mode guard (a model with
    Dropout), a sequence pre-hook, the audit's layer tracker, the init fix's hooks."""
    from gradscope import audit
    from gradscope.fix import lsuv

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.1), nn.ReLU(), nn.Linear(16, 3))
    with module_hooks_registered() as seen:
        with gradscope.watch(model, every=1, on_finding=_quiet, sequence_modules={"0": 0}) as scope:
            x, y = batch(0)
            nn.functional.mse_loss(model(x), y).backward()
            scope.step()
        audit(model, input_shape=(8, 6))
        lsuv(model, torch.randn(64, 6, generator=torch.Generator().manual_seed(1)))
    assert len(seen) >= 5
    for hook in seen:
        assert copy.deepcopy(hook) is INERT, hook
        assert is_inert(pickle.loads(pickle.dumps(hook))), hook


# -- 1b. under torch.distributed, every rank stops at the same steps -------------------

# every -> (rank 1's NaN loss value, rank 1's layer "1" producing NaN, steps run).  A NaN
# loss value (loss + NaN * loss.detach()) leaves the gradients finite, so a step that is
# not stopped at once (every > 1: the stop comes at the next sampled step,
# gradscope.watching.agreement) does not spoil the weights before the second event.
DISTRIBUTED_BAD = {1: (2, 5, 6), 3: (4, 8, 10), 10: (4, 12, 21)}


def _distributed_stops(rank: int) -> dict[str, Any]:
    import torch.distributed as dist  # noqa: F401  (the group is joined by in_gloo_group)

    from tests.test_distributed import WORLD

    out: dict[str, Any] = {}
    for every, (loss_bad, layer_bad, steps) in DISTRIBUTED_BAD.items():
        model = poisonable_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        caught = []
        with gradscope.watch(model, every=every, on_finding=_quiet) as scope:
            for step in range(steps):
                x, y = batch(step)
                rows = slice(rank * 8 // WORLD, (rank + 1) * 8 // WORLD)
                model[1].on = rank == 1 and step == layer_bad
                opt.zero_grad()
                loss = nn.functional.mse_loss(ddp(x[rows]), y[rows])
                if rank == 1 and step == loss_bad:
                    loss = loss + math.nan * loss.detach()  # this rank's loss value alone; d/dθ unchanged
                loss.backward()
                try:
                    scope.step(opt, loss=loss)
                except GradscopeError as error:
                    caught.append([step] + [error.record.get(k) for k in ("step", "layer", "role", "rank")])
                    continue
                opt.step()
        out[str(every)] = caught
    return out


def _distributed_worker(rank: int, port: int, out_dir: str) -> None:
    from tests.test_distributed import in_gloo_group

    in_gloo_group(rank, port, out_dir, lambda: _distributed_stops(rank))


@pytest.mark.slow
def test_under_a_group_every_rank_stops_again_at_the_same_steps(tmp_path: Any) -> None:
    """Rank 1 alone goes bad twice; both ranks catch and skip.  Both stop at both events
    (each at its step with every=1, else at the next sampled step), with one record."""
    from tests.test_distributed import run_ranks

    ranks = run_ranks(_distributed_worker, (), tmp_path, "lifecycle")
    for every, (loss_bad, layer_bad, _) in DISTRIBUTED_BAD.items():

        def stop(step: int, every: int = every) -> int:
            return step if step % every == 0 else (step // every + 1) * every

        expected = [[stop(loss_bad), loss_bad, None, "loss"], [stop(layer_bad), layer_bad, "1", "activation"]]
        assert ranks[0][str(every)] == ranks[1][str(every)], every  # the same decision on every rank
        assert [c[:4] for c in ranks[0][str(every)]] == expected, every
