"""Through time: ∂ℓ/∂h along the sequence of recurrent (and marked) layers, against the
linearised theory of backprop through time (Bengio et al. 1994; Pascanu et al. 2013)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import gradscope
from gradscope.auditing import audit
from gradscope.diagnose.recurrent import spectral_radius
from gradscope.errors import GradscopeError
from gradscope.recorder import Recorder
from gradscope.report import Report, Severity

H, T, B = 16, 20, 8
LOUD = (Severity.ERROR, Severity.WARNING)
TIME_CODES = {"exploding-through-time", "vanishing-through-time"}


def scaled_orthogonal_rnn(rho: float, seed: int = 0) -> nn.RNN:
    """tanh RNN with W_hh = rho·Q (Q orthogonal: a normal matrix, every |eigenvalue| and every
    singular value equal to rho), W_ih = I and no bias: in the near-linear regime
    ∂ℓ/∂x_t = diag(1 - h_t²)·∂ℓ/∂h_t ≈ ∂ℓ/∂h_t and ‖∂ℓ/∂h_{t-1}‖ = rho·‖∂ℓ/∂h_t‖ exactly."""
    torch.manual_seed(seed)
    rnn = nn.RNN(H, H, batch_first=True)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(H, H, dtype=torch.float64))
        rnn.weight_hh_l0.copy_(rho * q)
        rnn.weight_ih_l0.copy_(torch.eye(H))
        rnn.bias_hh_l0.zero_()
        rnn.bias_ih_l0.zero_()
    return rnn


def small_input(scale: float = 1e-6) -> torch.Tensor:
    # 1e-6 · 1.5^19 ≈ 2e-3: tanh'(h) = 1 - h² > 0.99999 at every step (near-linear)
    return torch.randn(B, T, H, generator=torch.Generator().manual_seed(1)) * scale


def last_step_loss(output):
    return output[0][:, -1].sum()  # a loss at the last step only: the chain of T-1 Jacobians


def finding(report: Report, code: str):
    found = [f for f in report.findings if f.code == code]
    assert found, f"no {code} among {[f.code for f in report.findings]}"
    return found[0]


def time_findings(report: Report) -> list:
    return [f for f in report.findings if f.code in TIME_CODES]


@pytest.mark.parametrize("rho", [0.5, 0.9, 1.2, 1.5])
def test_per_step_factor_matches_the_linear_theory(rho: float) -> None:
    """Measured factor per step back in time = rho within 1% (near-linear regime, normal W_hh);
    and every step-to-step ratio of the per-step RMS too."""
    rnn = scaled_orthogonal_rnn(rho)
    report = audit(rnn, small_input(), loss=last_step_loss)
    row = report.analysis["recurrent"]["model"]
    assert row["measured_factor_per_step"] == pytest.approx(rho, rel=0.01)
    assert row["spectral_radius_max"] == pytest.approx(rho, rel=1e-6)  # float32 weights
    rms = row["input_gradient_rms"]
    assert len(rms) == T
    ratios = [rms[t] / rms[t + 1] for t in range(T - 1)]
    assert ratios == pytest.approx([rho] * (T - 1), rel=0.01)


def test_radius_1_5_explodes_through_time_with_the_fix() -> None:
    rnn = scaled_orthogonal_rnn(1.5)
    report = audit(rnn, small_input())  # the audit's own loss: cross-entropy at every step
    f = finding(report, "exploding-through-time")
    assert Severity(f.severity) in LOUD
    assert f.layers == ["model"]
    assert f.evidence["basis"] == "measured"
    # a loss at every step: ∂ℓ/∂h_t = Σ_k (W^T)^k g, geometric with ratio 1.5 away from the end
    assert f.evidence["factor_per_step"] == pytest.approx(1.5, rel=0.03)
    assert f.evidence["change_over_sequence"] > 1e2
    assert f.evidence["spectral_radius_max"] == pytest.approx(1.5, rel=1e-6)  # float32 weights
    assert "'model'" in f.message and "1.5" in f.message
    assert "orthogonal" in f.fix.summary and "nn.LSTM" in f.fix.code
    assert "clip" in f.fix.summary
    # The audit saw one gradient norm: no clip threshold is made up from it.
    assert "max_norm" not in f.fix.code
    # The snippet runs on the user's model and brings the spectral radius to 1.
    exec(f.fix.code, {"model": rnn})
    assert spectral_radius(rnn.weight_hh_l0) == pytest.approx(1.0, rel=1e-6)
    assert not [x for x in report.findings if x.code == "vanishing-through-time"]


def test_radius_0_5_vanishes_through_time() -> None:
    rnn = scaled_orthogonal_rnn(0.5)
    # Loss at every step: the per-step RMS is flat (each step has its own loss), so the
    # verdict is the spectral radius's (tanh' <= 1 can only make it vanish faster).
    predicted = finding(audit(rnn, small_input()), "vanishing-through-time")
    assert predicted.evidence["basis"] == "predicted"
    assert predicted.severity is Severity.WARNING
    assert predicted.evidence["factor_per_step"] == pytest.approx(0.5)
    assert predicted.evidence["change_over_sequence"] == pytest.approx(0.5 ** (T - 1))
    assert "orthogonal_" in predicted.fix.code
    # Loss at the last step: measured, 0.5^19 ≈ 2e-6 is past the error threshold (1e-4).
    measured = finding(audit(rnn, small_input(), loss=last_step_loss), "vanishing-through-time")
    assert measured.evidence["basis"] == "measured"
    assert measured.severity is Severity.ERROR
    assert measured.evidence["change_over_sequence"] == pytest.approx(0.5 ** (T - 1), rel=0.2)


def test_relu_rnn_fix_is_the_identity_recurrence() -> None:
    torch.manual_seed(0)
    rnn = nn.RNN(H, H, nonlinearity="relu", batch_first=True)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(0.4 / spectral_radius(rnn.weight_hh_l0))
    f = finding(audit(rnn, torch.randn(B, T, H)), "vanishing-through-time")
    assert "eye_" in f.fix.code
    exec(f.fix.code, {"model": rnn})
    assert torch.equal(rnn.weight_hh_l0, torch.eye(H))


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_gated_cells_at_default_init_get_no_through_time_alarm(cls: type) -> None:
    torch.manual_seed(0)
    model = cls(H, H, num_layers=2, batch_first=True)
    report = audit(model, torch.randn(B, T, H))
    assert not [f for f in time_findings(report) if Severity(f.severity) in LOUD]
    row = report.analysis["recurrent"]["model"]
    gates = 4 if cls is nn.LSTM else 3
    assert [len(w["blocks"]) for w in row["recurrent_weights"]] == [gates, gates]
    # torch's default U(±1/√H) has Var = 1/(3H): circular law radius ≈ 1/√3 per block
    for w in row["recurrent_weights"]:
        for block in w["blocks"]:
            assert 0.3 < block["spectral_radius"] < 1.0
    assert "measured_factor_per_step" in row
    assert "predicted_factor_per_step" not in row  # the gates, not W_hh, set a gated cell's factor


def test_lstm_fix_snippet_sets_orthogonal_gate_blocks() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(H, H, batch_first=True)
    report = audit(lstm, torch.randn(B, T, H), loss=last_step_loss)
    f = finding(report, "vanishing-through-time")  # the forget gate ≈ 0.5 at default init
    assert f.severity is Severity.INFO  # training opens the gate: advice, not an alarm
    exec(f.fix.code, {"model": lstm})
    w = lstm.weight_hh_l0.detach().double()
    for gate in range(4):
        block = w[gate * H : (gate + 1) * H]
        assert torch.allclose(block @ block.T, torch.eye(H, dtype=torch.float64), atol=1e-5)
    assert torch.equal(lstm.bias_hh_l0[H : 2 * H], torch.ones(H))  # forget-gate bias 1


def test_no_recurrent_layer_says_nothing_about_time() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    report = audit(model, input_shape=(16, 8))
    assert not time_findings(report)
    assert "recurrent" not in report.analysis
    assert not any("time" in f.message for f in report.findings)
    assert not any("through time" in note for note in report.record.notes)
    entries = [x for x in report.analysis["not_assessed"] if x["analysis"] == "through-time"]
    assert len(entries) == 1
    assert "no recurrent layer" in entries[0]["reason"] and "sequence_modules" in entries[0]["reason"]
    assert all(not layer.time for layer in report.record.layers)


class LoopRNN(nn.Module):
    """A hand-written recurrence over dim 1: h_t = tanh(x_t + W h_{t-1}), outputs stacked."""

    def __init__(self, rho: float) -> None:
        super().__init__()
        self.cell = nn.Linear(H, H, bias=False)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(H, H, dtype=torch.float64))
            self.cell.weight.copy_(rho * q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], H)
        outs = []
        for t in range(x.shape[1]):
            h = torch.tanh(x[:, t] + self.cell(h))
            outs.append(h)
        return torch.stack(outs, dim=1)


class Tagger(nn.Module):
    def __init__(self, rho: float) -> None:
        super().__init__()
        self.loop = LoopRNN(rho)
        self.head = nn.Linear(H, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.loop(x))


def test_marked_sequence_module_is_measured_along_time() -> None:
    torch.manual_seed(0)
    model = Tagger(1.5)
    x = small_input()
    loss = lambda out: out[:, -1].sum()  # noqa: E731
    report = audit(model, x, loss=loss, sequence_modules={"loop": 1})
    f = finding(report, "exploding-through-time")
    assert f.layers == ["loop"]
    assert f.evidence["factor_per_step"] == pytest.approx(1.5, rel=0.01)
    reasons = [x["reason"] for x in report.analysis["not_assessed"] if x.get("layer") == "loop"]
    assert reasons and "marked" in reasons[0]
    # unmarked: nothing about time, and the not-assessed entry says why
    plain = audit(model, x, loss=loss)
    assert not time_findings(plain)
    with pytest.raises(GradscopeError, match="sequence_modules"):
        audit(model, x, loss=loss, sequence_modules={"nope": 1})


def test_recording_changes_no_number_and_keeps_nothing(assert_no_hooks) -> None:
    rnn = scaled_orthogonal_rnn(1.2)
    x = torch.randn(B, T, H)
    rnn(x)[0].square().mean().backward()
    expected = {n: p.grad.clone() for n, p in rnn.named_parameters()}
    rnn.zero_grad()
    with Recorder(rnn) as rec:
        rec.start()
        out, _ = rnn(x)
        out.square().mean().backward()
        record = rec.finish()
    assert not x.requires_grad and x.grad is None
    for name, p in rnn.named_parameters():
        assert torch.equal(p.grad, expected[name]), name
    assert record.layers[0].time["input_gradient"].steps == T
    assert_no_hooks(rnn)


def test_time_profile_takes_no_host_sync_in_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    rnn = scaled_orthogonal_rnn(1.2)
    with Recorder(rnn) as rec:
        rec.start()
        with monkeypatch.context() as m:

            def forbidden(*args, **kwargs):
                raise AssertionError("host sync inside a hook")

            for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
                m.setattr(torch.Tensor, name, forbidden)
            out, _ = rnn(torch.randn(B, T, H))
            out.square().mean().backward()
        record = rec.finish()
    assert set(record.layers[0].time) == {"gradient", "input_gradient"}


def test_long_sequences_fold_into_bins_and_round_trip_through_json() -> None:
    rnn = scaled_orthogonal_rnn(0.99)
    steps = 200  # > TIME_BINS: 64 bins of 3-4 steps
    x = torch.randn(2, steps, H, generator=torch.Generator().manual_seed(2)) * 1e-6
    report = audit(rnn, x, loss=last_step_loss)
    profile = report.record.layers[0].time["input_gradient"]
    assert len(profile.sumsq) == 64 and sum(profile.counts) == 2 * steps * H
    assert profile.backward_factor() == pytest.approx(0.99, rel=1e-3)
    again = Report.from_dict(json.loads(json.dumps(report.to_dict())))
    back = again.record.layers[0].time["input_gradient"]
    assert back.backward_factor() == pytest.approx(profile.backward_factor(), rel=1e-12)


def test_watch_measures_time_on_sampled_steps_and_merges_the_run() -> None:
    torch.manual_seed(0)
    gru = nn.GRU(H, H, batch_first=True)
    opt = torch.optim.SGD(gru.parameters(), lr=0.01)
    with gradscope.watch(gru, every=2, raise_on=()) as scope:
        for _ in range(5):
            opt.zero_grad()
            out, _ = gru(torch.randn(B, T, H))
            out.square().mean().backward()
            scope.step(opt)
            opt.step()
    report = scope.report()
    profile = report.record.layers[0].time["input_gradient"]
    assert profile.calls == 3  # sampled steps 0, 2, 4
    assert "recurrent" in report.analysis


def test_packed_sequences_are_said_not_assessed() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(H, H)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(T, B, H), [T] * B)
    loss = lambda out: out[0].data.square().mean()  # noqa: E731
    report = audit(lstm, (packed,), loss=loss)
    assert not report.record.layers[0].time
    assert any("PackedSequence" in note for note in report.record.notes)
    reasons = [x["reason"] for x in report.analysis["not_assessed"] if x.get("layer") == "model"]
    assert any("no per-step gradient" in r for r in reasons)
    assert report.analysis["recurrent"]["model"]["recurrent_weights"]  # the spectra are still there


def test_spectral_radius_by_gelfand_matches_the_eigenvalues(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradscope.diagnose.recurrent as recurrent

    torch.manual_seed(0)
    w = torch.randn(96, 96, dtype=torch.float64) / 96**0.5
    exact = spectral_radius(w)
    monkeypatch.setattr(recurrent, "EXACT_EIGEN_MAX", 8)
    # ‖W^k‖_F^(1/k) with k = 1024: within (√n · condition)^(1/k) of ρ
    assert spectral_radius(w) == pytest.approx(exact, rel=0.02)


def test_without_the_model_the_measurement_still_judges_and_the_spectra_are_not_assessed() -> None:
    from gradscope.diagnose import diagnose_record

    rnn = scaled_orthogonal_rnn(1.5)
    report = audit(rnn, small_input(), loss=last_step_loss)
    record = Report.from_dict(json.loads(json.dumps(report.to_dict()))).record  # as `gradscope report` reads it
    findings, analysis = diagnose_record(record)  # no model at hand
    assert "exploding-through-time" in [f.code for f in findings]
    reasons = [x["reason"] for x in analysis["not_assessed"] if x.get("layer") == "model"]
    assert any("recurrent weights not analysed" in r for r in reasons)
    assert "spectral_radius_max" not in analysis["recurrent"]["model"]


def test_during_training_the_init_fix_is_for_the_next_run() -> None:
    from gradscope.diagnose import diagnose_record

    rnn = scaled_orthogonal_rnn(0.5)
    record = audit(rnn, small_input(), loss=last_step_loss).record
    findings, _ = diagnose_record(record, model=rnn, during_training=True)
    f = next(x for x in findings if x.code == "vanishing-through-time")
    assert f.fix.summary.startswith("for the next run") and "before training starts" not in f.fix.summary
    assert f.fix.code.startswith("# for the next run")
