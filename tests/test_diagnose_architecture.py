"""Verdicts judged on the architecture (issue 11): one test per class of false alarm or miss.

Each model is tiny; the numbers each test relies on are derived in its comment.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from click.testing import CliRunner
from diagnose_models import kaiming, mlp, normal, one_thread, xavier  # noqa: F401 (one_thread: autouse fixture)
from torch import nn

from gradscope.auditing import audit
from gradscope.cli import cli
from gradscope.diagnose import diagnose_record
from gradscope.fix import apply_init
from gradscope.recorder import Recorder
from gradscope.report import Finding, Report, Severity

LOUD = (Severity.ERROR, Severity.WARNING)
DEPTH_CODES = {"vanishing-gradient", "exploding-gradient", "vanishing-activations", "exploding-activations"}


def _loud(report: Report) -> list[str]:
    return [f"{f.code}: {f.message}" for f in report.findings if Severity(f.severity) in LOUD]


def _finding(report: Report, code: str) -> Finding:
    found = [f for f in report.findings if f.code == code]
    assert found, f"no {code} finding among {[f.code for f in report.findings]}"
    return found[0]


# -- zero-init by design: info, never an error ---------------------------------------------


def _zero_head_mlp() -> nn.Sequential:
    model = mlp(4, init=kaiming)
    nn.init.zeros_(model[-1].weight)  # torchvision's ViT head
    nn.init.zeros_(model[-1].bias)
    return model


class FixupBlock(nn.Module):
    """A residual MLP block whose branch ends in a zero-initialised layer (Fixup, Zhang et al. 2019)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)
        kaiming(self.fc1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class ReZeroBlock(nn.Module):
    """x + alpha * f(x) with alpha = 0 at init (ReZero, Bachlechner et al. 2020)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)
        kaiming(self.fc1)
        kaiming(self.fc2)
        self.alpha = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.fc2(self.act(self.fc1(x)))


def _residual(block: type[nn.Module], blocks: int = 4, d: int = 64) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, d), *[block(d) for _ in range(blocks)], nn.Linear(d, 10))
    kaiming(model[0])
    return model


def test_zero_init_head_is_info_only() -> None:
    report = audit(_zero_head_mlp(), input_shape=(64, 64))
    # ∂ℓ/∂h below the zero head is exactly zero at step 0...
    assert report.record.layer("0").gradient.rms == 0.0
    # ...by design: no warning, no error, one info that says so and why.
    assert _loud(report) == []
    assert report.summary()["healthy"] is True
    info = _finding(report, "zero-init")
    assert info.severity is Severity.INFO
    assert info.layers == ["6"]
    assert "'6'" in info.message and "after the first update" in info.message
    assert set(info.evidence["silenced_layers"]) == {"0", "2", "4"}
    assert not {"poor-init"} & report.codes()


@pytest.mark.parametrize("block", [FixupBlock, ReZeroBlock], ids=["fixup", "rezero"])
def test_zero_init_residual_branches_are_info_only(block: type[nn.Module]) -> None:
    report = audit(_residual(block), input_shape=(64, 32))
    assert _loud(report) == []
    info = _finding(report, "zero-init")
    assert info.severity is Severity.INFO
    if block is ReZeroBlock:
        assert "1.alpha" in info.evidence["zero_parameters"]
        # the branch layers get exactly zero gradient; the main path does not
        assert report.record.layer("1.fc1").gradient.rms == 0.0
        assert report.record.layer("0").gradient.rms > 0.0
    else:
        assert "1.fc2" in info.evidence["zero_layers"]


# -- layer scale: nothing ------------------------------------------------------------------


class LayerScaleBlock(nn.Module):
    """A pre-norm residual MLP block with a per-channel gain of 1e-6 (CaiT/ResMLP/ConvNeXt)."""

    def __init__(self, d: int, init: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)
        self.gamma = nn.Parameter(torch.full((d,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.fc2(self.act(self.fc1(self.norm(x))))


@pytest.mark.parametrize("embed", [True, False], ids=["embedded", "branch-at-the-input"])
def test_layer_scale_branches_are_not_vanishing(embed: bool) -> None:
    torch.manual_seed(0)
    d = 64
    head = [nn.Linear(d, 10)]
    body = [LayerScaleBlock(d) for _ in range(6)]
    model = nn.Sequential(*([nn.Linear(d, d)] if embed else []), *body, *head)
    report = audit(model, input_shape=(32, d))
    # The branch's ∂ℓ/∂h really is ~1e-6 of the main path's...
    first_branch = report.record.layer("1.fc1" if embed else "0.fc1")
    assert first_branch.gradient.rms < 1e-4 * report.record.layer(f"{len(model) - 1}").gradient.rms
    # ...by design: no warning, no error, no depth or init finding.
    assert _loud(report) == []
    assert not (DEPTH_CODES | {"poor-init"}) & report.codes()


# -- global average pooling: the verdict does not depend on the image size ---------------------


def _plain_gap_cnn(init: str, depth: int = 22, ch: int = 8) -> nn.Sequential:
    """He et al. 2015's plain net, shrunk: 22 3x3 convs with ReLU, three stride-2 stages, GAP, a Linear head."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, ch, 3, padding=1), nn.ReLU()]
    for i in range(depth - 2):
        layers += [nn.Conv2d(ch, ch, 3, padding=1, stride=2 if i in (4, 9, 14) else 1), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, 10)]
    model = nn.Sequential(*layers)
    if init == "kaiming":
        for m in model:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
    return model


def _verdict(report: Report) -> tuple[set[tuple[str, str]], bool | None]:
    depth = {(f.code, Severity(f.severity).value) for f in report.findings if f.code in DEPTH_CODES | {"poor-init"}}
    return depth, report.summary()["healthy"]


@pytest.mark.parametrize("init", ["kaiming", "default"])
def test_gap_conv_net_gets_the_same_verdict_at_32_and_128_pixels(init: str) -> None:
    small = audit(_plain_gap_cnn(init), input_shape=(2, 3, 32, 32))
    large = audit(_plain_gap_cnn(init), input_shape=(2, 3, 128, 128))
    assert _verdict(small) == _verdict(large)
    boundary = small.analysis["head_boundary"]
    assert boundary is not None and boundary["first_head_layer"] == str(len(_plain_gap_cnn(init)) - 1)
    if init == "kaiming":
        assert _verdict(small) == (set(), True)
    else:
        # PyTorch's default init under ReLU: 1/6 of the variance per layer over 21 layers.
        assert ("vanishing-gradient", "error") in _verdict(small)[0]


# -- width and batch: nothing ----------------------------------------------------------------


def test_wide_then_narrow_kaiming_mlp_is_healthy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    for m in model:
        if isinstance(m, nn.Linear):
            kaiming(m)
    report = audit(model, input_shape=(64, 64))
    assert _loud(report) == []


def test_batch_65536_kaiming_mlp_is_healthy() -> None:
    # A mean over 65,536 examples makes every ∂ℓ/∂h ~1.5e-5x a single example's: the
    # course's 1e-6 floor is judged per loss term and only with decay across depth.
    report = audit(mlp(4, width=16, init=kaiming, d_in=8), input_shape=(65536, 8))
    head = report.record.layer("6").gradient.rms
    assert head < 1e-4
    assert _loud(report) == []
    assert "vanishing-gradient" not in report.codes()


# -- a scaled loss: precision and learning rate, not vanishing ------------------------------------


def test_scaled_loss_is_a_precision_and_learning_rate_question_not_vanishing() -> None:
    report = audit(mlp(4, init=kaiming, d_in=32), input_shape=(64, 32), loss=lambda out: out.pow(2).mean() * 1e-12)
    assert not DEPTH_CODES & report.codes()
    finding = _finding(report, "fp16-underflow")
    assert finding.severity is Severity.WARNING
    assert "does not decay with depth" in finding.message and "not vanishing" in finding.message
    assert "learning rate" in finding.fix.summary and "lr" in finding.fix.summary
    assert finding.evidence["loss_end_gradient_rms_per_term"] < 1e-6


# -- poor-init: Glorot's standard init is found, attributed and never advised in training --------


def _glorot_standard_tanh(d: int = 256) -> nn.Sequential:
    """Glorot & Bengio 2010's 5-layer tanh net with the "standard" init U[-1/sqrt(n), 1/sqrt(n)]."""
    model = mlp(5, width=d, act=nn.Tanh, d_in=d, seed=0)
    for m in model:
        if isinstance(m, nn.Linear):
            bound = 1 / math.sqrt(m.weight.shape[1])
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)
    return model


def test_glorot_standard_init_on_a_5_layer_tanh_net_is_a_poor_init_warning() -> None:
    model = _glorot_standard_tanh()
    report = audit(model, input_shape=(128, 256))
    finding = _finding(report, "poor-init")
    assert finding.severity is Severity.WARNING
    assert finding.evidence["cause"] == "weights"
    # n·Var[w] = 1/3 per layer, times tanh's E[tanh(y)^2]/E[y^2] (< 1): 0.2-0.34 per layer.
    assert all(0.18 < g < 0.34 for g in finding.evidence["predicted_gains"])
    # Over the 4 hidden layers that compound: ~0.33^4 ≈ 0.012 at most, measured alike.
    assert finding.evidence["compounded_predicted_gain"] < 1e-2
    assert finding.evidence["measured_gain_end_to_end"] == pytest.approx(
        finding.evidence["compounded_predicted_gain"], rel=0.3
    )
    assert finding.layers == ["0", "2", "4", "6"]
    assert "'0'" in finding.message
    # The snippet re-draws exactly those layers, weights with Xavier and biases at zero, and cures it.
    assert "xavier_normal_(model[0].weight)" in finding.fix.code and "zeros_(model[0].bias)" in finding.fix.code
    assert "model[8]" not in finding.fix.code
    exec(finding.fix.code, {"nn": nn, "model": model})
    assert "poor-init" not in audit(model, input_shape=(128, 256)).codes()


def test_xavier_on_the_same_tanh_net_is_not_poor_init() -> None:
    report = audit(mlp(5, width=256, act=nn.Tanh, d_in=256, init=xavier), input_shape=(128, 256))
    assert "poor-init" not in report.codes()


def test_poor_init_from_biases_blames_the_biases() -> None:
    # Kaiming weights keep the signal (predicted gain ~1 per layer), but biases of 10 add
    # 100 to the second moment at every layer: the measured gain leaves the band.
    model = mlp(5, init=kaiming, d_in=64, width=64)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.fill_(10.0)
    finding = _finding(audit(model, input_shape=(64, 64)), "poor-init")
    assert finding.evidence["cause"] == "biases"
    assert "biases" in finding.message and "'0'" in finding.message
    assert "nn.init.zeros_(model[0].bias)" in finding.fix.code
    assert ".weight" not in finding.fix.code


def test_watch_never_advises_reinitialising_a_model_in_training() -> None:
    model = mlp(30, init=xavier)
    with Recorder(model) as recorder:
        recorder.start()
        loss = nn.functional.cross_entropy(model(torch.randn(64, 64)), torch.randint(0, 10, (64,)))
        loss.backward()
        recorder.capture_parameters()
        record = recorder.finish()
    audit_findings, _ = diagnose_record(record)
    training_findings, _ = diagnose_record(record, during_training=True)
    assert "poor-init" in {f.code for f in audit_findings}
    assert "poor-init" not in {f.code for f in training_findings}
    vanishing = next(f for f in training_findings if f.code == "vanishing-gradient")
    live = [line for line in vanishing.fix.code.splitlines() if not line.lstrip().startswith("#")]
    assert not any("nn.init" in line or "apply_init" in line for line in live)


# -- saturation: exact fractions ---------------------------------------------------------------


def _saturating(act: type[nn.Module], std: float) -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), act(), nn.Linear(64, 10))
    nn.init.normal_(model[0].weight, 0.0, std / 8.0)  # pre-activation std ≈ std for N(0, 1) inputs of width 64
    nn.init.zeros_(model[0].bias)
    return model, torch.randn(256, 64)


@pytest.mark.parametrize(("act", "std", "point"), [(nn.Sigmoid, 16.6, 4.0), (nn.Tanh, 8.3, 2.0)])
def test_81_percent_saturated_is_found_with_the_exact_fraction(act: type[nn.Module], std: float, point: float) -> None:
    # P(|y| >= point) = 0.81 for y ~ N(0, s^2) when point/s = 0.240 (Φ^-1(0.595)): s = 16.6 for
    # sigmoid's saturation point 4, 8.3 for tanh's 2.
    model, x = _saturating(act, std)
    with torch.no_grad():
        exact = float((model[0](x).abs() >= point).double().mean())
    assert 0.75 < exact < 0.87
    finding = _finding(audit(model, inputs=x), "saturated-units")
    assert finding.evidence["counted"] is True
    assert finding.evidence["saturated_frac"] == pytest.approx(exact, abs=1e-12)
    assert finding.severity is Severity.WARNING
    assert f"{exact:.1%} of the outputs of '1'" in finding.message


def test_fully_saturated_layer_is_reported_as_100_percent() -> None:
    model, x = _saturating(nn.Sigmoid, 0.1)
    with torch.no_grad():
        model[0].bias.fill_(50.0)  # every pre-activation near 50, far beyond sigmoid's saturation point 4
        assert bool((model[0](x).abs() >= 4.0).all())
    finding = _finding(audit(model, inputs=x), "saturated-units")
    assert finding.evidence["saturated_frac"] == 1.0
    assert finding.message.startswith("100% of the outputs of '1'")
    assert "at least" not in finding.message.lower()
    assert finding.severity is Severity.ERROR


# -- TorchScript: never "healthy" when the depth analysis could not run -----------------------


def test_torchscript_sequential_is_audited_layer_by_layer_like_the_factory(tmp_path) -> None:
    model = mlp(30, init=xavier)
    path = tmp_path / "stack.ts"
    torch.jit.save(torch.jit.script(model), str(path))
    result = CliRunner().invoke(cli, ["audit", str(path), "--trust-pickle", "--format", "json"])
    data = json.loads(result.stdout)
    factory = audit(model, input_shape=(32, 64))
    assert [(f["code"], f["severity"]) for f in data["findings"]] == [
        (f.code, Severity(f.severity).value) for f in factory.findings
    ]
    assert data["summary"]["healthy"] is False
    assert [layer["type"] for layer in data["layers"][:2]] == ["Linear", "ReLU"]
    assert result.exit_code == 1


class _Stack(nn.Module):
    """A custom forward (not a Sequential): TorchScript gives no per-layer view of it."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(30))
        for layer in self.layers:
            xavier(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def test_torchscript_of_a_vanishing_custom_stack_is_inconclusive_not_healthy(tmp_path) -> None:
    path = tmp_path / "stack.ts"
    torch.jit.save(torch.jit.script(_Stack()), str(path))
    runner = CliRunner()
    result = runner.invoke(cli, ["audit", str(path), "--trust-pickle", "--input-shape", "32,64", "--format", "json"])
    data = json.loads(result.stdout)
    assert data["summary"]["healthy"] is None
    assert data["summary"]["verdict"] == "inconclusive"
    assert any("TorchScript" in reason for reason in data["summary"]["inconclusive"])
    assert result.exit_code == 1  # inconclusive counts at --fail-on error (the default)
    never = runner.invoke(cli, ["audit", str(path), "--trust-pickle", "--input-shape", "32,64", "--fail-on", "never"])
    assert never.exit_code == 0
    assert "— inconclusive: per-layer activations and ∂ℓ/∂h could not be recorded" in " ".join(never.stdout.split())
    assert "— healthy" not in never.stdout


def test_inconclusive_survives_the_json_round_trip() -> None:
    report = audit(mlp(3, init=kaiming), input_shape=(8, 64), loss=lambda out: out.detach().sum() * 0)
    again = Report.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.summary() == report.summary()
    assert again.summary()["verdict"] == "inconclusive"


def test_no_gradient_reached_is_inconclusive() -> None:
    report = audit(mlp(3, init=kaiming), input_shape=(8, 64), loss=lambda out: out.detach().sum() * 0)
    assert report.summary()["healthy"] is None
    assert any("no gradient" in reason for reason in report.summary()["inconclusive"])


# -- fix --scheme auto only touches what a finding names ------------------------------------------


def test_fix_auto_on_a_healthy_model_changes_nothing() -> None:
    model = mlp(6, init=kaiming)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_init(model, "auto", input_shape=(64, 64)) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fix_auto_changes_only_the_layers_poor_init_names() -> None:
    model = _glorot_standard_tanh()
    changes = apply_init(model, "auto", input_shape=(128, 256))
    assert [c["layer"] for c in changes] == ["0", "2", "4", "6"]  # not the output layer '8'


# -- every message: quoted layer names, no "1x", no "from A to A", no clip from one norm ----------

_ONE_X = re.compile(r"(?<![\d.])1x\b")
_SAME_ENDS = re.compile(r"from '([^']+)'.* to '\1'")


def _all_findings() -> list[Finding]:
    torch.manual_seed(0)
    dead = mlp(3, init=kaiming, d_in=32)
    with torch.no_grad():
        dead[0].bias.fill_(-20.0)
    reports = [
        audit(mlp(10, act=nn.Sigmoid, init=normal(0.01)), input_shape=(64, 64)),
        audit(mlp(30, init=xavier), input_shape=(64, 64)),
        audit(mlp(10, init=normal(1.0)), input_shape=(64, 64)),
        audit(mlp(3, init=kaiming, d_in=32), inputs=torch.randn(64, 32) * 2e5),
        audit(mlp(3, init=kaiming, d_in=32), input_shape=(64, 32), loss=lambda out: out.pow(2).mean() * 1e6),
        audit(mlp(3, init=kaiming, d_in=32), input_shape=(64, 32), loss=lambda out: out.pow(2).mean() * 1e-12),
        audit(dead, input_shape=(64, 32)),
        audit(mlp(3, act=nn.Tanh, init=normal(5.0)), input_shape=(64, 64)),
        audit(_glorot_standard_tanh(), input_shape=(64, 256)),
        audit(_zero_head_mlp(), input_shape=(64, 64)),
        audit(_plain_gap_cnn("default"), input_shape=(2, 3, 32, 32)),
    ]
    return [f for r in reports for f in r.findings]


def test_every_message_quotes_its_layers_and_never_says_1x() -> None:
    findings = _all_findings()
    assert len({f.code for f in findings}) >= 9
    for f in findings:
        text = f.message + " " + (f.fix.summary if f.fix else "")
        assert not _ONE_X.search(text), text
        assert not _SAME_ENDS.search(text), text
        if f.layers:
            assert any(f"'{name}'" in f.message for name in f.layers + [str(v) for v in f.evidence.values()]), (
                f.code,
                f.message,
            )
        if Severity(f.severity) in LOUD:
            assert f.fix is not None and f.fix.code.strip(), f.code
        assert "observed global gradient norm" not in text and "observed norm" not in (f.fix.code if f.fix else "")


def test_an_audit_prints_no_clip_threshold_from_a_single_norm() -> None:
    report = audit(mlp(10, init=normal(1.0)), input_shape=(64, 64))
    assert report.analysis["clip"] is None
    assert report.analysis["global_grad_norm"] > 0
    explode = _finding(report, "exploding-gradient")
    assert "gradscope.watch derives one" in explode.fix.code
