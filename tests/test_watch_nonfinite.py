"""The first non-finite step and layer, whatever ``every``: the per-step check
(gradscope.watching.nonfinite) stops the run at the step that went non-finite,
before ``optimizer.step()``, with the same name at every sampling rate."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from watch_steps import NanInBackward, batch, blowup_model, train

import gradscope
from gradscope.errors import GradscopeError
from gradscope.watching import Scope, nonfinite

EVERIES = [1, 4, 10, 50]
INFINITE_BATCH = torch.full((8, 6), float("inf"))  # an evaluation batch, seen under no_grad before each step


def where(record: dict) -> tuple:
    return record["step"], record["layer"], record["role"], record["origin"]


def stopping_record(model: nn.Module, make_scope: Any, set_bad: Any, bad_step: int = 5) -> dict:
    """Train 8 SGD steps under ``make_scope()`` with ``set_bad(step == bad_step)`` before
    each forward; the record of the GradscopeError that must stop the run."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(GradscopeError) as info:
        with make_scope() as scope:
            for step in range(8):
                set_bad(step == bad_step)
                x, y = batch(step)
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                scope.step(opt)
                opt.step()
    return info.value.record


@pytest.mark.parametrize("every", EVERIES)
def test_inf_activation_stops_at_its_step_with_one_name_at_every_rate(every: int) -> None:
    model = blowup_model(at=7)
    completed: list[int] = []
    with pytest.raises(GradscopeError) as info:
        with gradscope.watch(model, every=every) as scope:
            train(model, scope, 30, completed=completed)
    assert completed == list(range(7))  # step 7 raised in its scope.step: its optimizer.step never ran
    assert where(info.value.record) == (7, "1", "activation", "produced")
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    report = scope.report()
    nonfinite_findings = [f for f in report.findings if f.code == "nonfinite"]
    assert len(nonfinite_findings) == 1 and nonfinite_findings[0].layers == ["1"]
    assert report.analysis["training"]["first_nonfinite"]["step"] == 7


@pytest.mark.parametrize("every", [10, 50])
def test_a_run_ending_before_the_next_sampled_step_still_stops(every: int) -> None:
    model = blowup_model(at=7)
    with pytest.raises(GradscopeError) as info:
        with gradscope.watch(model, every=every) as scope:
            train(model, scope, 8)  # steps 0..7: step 7 is the last, unsampled
    assert where(info.value.record) == (7, "1", "activation", "produced")
    assert scope.closed


class LateEvent:
    """An accelerator's copy that has not landed until someone waits for it."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def test_on_an_accelerator_the_flag_is_read_late_and_close_checks_the_pending_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where reading a device value would stall the queue, the flag is read once it
    landed; close() waits for the flags still in flight and raises for them."""
    monkeypatch.setattr(nonfinite, "reads_are_free", lambda device: False)
    monkeypatch.setattr(nonfinite, "_completion_event", lambda device: LateEvent())
    model = blowup_model(at=7)
    scope = gradscope.watch(model, every=10)
    assert train(model, scope, 8) == 8  # no stall: the step-7 flag was not read yet
    with pytest.raises(GradscopeError) as info:
        scope.close()
    record = info.value.record
    assert where(record) == (7, "1", "activation", "produced")
    assert "one step late" in record["read"]
    assert scope.closed and scope.report().findings[0].code == "nonfinite"


@pytest.mark.parametrize("every", EVERIES)
def test_an_overflowing_global_norm_over_finite_gradients_is_no_event_at_every_rate(every: int) -> None:
    """Gradients of ~1e30 are finite elements whose float32 sum of squares is inf:
    no NaN/Inf (gradscope.watching.overflow), so the step is not stopped and its
    true norm is reported; the update it makes blows the next step up, and that
    step is the one named, at every rate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    with pytest.raises(GradscopeError) as info:
        with Scope(model, every=every, diagnose=False) as scope:
            train(model, scope, 20, loss_scale=lambda step: 1e30 if step == 5 else 1.0)
    record = info.value.record
    assert record["step"] == 6 and record["origin"] == "produced"
    training = scope.report().analysis["training"]
    assert training["norm_overflow_steps"] == 1
    assert 1e28 < training["global_grad_norm_max"] < 1e33  # the true norm, not inf
    codes = [f.code for f in scope.report().findings]
    assert codes.count("nonfinite") == 1 and "gradient-spike" not in codes


@pytest.mark.parametrize("every", [1, 4])
def test_a_nan_made_in_backward_is_named_at_the_same_layer(every: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), NanInBackward(poison=False), nn.Tanh(), nn.Linear(16, 3))
    scope = Scope(model, every=every, diagnose=False)
    record = stopping_record(model, lambda: scope, lambda bad: setattr(model[1], "poison", bad))
    assert (record["step"], record["layer"]) == (5, "0")
    # sampled: ∂ℓ/∂h of 0 is recorded; unsampled: its weight gradient, received from it
    assert (record["role"], record["origin"]) == (
        ("gradient", "produced") if every == 1 else ("weight_grad", "received")
    )
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert scope.closed


class Wrapper(nn.Module):
    """A LightningModule-like owner: training calls ``self.net`` directly, so the
    watched model's own forward (and its input statistics) never runs."""

    def __init__(self, first: nn.Module) -> None:
        super().__init__()
        self.net = nn.Sequential(first, nn.Tanh(), nn.Linear(16, 3))


class InfFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 16)
        self.poison = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        return out * float("inf") if self.poison else out


@pytest.mark.parametrize("every", [1, 4])
@pytest.mark.parametrize("bad_input", [False, True])
def test_missing_model_input_statistics_are_not_evidence(every: int, bad_input: bool) -> None:
    torch.manual_seed(0)
    first = InfFirst()
    model = Wrapper(first)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(GradscopeError) as info:
        with Scope(model, every=every, diagnose=False, include=["net.0", "net.1", "net.2"]) as scope:
            for step in range(8):
                scope.mark_forward()  # what the Lightning callback does per batch
                x, y = batch(step)
                if step == 5:
                    if bad_input:
                        x[0, 0] = float("nan")
                    else:
                        first.poison = True
                opt.zero_grad()
                nn.functional.mse_loss(model.net(x), y).backward()
                scope.step(opt)
                opt.step()
    record = info.value.record
    assert (record["step"], record["layer"], record["role"]) == (5, "net.0", "activation")
    # the input of net.0 was observed (the sentinel takes each forward's first input)
    assert record["origin"] == ("received" if bad_input else "produced")


def test_a_weight_made_non_finite_by_the_update_keeps_that_diagnosis_in_the_final_report() -> None:
    """The watch's own record (weight, produced by the previous optimizer update) wins
    over the whole-run diagnosis, which cannot tell who produced it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, every=10, raise_on=()) as scope:
        for step in range(25):
            x, y = batch(step)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            scope.step(opt)
            opt.step()
            if step == 3:  # an update that writes NaN into a weight (fp16 AdamW's eps underflow does)
                with torch.no_grad():
                    model[2].weight[0, 0] = float("nan")
    report = scope.report()
    nonfinite_findings = [f for f in report.findings if f.code == "nonfinite"]
    assert len(nonfinite_findings) == 1
    finding = nonfinite_findings[0]
    assert (finding.evidence["step"], finding.evidence["layer"], finding.evidence["role"]) == (4, "2", "weight")
    assert "previous optimizer update" in finding.message
    assert "model input" not in finding.message


def test_unsampled_steps_cost_one_op_per_hooked_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hot-path budget: on an unsampled step the hooks add one ``aminmax`` per
    hooked output plus one for the forward's input, each written into preallocated
    rows (``out=``: nothing allocated per layer), and nothing else (no sum, no read);
    the Tanh between the Linears reads the output just flagged and cannot make it
    non-finite, so it costs nothing (``passes_finite``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sums: list[tuple[int, ...]] = []
    extremes: list[tuple[tuple[int, ...], bool]] = []
    real_sum, real_aminmax = torch.sum, torch.aminmax

    def counting_sum(t: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        sums.append(tuple(t.shape))
        return real_sum(t, *args, **kwargs)  # type: ignore[arg-type]

    def counting_aminmax(t: torch.Tensor, *args: object, **kwargs: object) -> object:
        extremes.append((tuple(t.shape), kwargs.get("out") is not None))
        return real_aminmax(t, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "sum", counting_sum)
    monkeypatch.setattr(torch, "aminmax", counting_aminmax)
    with Scope(model, every=4, diagnose=False) as scope:
        for step in range(3):
            sums.clear()
            extremes.clear()
            x, y = batch(step)
            opt.zero_grad()
            out = model(x)
            forward_sums, forward_extremes = list(sums), list(extremes)
            nn.functional.mse_loss(out, y).backward()
            scope.step(opt)
            opt.step()
    # step 2 is unsampled: the 2 Linear outputs + the input of layer 0, one aminmax each into the rows
    assert forward_sums == []
    assert sorted(forward_extremes) == [((8, 3), True), ((8, 6), True), ((8, 16), True)]


def test_the_flag_reads_fp8_without_widening_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """An fp8 output's flag is its float32 sum read in fp8 (no fp32 copy of the tensor;
    aminmax has no fp8 kernel), and a NaN in it (0x7F in e4m3fn) makes the flag non-finite."""
    from gradscope.watching.nonfinite import FlagBuffer, _flags

    x = torch.randn(4096).to(torch.float8_e4m3fn)
    widened: list[torch.dtype] = []
    real_float = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda t: widened.append(t.dtype) or real_float(t))
    buffer = FlagBuffer(torch.device("cpu"))
    clean = _flags(x, buffer)
    x[17] = float("nan")
    dirty = _flags(x, buffer)
    assert widened == []
    assert clean is not None and dirty is not None and buffer.used == 2
    assert all(torch.isfinite(cell) for cell in clean) and not torch.isfinite(dirty[0])
    assert not torch.isfinite(buffer.total())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_flags_are_exact_for_finite_values_of_any_size(dtype: torch.dtype) -> None:
    """The extremes of finite values are finite however large they are or however
    many there are (2,048 values at the dtype's maximum, whose float32 sum is inf
    but for fp16;
    an attention mask filled with finfo.min looks like this); one inf or NaN
    element makes the flag non-finite.  The rows grow past their capacity and the
    step's total (float64) stays finite."""
    from gradscope.watching.nonfinite import FlagBuffer, _flags

    buffer = FlagBuffer(torch.device("cpu"), capacity=1)
    top = torch.finfo(dtype).max
    huge = torch.full((2048,), top, dtype=dtype)
    if top * 2048 > torch.finfo(torch.float32).max:  # fp16's maximum sums finitely
        assert float(huge.sum(dtype=torch.float32)) == float("inf")
    masked = torch.full((2048,), -top, dtype=dtype)
    flags = [_flags(huge, buffer), _flags(masked, buffer)]
    assert buffer.used == 2  # grown past its capacity of 1
    assert all(f is not None and torch.isfinite(f[0]) and torch.isfinite(f[1]) for f in flags)
    total = buffer.total()
    assert total.dtype == torch.float64 and torch.isfinite(total)
    for bad in (float("inf"), float("-inf"), float("nan")):
        spoiled = huge.clone()
        spoiled[1234] = bad
        lo, hi = _flags(spoiled, buffer)  # type: ignore[misc]
        assert not (torch.isfinite(lo) and torch.isfinite(hi)), bad
    assert not torch.isfinite(buffer.total())


def test_the_flag_reads_nothing_on_the_host_inside_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing a flag reads no value back (no item/tolist/cpu/numpy/bool): the
    CPU runs the code an accelerator runs."""
    from test_no_sync import host_sync_forbidden

    from gradscope.watching.nonfinite import FlagBuffer, _flags

    buffer = FlagBuffer(torch.device("cpu"))
    with host_sync_forbidden(monkeypatch):
        for dtype in (torch.float32, torch.bfloat16, torch.float8_e4m3fn):
            assert _flags(torch.ones(64).to(dtype), buffer) is not None
        buffer.total()


class Shrink(nn.Module):
    """Scales by 1e-36: keeps a huge (finite) activation of the layer before out of the loss."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1e-36


@pytest.mark.parametrize("every", [1, 4])
def test_an_output_whose_float32_sum_overflows_stops_nothing(every: int) -> None:
    """Every element finite, the float32 sum past float32's maximum (2,048 x 2e35):
    the run neither stops nor reports a non-finite value, and no step is searched
    (the flags are extremes, which finite values never push to inf)."""
    torch.manual_seed(0)
    big = nn.Linear(6, 2048)
    with torch.no_grad():
        big.weight.fill_(2e35 / 6)
        big.bias.zero_()
    model = nn.Sequential(big, Shrink(), nn.Linear(2048, 3))
    x = torch.ones(8, 6)
    with torch.no_grad():
        assert torch.isfinite(big(x)).all() and float(big(x).sum(dtype=torch.float32)) == float("inf")
    opt = torch.optim.SGD(model[2].parameters(), lr=0.0)  # the weights stay as they are
    calls: list[object] = []
    import gradscope.watching.episodes as episodes

    real_locate = episodes.locate_step

    def counting_locate(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return real_locate(*args, **kwargs)  # type: ignore[arg-type]

    episodes.locate_step = counting_locate  # type: ignore[assignment]
    try:
        with Scope(model, every=every, raise_on=("nonfinite",), diagnose=False) as scope:
            for _ in range(6):
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), torch.zeros(8, 3))
                loss.backward()
                scope.step(opt, loss=loss)
                opt.step()
            report = scope.report()
    finally:
        episodes.locate_step = real_locate  # type: ignore[assignment]
    assert [f.code for f in report.findings if f.code == "nonfinite"] == []
    assert calls == []


@pytest.mark.parametrize("every", [1, 4, 10])
def test_the_per_step_check_skips_the_forwards_the_recorder_skips(every: int) -> None:
    # Blowup counts every call: the training forward of step s is its call 2s+2.
    model = blowup_model(at=2 * 7 + 1)
    with pytest.raises(GradscopeError) as info:
        with gradscope.watch(model, every=every) as scope:
            train(model, scope, 30, evaluation=INFINITE_BATCH)
    # The infinite evaluation batches are not the training run's: the first bad step is
    # the training forward's own, named as without them.
    assert where(info.value.record) == (7, "1", "activation", "produced")


@pytest.mark.parametrize("every", [1, 4])
def test_with_record_no_grad_the_per_step_check_counts_evaluation_forwards(every: int) -> None:
    model = blowup_model(at=None)
    with pytest.raises(GradscopeError) as info:
        with gradscope.watch(model, every=every, record_no_grad=True) as scope:
            train(model, scope, 30, evaluation=INFINITE_BATCH)
    assert info.value.record["step"] == 0
    assert info.value.record["origin"] == "received"  # from the infinite evaluation input


class _LogBetween(nn.Module):
    """Linear -> torch.log (a functional op, not a hooked layer) -> ReLU -> Linear;
    at forward ``at`` the log reads negative pre-activations (NaN): the NaN is made
    between two hooked layers, and the ReLU is the first hooked layer showing it."""

    def __init__(self, at: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.at, self.calls = at, 0
        self.fc1, self.act, self.fc2 = nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = torch.log(h) if self.calls == self.at else torch.log(h.abs() + 1.0)
        self.calls += 1
        return self.fc2(self.act(h))


@pytest.mark.parametrize("every", EVERIES)
def test_a_passive_layer_fed_by_unhooked_code_is_still_flagged(every: int) -> None:
    """A layer that cannot make NaN (ReLU) is skipped only when its input is the
    output flagged just before; here its input comes from ``torch.log``, so the
    ReLU is flagged and named at step 5, sampled (every=1) or not (every>1)."""
    model = _LogBetween(at=5)
    with pytest.raises(GradscopeError) as info:
        with gradscope.watch(model, every=every) as scope:
            train(model, scope, 12)
    assert where(info.value.record)[:3] == (5, "act", "activation")


class _ReluChain(nn.Module):
    """Linear -> ReLU -> GELU -> Linear -> Sigmoid, with the second Linear's weight
    set to 3e38 at step ``at`` (finite; its output overflows to +inf, which the
    Sigmoid after it turns back into 1); a passive chain before it."""

    def __init__(self, at: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.at, self.calls = at, 0
        self.fc1, self.relu, self.gelu = nn.Linear(6, 16), nn.ReLU(), nn.GELU()
        self.fc2, self.out = nn.Linear(16, 3), nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calls == self.at:
            with torch.no_grad():
                self.fc2.weight.fill_(3e38)
        self.calls += 1
        return self.out(self.fc2(self.gelu(self.relu(self.fc1(x)))))


@pytest.mark.parametrize("every", EVERIES)
def test_passive_layers_skipped_on_unsampled_steps_name_the_same_producer(every: int) -> None:
    """The skipped ReLU/GELU/Sigmoid change nothing in the naming: the first bad
    output is fc2's at step 5, produced, at every rate (sampled step at every=1,
    unsampled at 4, 10, 50)."""
    model = _ReluChain(at=5)
    with pytest.raises(GradscopeError) as info:
        with gradscope.watch(model, every=every) as scope:
            train(model, scope, 12)
    assert where(info.value.record) == (5, "fc2", "activation", "produced")


def test_passes_finite_covers_torch_layers_only() -> None:
    """torch.nn's bounded layers pass; scaling (Dropout, SELU, a steep LeakyReLU),
    averaging and log layers, parametrised layers and user subclasses do not."""

    class MyReLU(nn.ReLU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(x)

    passing = [nn.ReLU(inplace=True), nn.GELU(), nn.SiLU(), nn.Tanh(), nn.Softmax(-1), nn.MaxPool2d(2), nn.Flatten()]
    assert all(nonfinite.passes_finite(m) for m in passing)
    assert nonfinite.passes_finite(nn.LeakyReLU(0.2))
    failing = [
        nn.Dropout(),
        nn.SELU(),
        nn.LeakyReLU(3.0),
        nn.AvgPool2d(2),
        nn.LogSoftmax(-1),
        nn.Linear(2, 2),
        MyReLU(),
    ]
    assert not any(nonfinite.passes_finite(m) for m in failing)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor`` (inf: a NaN/inf made in backward)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None  # type: ignore[attr-defined]


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("fault", ["activation", "weight_grad"])
def test_a_wrapped_layer_is_named_as_the_record_names_it_at_every_rate(every: int, fault: str) -> None:
    """Wrappers insert name components (checkpoint_wrapper's ``_checkpoint_wrapped_module``,
    FSDP1's ``_fsdp_wrapped_module``, compile's ``_orig_mod``): the per-step check of an
    unsampled step named '2._checkpoint_wrapped_module' (type and dtype unknown) where a
    sampled step names '2', a Linear."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    model[2] = checkpoint_wrapper(model[2])
    inner = model[2]._checkpoint_wrapped_module
    state = {"bad": False}
    if fault == "activation":
        inner.register_forward_hook(lambda m, a, out: out * float("inf") if state["bad"] else out)
    else:  # ∂ℓ/∂(input of 2) finite, the gradient flowing into 2's output non-finite
        inner.register_forward_hook(lambda m, a, out: _ScaleGradient.apply(out, float("inf")) if state["bad"] else out)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(GradscopeError) as info:
        with gradscope.watch(model, every=every, on_finding=lambda f: None) as scope:
            for step in range(8):
                state["bad"] = step == 4
                x, y = batch(step)
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                scope.step(opt)
                opt.step()
    record = info.value.record
    assert record["step"] == 4
    assert record["layer"] == "2" and "_checkpoint_wrapped_module" not in str(record)
    if fault == "activation":
        assert (record["type"], record["dtype"], record["role"]) == ("Linear", "float32", "activation")


@pytest.mark.parametrize("every", [1, 5])
@pytest.mark.parametrize("micro_batch", [0, 2, 3])
def test_a_nan_input_of_any_micro_batch_is_received_at_every_rate(every: int, micro_batch: int) -> None:
    """Gradient accumulation: four forwards per step whose layers share names.  The
    per-step check matched inputs to activations by layer name, so a later micro-batch's
    finite input hid an earlier one's NaN ('produced by the forward of 0')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(GradscopeError) as info:
        with gradscope.watch(model, every=every, on_finding=lambda f: None) as scope:
            for step in range(6):
                opt.zero_grad()
                for micro in range(4):
                    x, y = batch(10 * step + micro)
                    if step == 2 and micro == micro_batch:
                        x = x.clone()
                        x[0, 0] = float("nan")
                    (nn.functional.mse_loss(model(x), y) / 4).backward()
                scope.step(opt)
                opt.step()
    assert where(info.value.record) == (2, "0", "activation", "received")


class _InfFrom(nn.Module):
    """A parameter-free layer that turns its input infinite while ``on``."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("inf") if self.on else x


@pytest.mark.parametrize("every", [1, 4])
@pytest.mark.parametrize("tier", ["full", "light"])
def test_the_light_tier_does_not_claim_a_layer_produced_what_an_unhooked_one_did(tier: str, every: int) -> None:
    """tier='light' hooks only layers with parameters: a NaN made by GPT-2's GELU was
    'produced by the forward of c_proj', the next layer with parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), _InfFrom(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    record = stopping_record(
        model,
        lambda: gradscope.watch(model, every=every, tier=tier, on_finding=lambda f: None),
        lambda bad: setattr(model[1], "on", bad),
    )
    if tier == "full":
        assert where(record) == (5, "1", "activation", "produced")
    else:
        assert where(record) == (5, "2", "activation", "unknown")
        assert "parameter-free layer" in record["source"]


def test_attach_with_a_scaler_that_skips_the_step_still_stops_at_it() -> None:
    """scope.attach(opt, scaler): a GradScaler that finds inf/NaN gradients skips
    optimizer.step(), and the optimizer's pre-step hook with it: the NaN step was seen
    at the next iteration, labelled with the wrong step, its forward merged with that one's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    state = {"bad": False}
    model[2].register_forward_hook(lambda m, a, out: out * float("nan") if state["bad"] else out)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    scope = gradscope.watch(model, every=1, on_finding=lambda f: None).attach(opt, scaler=scaler)
    stopped_in = None
    with pytest.raises(GradscopeError) as info:
        for iteration in range(8):
            stopped_in = iteration
            state["bad"] = iteration == 3
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(torch.randn(16, 8)).float().pow(2).mean()
            scope.observe_loss(loss)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    assert stopped_in == 3 and where(info.value.record) == (3, "2", "activation", "produced")
    scope.close()
    assert "step" not in scaler.__dict__  # the wrapper is gone with the scope
