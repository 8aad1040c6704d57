"""The optimizer audit against the lecture's closed form θ ← (1 − ηλ)·θ − η·∂ℓ/∂θ, the coupling
warning (Loshchilov & Hutter 2019), decayed biases/normalisation gains, the parameter-group
snippet, and the ``--optimizer`` grammar."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gradscope
from gradscope.cli import cli
from gradscope.errors import InputError
from gradscope.optim_spec import parse_optimizer_spec
from gradscope.optimizer_audit import group_decays, optimizer_findings


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 3))


def decay_findings(findings: list) -> list:
    return [f for f in findings if f.code == "weight-decay"]


@pytest.mark.parametrize("lr,wd", [(1e-2, 0.1), (0.5, 0.3), (1e-3, 1e-2)])
def test_zero_gradient_decoupled_decay_is_exactly_the_reported_factor(lr: float, wd: float) -> None:
    model = nn.Linear(5, 5)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    (group,) = group_decays(opt, model)
    assert group.mode == "decoupled"
    assert group.decay_factor == 1 - lr * wd  # what gradscope reports
    before = model.weight.detach().clone()
    steps = 7
    for _ in range(steps):
        opt.zero_grad()
        (0.0 * model(torch.randn(2, 5)).sum()).backward()  # a zero gradient: only the decay acts
        opt.step()
    # Adam's update is m/(sqrt(v)+eps) = 0 with zero gradients: the weights are (1 - ηλ)^k θ0.
    expected = before * group.decay_factor**steps
    torch.testing.assert_close(model.weight.detach(), expected, rtol=1e-6, atol=0)


def test_eta_lambda_at_least_one_is_an_error_and_below_is_not() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    bad = decay_findings(optimizer_findings(torch.optim.SGD(model.parameters(), lr=1.5, weight_decay=1.0), model))
    errors = [f for f in bad if f.severity == "error"]
    assert len(errors) == 1
    assert errors[0].evidence["groups"][0]["eta_lambda"] == 1.5
    assert errors[0].evidence["groups"][0]["decay_factor_per_step"] == pytest.approx(-0.5)
    ok = decay_findings(optimizer_findings(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1.0), model))
    assert not [f for f in ok if f.severity == "error"]
    # The fix's weight decay brings ηλ to 0.1.
    assert "0.0667" in errors[0].fix.code


def test_adam_weight_decay_warns_about_coupling_adamw_does_not() -> None:
    model = net()
    adam = optimizer_findings(torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-2), model)
    coupled = [f for f in adam if f.evidence.get("applied") == "coupled-l2"]
    assert len(coupled) == 1 and coupled[0].severity == "warning"
    assert "torch.optim.AdamW(" in coupled[0].fix.code
    for cls in (torch.optim.RMSprop, torch.optim.Adagrad):
        found = optimizer_findings(cls(model.parameters(), lr=1e-3, weight_decay=1e-2), model)
        assert any(f.evidence.get("applied") == "coupled-l2" for f in found), cls
    adamw = optimizer_findings(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2), model)
    assert not any(f.evidence.get("applied") == "coupled-l2" for f in adamw)
    decoupled_adam = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True)
    assert not any(f.evidence.get("applied") == "coupled-l2" for f in optimizer_findings(decoupled_adam, model))
    # SGD's L2 is the lecture's weight decay exactly: no coupling warning.
    sgd = optimizer_findings(torch.optim.SGD(model.parameters(), lr=1e-2, weight_decay=1e-2), model)
    assert not any(f.evidence.get("applied") == "coupled-l2" for f in sgd)


def test_decayed_biases_and_norm_gains_are_listed_exactly() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2, bias=False))
    found = optimizer_findings(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05), model)
    (listed,) = [f for f in found if "decayed_bias" in f.evidence]
    assert listed.evidence["decayed_bias"] == ["1.bias"]
    assert listed.evidence["decayed_norm"] == ["2.weight", "2.bias"]
    assert listed.evidence["decayed_embedding"] == ["0.weight"]
    assert listed.layers == ["0.weight", "1.bias", "2.weight", "2.bias"]
    assert listed.severity == "info"  # AdamW at 0.05: a convention question, gains can still reach 1/λ = 20
    assert listed.evidence["gains_pulled_down"] == []
    only_bias = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    (info,) = optimizer_findings(torch.optim.AdamW(only_bias.parameters(), weight_decay=0.05), only_bias)
    assert info.severity == "info" and info.evidence["decayed_bias"] == ["0.bias", "2.bias"]


@pytest.mark.parametrize(
    ("make", "warns"),
    [
        # torch.optim.AdamW's default decay on a Transformer: standard practice, information
        (lambda p: torch.optim.AdamW(p, lr=1e-3), False),
        (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1), False),
        # decoupled λ >= 0.5: Adam's ~η step cannot hold a gain above 1/λ <= 2
        (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.5), True),
        (lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.5, decoupled_weight_decay=True), True),
        # L2 coupled into an adaptive optimizer: rescaled with the gain's small gradient, it dominates
        (lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4), True),
        (lambda p: torch.optim.RMSprop(p, lr=1e-3, weight_decay=1e-4), True),
        # SGD's L2 on BatchNorm weights: the standard ResNet recipe, information
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4), False),
    ],
)
def test_decayed_normalisation_gains_warn_only_when_decay_competes_with_their_gradient(make: Any, warns: bool) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    (listed,) = [f for f in optimizer_findings(make(model.parameters()), model) if "decayed_norm" in f.evidence]
    assert listed.evidence["decayed_norm"] == ["1.weight", "1.bias"]
    assert listed.severity == ("warning" if warns else "info")
    assert listed.evidence["gains_pulled_down"] == (["1.weight", "1.bias"] if warns else [])
    assert ("as hard as their gradient" in listed.message) == warns


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
def test_parameter_group_snippet_compiles_and_clears_the_finding(kind: str) -> None:
    model = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 3))
    opt = {
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.05),
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    }[kind](model.parameters())
    findings = decay_findings(optimizer_findings(opt, model))
    assert findings
    for finding in findings:
        namespace = {"torch": torch, "model": model}
        exec(compile(finding.fix.code, "<snippet>", "exec"), namespace)
        fixed = namespace["optimizer"]
        assert isinstance(fixed, torch.optim.Optimizer)
        after = decay_findings(optimizer_findings(fixed, model))
        assert not [f for f in after if "decayed_bias" in f.evidence]
        assert sum(p.numel() for g in fixed.param_groups for p in g["params"]) == sum(
            p.numel() for p in model.parameters()
        )
    if kind == "sgd":  # the user's own hyper-parameters are carried over
        assert "momentum=0.9" in findings[0].fix.code


def test_audit_takes_the_optimizer() -> None:
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    report = gradscope.audit(
        model, input_shape=(8, 6), optimizer=torch.optim.SGD(model.parameters(), lr=2, weight_decay=1)
    )
    assert "weight-decay" in report.codes()
    assert report.analysis["optimizer"]["groups"][0]["eta_lambda"] == 2
    assert report.summary()["errors"] >= 1
    assert report.findings[0].severity == "error"  # sorted: the error first


def test_optimizer_spec_grammar() -> None:
    spec = parse_optimizer_spec(" AdamW : lr=1e-3, weight_decay=0.01, betas=(0.9,0.98), amsgrad=true ")
    assert spec.cls is torch.optim.AdamW
    assert spec.kwargs == {"lr": 1e-3, "weight_decay": 0.01, "betas": (0.9, 0.98), "amsgrad": True}
    assert parse_optimizer_spec("sgd").kwargs == {}
    for bad, text in [
        ("nope:lr=1", "unknown optimizer"),
        ("adam:foo=1", "takes no 'foo'"),
        ("adam:lr=x", "not a number"),
        ("adam:lr", "expected key=value"),
        ("adam:betas=(0.9,0.99", "unbalanced"),
    ]:
        with pytest.raises(InputError, match=text):
            parse_optimizer_spec(bad)


def test_cli_optimizer_option(tmp_path) -> None:
    path = tmp_path / "m.py"
    path.write_text(
        "from torch import nn\ndef build():\n    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))\n"
    )
    runner = CliRunner()
    ok = runner.invoke(
        cli, ["audit", f"{path}:build", "--format", "json", "--optimizer", "adamw:lr=1e-3,weight_decay=0"]
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["analysis"]["optimizer"]["optimizer"] == "AdamW"
    bad = runner.invoke(cli, ["audit", f"{path}:build", "--format", "json", "--optimizer", "sgd:lr=2,weight_decay=1"])
    assert bad.exit_code == 1
    assert any(f["code"] == "weight-decay" and f["severity"] == "error" for f in json.loads(bad.stdout)["findings"])
    usage = runner.invoke(cli, ["audit", f"{path}:build", "--optimizer", "adam:lr=-1"])
    assert usage.exit_code == 2
    assert usage.stdout == ""
    assert len(usage.stderr.strip().splitlines()) == 1 and "Invalid learning rate" in usage.stderr


def test_a_library_normalisation_class_is_a_normalisation_not_a_bias() -> None:
    """Llama's and T5's RMSNorms are plain nn.Modules (field sweep: their gains were
    counted as "biases", and the gain-pulling warning GPT-2's LayerNorms get was missed)."""
    from gradscope.optimizer_audit import no_decay_kind

    class LlamaRMSNorm(nn.Module):  # the library's shape: a gain, no nn.LayerNorm parent
        def __init__(self, width: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(width))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    model = nn.Sequential(nn.Linear(8, 8), LlamaRMSNorm(8), nn.Linear(8, 2))
    assert no_decay_kind(model, "1.weight", model[1].weight) == "norm"
    assert no_decay_kind(model, "0.bias", model[0].bias) == "bias"
    assert no_decay_kind(model, "0.weight", model[0].weight) is None
