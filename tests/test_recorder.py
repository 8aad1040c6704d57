"""The recorder survives real models and never changes a single output bit.

Each robustness test runs the same seeded step twice, once bare and once
recorded, on deep copies of one model, and compares outputs, parameter
gradients and buffers with ``torch.equal`` (bitwise).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradscope.recorder as recorder_module
from gradscope.jsonsafe import json_safe
from gradscope.record import Record
from gradscope.recorder import Recorder
from gradscope.stats import Stats, tensor_stats

# -- helpers ----------------------------------------------------------------------


def _floats(value: Any) -> list[torch.Tensor]:
    """Every tensor inside a (possibly nested) output, in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _floats(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _floats(v)]
    if dataclasses.is_dataclass(value):
        return [t for f in dataclasses.fields(value) for t in _floats(getattr(value, f.name))]
    return []


def _loss(output: Any) -> torch.Tensor:
    floats = [t for t in _floats(output) if t.is_floating_point() and t.requires_grad]
    return sum((t.float().square().mean() for t in floats), torch.zeros(()))


def _step(model: nn.Module, inputs: tuple, backward: bool = True) -> tuple[Any, dict[str, torch.Tensor]]:
    out = model(*inputs)
    if backward:
        loss = _loss(out)
        if loss.requires_grad:
            loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def compare_with_bare_run(
    make: Callable[[], nn.Module],
    inputs: tuple,
    backward: bool = True,
    **recorder_kwargs: Any,
) -> Record:
    """Run one step bare and one recorded; assert bitwise equality; return the record."""
    torch.manual_seed(0)
    model = make()
    bare = copy.deepcopy(model)
    torch.manual_seed(1)
    out_ref, grads_ref = _step(bare, inputs, backward)
    torch.manual_seed(1)
    with Recorder(model, **recorder_kwargs) as rec:
        rec.start()
        out, grads = _step(model, inputs, backward)
        rec.capture_parameters()
        record = rec.finish()
    ref_t, got_t = _floats(out_ref), _floats(out)
    assert len(ref_t) == len(got_t) and type(out) is type(out_ref)
    for a, b in zip(ref_t, got_t, strict=True):
        assert torch.equal(a, b)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_ref[name]), name
    for (name, a), (_, b) in zip(bare.named_buffers(), model.named_buffers(), strict=True):
        assert torch.equal(a, b), name
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    return record


def names(record: Record) -> list[str]:
    return [layer.name for layer in record.layers]


# -- robustness ---------------------------------------------------------------------


def test_inplace_relu_after_batchnorm_and_linear() -> None:
    def make() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(8 * 6 * 6, 16),
            nn.ReLU(inplace=True),
            nn.Linear(16, 4),
        )

    record = compare_with_bare_run(make, (torch.randn(5, 3, 6, 6),))
    assert names(record) == ["0", "1", "2", "3", "4", "5", "6"]
    for layer in record.layers:
        assert layer.activation is not None and layer.gradient is not None, layer.name
    # The BatchNorm output is recorded before the in-place ReLU overwrites it:
    # BN in train mode normalises each channel to mean 0, var 1 (eps aside).
    bn = record.layer("1").activation
    assert abs(bn.mean) < 1e-6 and bn.std == pytest.approx(1.0, rel=1e-3)
    assert record.layer("2").activation.min >= 0.0


class SharedRelu(nn.Module):
    """One ReLU module called at three sites, as torchvision's BasicBlock does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 10), nn.Linear(10, 7), nn.Linear(7, 3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.fc3(self.relu(self.fc2(self.relu(self.fc1(x))))))


def test_module_called_several_times_records_each_call_site() -> None:
    x = torch.randn(9, 6)
    record = compare_with_bare_run(SharedRelu, (x,))
    assert names(record) == ["fc1", "relu", "fc2", "relu#2", "fc3", "relu#3"]
    sites = [record.layer(n) for n in ("relu", "relu#2", "relu#3")]
    assert [s.call for s in sites] == [1, 2, 3]
    assert [s.module for s in sites] == ["relu"] * 3
    assert [s.shares_weights_with for s in sites] == [None, "relu", "relu"]
    assert [s.activation.count for s in sites] == [9 * 10, 9 * 7, 9 * 3]
    # Each site's statistics are those of its own tensor (recomputed by hand).
    torch.manual_seed(0)
    m = SharedRelu()
    h1 = torch.relu(m.fc1(x))
    h2 = torch.relu(m.fc2(h1))
    h3 = torch.relu(m.fc3(h2))
    for site, h in zip(sites, (h1, h2, h3), strict=True):
        assert torch.equal(site.activation.vector, tensor_stats(h).double())
        assert site.gradient is not None and site.gradient.count == h.numel()


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    extra: int = 3


class ModelOutputLike(OrderedDict):
    """What transformers' ModelOutput is: an OrderedDict subclass."""


class Structured(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> Any:
        h = self.fc(x)
        y = self.head(h)
        idx = torch.arange(3)
        if self.kind == "tuple":
            return (idx, y, h)
        if self.kind == "list":
            return [y, h]
        if self.kind == "dict":
            return {"ids": idx, "logits": y}
        if self.kind == "dataclass":
            return Out(logits=y)
        return ModelOutputLike(ids=idx, logits=y, hidden=h)


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("tuple", "[1]"),
        ("list", "[0]"),
        ("dict", "['logits']"),
        ("dataclass", ".logits"),
        ("model_output", "['logits']"),
    ],
)
def test_structured_outputs(kind: str, path: str) -> None:
    record = compare_with_bare_run(lambda: Structured(kind), (torch.randn(3, 4),), include=["fc", "head", "model"])
    assert names(record) == ["fc", "head", "model"]
    root = record.layer("model")
    assert root.output_path == path and root.activation.count == 3 * 2
    assert root.gradient is not None


class Odd(nn.Module):
    """Submodules that return None and a Python int."""

    class ReturnsNone(nn.Module):
        def forward(self, x: torch.Tensor) -> None:
            return None

    class ReturnsInt(nn.Module):
        def forward(self, x: torch.Tensor) -> int:
            return int(x.shape[0])

    def __init__(self) -> None:
        super().__init__()
        self.none, self.count, self.fc = Odd.ReturnsNone(), Odd.ReturnsInt(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.none(x)
        k = self.count(x)
        return self.fc(x) * k


def test_none_and_integer_outputs() -> None:
    record = compare_with_bare_run(Odd, (torch.randn(3, 4),))
    assert names(record) == ["none", "count", "fc"]
    assert record.layer("none").activation is None and record.layer("count").activation is None
    assert record.layer("fc").gradient is not None
    assert sum("no floating-point output" in note for note in record.notes) == 2


def test_forward_under_no_grad() -> None:
    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

    with torch.no_grad():
        record = compare_with_bare_run(make, (torch.randn(3, 4),), backward=False)
    assert names(record) == ["0", "1", "2"]
    for layer in record.layers:
        assert layer.activation is not None and layer.gradient is None and layer.weight_grad is None


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_recurrent_layers(cell: type) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = cell(5, 7, batch_first=True)
            self.head = nn.Linear(7, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(x)
            return self.head(out[:, -1])

    record = compare_with_bare_run(Net, (torch.randn(4, 6, 5),))
    rnn = record.layer("rnn")
    assert rnn.output_path == "[0]" and rnn.activation.count == 4 * 6 * 7
    assert rnn.gradient is not None and rnn.weight_name == "weight_ih_l0" and rnn.fan_in == 5
    assert rnn.weight_grad is not None


def test_embedding_fed_int64() -> None:
    def make() -> nn.Module:
        return nn.Sequential(nn.Embedding(20, 6), nn.Flatten(), nn.Linear(6 * 5, 3))

    ids = torch.randint(0, 20, (4, 5))
    record = compare_with_bare_run(make, (ids,))
    emb = record.layer("0")
    assert emb.activation.count == 4 * 5 * 6 and emb.gradient is not None
    assert emb.weight_grad is not None and emb.fan_in == 6  # torch.nn.init convention: shape[1]
    assert record.input is None  # the int64 model input has no float statistics


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.fc(x)))


def test_weight_shared_module() -> None:
    record = compare_with_bare_run(Shared, (torch.randn(5, 6),))
    assert names(record) == ["fc", "fc#2"]
    first, second = record.layer("fc"), record.layer("fc#2")
    assert second.shares_weights_with == "fc" and second.weight is None
    assert first.weight_grad is not None and first.weight_grad.count == 36
    assert first.gradient is not None and second.gradient is not None


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_train_and_eval(train: bool) -> None:
    def make() -> nn.Module:
        m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 2))
        m.train(train)
        return m

    record = compare_with_bare_run(make, (torch.randn(8, 4) * 3 + 1,))
    bn = record.layer("1").activation
    if train:  # normalised with the batch's own statistics (Ioffe & Szegedy 2015)
        assert abs(bn.mean) < 1e-5 and bn.std == pytest.approx(1.0, rel=1e-3)
    else:
        assert bn.std > 1.5  # fresh running stats (mean 0, var 1): the input's spread survives


def test_include_exclude_and_types() -> None:
    model = nn.Sequential(
        OrderedDict(
            enc=nn.Sequential(nn.Linear(4, 8), nn.ReLU()),
            dec=nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
        )
    )
    x = torch.randn(3, 4)

    def recorded(**kwargs: Any) -> list[str]:
        with Recorder(model, **kwargs) as rec:
            rec.start()
            model(x).sum().backward()
            return names(rec.finish())

    assert recorded() == ["enc.0", "enc.1", "dec.0", "dec.1", "dec.2"]
    assert recorded(include=["dec.*"]) == ["dec.0", "dec.1", "dec.2"]
    assert recorded(exclude=["*.1"]) == ["enc.0", "dec.0", "dec.2"]
    assert recorded(types=[nn.Linear]) == ["enc.0", "dec.0", "dec.2"]
    assert recorded(include=["enc", "dec.*"], types=[nn.Sequential, nn.ReLU]) == ["enc", "dec.1"]


class Reordered(nn.Module):
    """Children registered a, b, c, unused; called c, a, b."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 5), nn.Linear(5, 3), nn.Linear(4, 5)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(self.c(x)))


def test_execution_order_and_not_executed() -> None:
    record = compare_with_bare_run(Reordered, (torch.randn(2, 4),))
    assert names(record) == ["c", "a", "b"]
    assert [layer.index for layer in record.layers] == [0, 1, 2]
    assert record.not_executed == ["unused"]


def test_gradient_statistics_equal_true_dl_dh() -> None:
    """Reference ∂ℓ/∂h from retain_grad on every intermediate of a bare run."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Sigmoid(), nn.Linear(32, 4))
    x = torch.randn(64, 16)
    target = torch.randint(0, 4, (64,))

    hs = []
    h = x
    for layer in model:
        h = layer(h)
        h.retain_grad()
        hs.append(h)
    nn.functional.cross_entropy(h, target).backward()
    model.zero_grad(set_to_none=True)

    with Recorder(model) as rec:
        rec.start()
        nn.functional.cross_entropy(model(x), target).backward()
        record = rec.finish()
    for i, (layer, h) in enumerate(zip(record.layers, hs, strict=True)):
        g = h.grad.double()
        ref_rms = math.sqrt(float(g.square().mean()))
        assert layer.gradient.rms == pytest.approx(ref_rms, rel=1e-5), i
        assert layer.gradient.count == g.numel() and layer.gradient.absmax == float(g.abs().max())
        act = layer.activation
        assert act.mean == pytest.approx(float(h.detach().double().mean()), rel=1e-5, abs=1e-7)


def test_input_statistics_and_several_steps_merge() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    xs = [torch.randn(10, 3) for _ in range(3)]
    with Recorder(model, record_inputs=True) as rec:
        rec.start()
        for x in xs:
            model(x).sum().backward()
            rec.capture_parameters()
            rec.flush()
        record = rec.finish()
    assert record.steps == 3
    assert record.input.count == 3 * 10 * 3
    assert record.input.mean == pytest.approx(float(torch.cat(xs).double().mean()), rel=1e-6)
    assert record.layer("0").input.count == 90 and record.layer("0").activation.count == 3 * 40
    assert record.layer("0").weight.count == 3 * 12  # one weight capture per step
    assert Stats(record.layer("2").gradient.vector).count == 30


def test_gradients_with_inplace_relu_are_the_pre_activation_gradients() -> None:
    """Linear -> ReLU(inplace): the Linear's tensor hook was registered before
    the in-place op, so it receives ∂ℓ/∂(pre-activation) (PyTorch's documented
    behaviour for hooks on tensors later modified in place), the ReLU site
    ∂ℓ/∂(post-activation).  Reference: the same net without in-place, retain_grad."""
    torch.manual_seed(6)
    ref = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    model = copy.deepcopy(ref)
    model[1] = nn.ReLU(inplace=True)
    x = torch.randn(32, 8)
    y = ref[0](x)
    y.retain_grad()
    h = ref[1](y)
    h.retain_grad()
    ref[2](h).square().mean().backward()
    with Recorder(model) as rec:
        rec.start()
        model(x).square().mean().backward()
        record = rec.finish()
    for name, truth in (("0", y.grad), ("1", h.grad)):
        got = record.layer(name).gradient
        assert got.rms == pytest.approx(math.sqrt(float(truth.double().square().mean())), rel=1e-5), name
        assert got.zero_count == int((truth == 0).sum()), name
    assert record.layer("0").gradient.zero_count > record.layer("1").gradient.zero_count


class BasicBlock(nn.Module):
    """torchvision ResNet's BasicBlock, rebuilt: one in-place ReLU module called
    twice, the second time on the sum with the identity (pytorch/vision#4164)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def test_resnet_basic_block() -> None:
    def make() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BasicBlock(), BasicBlock(), nn.Flatten(), nn.LazyLinear(5))

    record = compare_with_bare_run(make, (torch.randn(2, 3, 8, 8),))
    assert names(record)[:7] == ["0", "1.conv1", "1.bn1", "1.relu", "1.conv2", "1.bn2", "1.relu#2"]
    assert record.layer("2.relu#2").shares_weights_with == "2.relu"
    for layer in record.layers:
        assert layer.gradient is not None, layer.name
    assert record.layer("1.conv1").fan_in == 4 * 9 and record.layer("1.conv1").weight_grad is not None


def test_record_json_round_trip() -> None:
    record = compare_with_bare_run(SharedRelu, (torch.randn(9, 6),))
    back = Record.from_dict(json.loads(json.dumps(json_safe(record.to_dict()), allow_nan=False)))
    assert names(back) == names(record)
    for a, b in zip(record.layers, back.layers, strict=True):
        assert (a.module, a.call, a.type, a.index, a.fan_in, a.shares_weights_with) == (
            b.module,
            b.call,
            b.type,
            b.index,
            b.fan_in,
            b.shares_weights_with,
        )
        for role, stats in a.stats.items():
            assert torch.equal(stats.vector.nan_to_num(), b.stats[role].vector.nan_to_num()), (a.name, role)


def test_pending_sample_copies_stay_within_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a bounded sample, hooks keep a copy of each tensor's sample until the
    flush; over many micro-batches those copies are reduced as soon as they pass
    PENDING_SAMPLE_BUDGET elements, and the statistics do not change (merged in
    another order: equal to rounding)."""

    def run(budget: int) -> tuple[list[int], list[torch.Tensor]]:
        monkeypatch.setattr(recorder_module, "PENDING_SAMPLE_BUDGET", budget)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8))
        held = []
        with Recorder(model, sample=1024) as rec:
            rec.start()
            for micro in range(6):
                g = torch.Generator().manual_seed(micro)
                model(torch.randn(64, 64, generator=g)).pow(2).mean().backward()
                held.append(rec._pending_elements)
            record = rec.finish()
        return held, [layer.activation.vector for layer in record.layers]

    held, small = run(8000)  # one micro-batch leaves 5700 elements of copies
    assert max(held) <= 8000 and len(set(held)) > 1
    unbounded_held, big = run(10**9)
    assert unbounded_held == [5700 * k for k in range(1, 7)]  # without the cap the copies pile up
    for a, b in zip(small, big, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=0.0)
