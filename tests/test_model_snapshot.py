"""The model tensors a watched run's diagnosis reads (an RNN's recurrent
weights, a PReLU's slope) come from a copy taken with the full flush
(gradscope.watching.model_snapshot): the weights of the step the flush
describes, read without a device-to-host copy when the flush is read."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import gradscope.diagnose.recurrent as recurrent
from gradscope.host_copy import HostBuffers
from gradscope.record import LayerRecord
from gradscope.watching.model_snapshot import HostModel, launch_snapshot
from gradscope.watching.options import DIAGNOSE_EVERY_STEPS
from gradscope.watching.scope import Scope


class _Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(6, 6, batch_first=True)
        self.fc = nn.Linear(6, 6)
        self.act = nn.PReLU(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(self.act(self.fc(out[:, -1])))


@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64: the host copy must not alias the weight
def test_the_diagnosis_reads_the_recurrent_weights_of_its_own_step(
    monkeypatch: pytest.MonkeyPatch, late: bool, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    model = _Seq().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # the weights move visibly every step
    seen: list[torch.Tensor] = []
    real = recurrent.recurrent_spectra

    def spy(module: Any, kind: str) -> list[dict[str, Any]]:
        seen.append(module.weight_hh_l0.detach().clone())
        return real(module, kind)

    monkeypatch.setattr(recurrent, "recurrent_spectra", spy)
    weights: dict[int, torch.Tensor] = {}
    scope = Scope(model, every=1, raise_on=(), on_finding=lambda f: None)
    scope.read_late = late
    x, y = torch.randn(4, 12, 6, dtype=dtype), torch.randn(4, 2, dtype=dtype)
    for step in range(DIAGNOSE_EVERY_STEPS + 3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        weights[step] = model.rnn.weight_hh_l0.detach().clone()
        scope.step(opt)
        opt.step()
    scope.close()
    full = DIAGNOSE_EVERY_STEPS  # full flushes at steps 0 and 10
    assert len(seen) >= 2
    assert torch.equal(seen[0].to(dtype), weights[0])
    assert torch.equal(seen[1].to(dtype), weights[full])  # its own step's weights, read late or not
    assert not torch.equal(seen[1].to(dtype), weights[full + 1])  # not those optimizer.step() made since


def test_the_host_model_answers_snapshotted_tensors_and_delegates_the_rest() -> None:
    torch.manual_seed(0)
    model = _Seq()
    layers = [
        LayerRecord(name="rnn", module="rnn", type="RNN", index=0),
        LayerRecord(name="act", module="act", type="PReLU", index=1),
        LayerRecord(name="fc", module="fc", type="Linear", index=2),
    ]
    launched = launch_snapshot(model, layers, HostBuffers())
    assert launched is not None and launched.ready()
    with torch.no_grad():
        model.rnn.weight_hh_l0.mul_(2.0)  # after the launch: the copy keeps what it saw
        model.act.weight.fill_(0.7)
    host = launched.host_model(model)
    assert isinstance(host, HostModel)
    rnn = host.get_submodule("rnn")
    assert [name for name, _ in rnn.named_parameters(recurse=False)] == ["weight_hh_l0"]
    assert torch.allclose(rnn.weight_hh_l0 * 2.0, model.rnn.weight_hh_l0.double())
    assert rnn.hidden_size == 6 and rnn.batch_first is True  # sizes and flags: the module's own
    assert torch.allclose(host.get_submodule("act").weight, torch.full((6,), 0.25, dtype=torch.float64))
    assert host.get_submodule("fc") is model.fc  # nothing snapshotted: the module itself
