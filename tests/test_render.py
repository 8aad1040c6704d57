"""Rendering: console (golden files), Markdown (golden files), JSON schema 1.

The goldens are rendered from a report built out of constructed statistics,
layer records and findings (not from an audit), so they depend neither on the
diagnosis rules nor on floating-point details of a forward pass.  Regenerate
them after a deliberate change of layout with::

    GRADSCOPE_UPDATE_GOLDEN=1 python -m pytest tests/test_render.py
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from gradscope.errors import GradscopeError
from gradscope.record import LayerRecord, Record
from gradscope.render import render
from gradscope.report import Finding, Fix, Report, Severity
from gradscope.stats import Stats, tensor_stats

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("GRADSCOPE_UPDATE_GOLDEN") == "1"
FP16_MAX = torch.finfo(torch.float16).max


def _stats(scale: float, n: int = 1000, *, nan: bool = False, offset: float = 0.0) -> Stats:
    """Statistics of a fixed ramp: ``scale * linspace(-1, 1, n) + offset`` (std = scale·√((n+1)/(3(n-1))))."""
    x = torch.linspace(-1.0, 1.0, n) * scale + offset
    if nan:
        x[n // 2] = float("nan")
    return Stats(tensor_stats(x).to(torch.float64))


def _layer(
    name: str,
    type_: str,
    index: int,
    *,
    act: float,
    grad: float | None,
    weight: float | None = None,
    nan_grad: bool = False,
    fan: tuple[int, int] | None = None,
    call: int = 1,
) -> LayerRecord:
    layer = LayerRecord(name=name, module=name.split("#")[0], type=type_, index=index, call=call)
    layer.stats["activation"] = _stats(act)
    if grad is not None:
        layer.stats["gradient"] = _stats(grad, nan=nan_grad)
    if weight is not None:
        layer.stats["weight"] = _stats(weight)
        layer.stats["weight_grad"] = _stats(grad or 1.0)
        layer.fan_in, layer.fan_out = fan or (64, 64)
        layer.weight_name = "weight"
    if call > 1:
        layer.shares_weights_with = layer.module
    return layer


LONG = "encoder.layers.11.self_attn.out_proj"


def synthetic_report(*, diagnosed: bool = True) -> Report:
    """A report with every feature the renderers show: call sites, NaN, overflow, long names, notes."""
    layers = [
        _layer("stem.conv", "Conv2d", 0, act=1.0, grad=1e-3, weight=0.5, fan=(27, 576)),
        _layer("stem.relu", "ReLU", 1, act=0.5, grad=1e-3),
        _layer(LONG, "NonDynamicallyQuantizableLinear", 2, act=1e5, grad=1e-4, weight=0.05),
        _layer("act", "Sigmoid", 3, act=0.2, grad=1e-5),
        _layer("act#2", "Sigmoid", 4, act=0.2, grad=1e-6, nan_grad=True, call=2),
        _layer("head", "Linear", 5, act=2.0, grad=1e-8, weight=0.01, fan=(64, 10)),
    ]
    record = Record(
        layers=layers,
        input=_stats(1.0),
        not_executed=["aux_head"],
        notes=["TorchScript submodules cannot carry hooks: parameter gradients only for 'jit_block'"],
        steps=1,
    )
    report = Report(
        record=record,
        model={
            "source": "models/net.py:build",
            "format": "factory",
            "type": "Net",
            "parameters": 123456,
            "trainable_parameters": 123456,
        },
        run={
            "input_shape": [64, 3, 8, 8],
            "input_dtype": "float32",
            "loss": "ce",
            "loss_from": "ce on output (10 classes)",
            "batches": 2,
            "seed": 0,
            "mode": "train",
            "device": "cpu",
            "formats": ["fp16"],
            "inputs": "synthetic",
        },
    )
    if not diagnosed:
        return report
    report.findings = [
        Finding(
            "nonfinite",
            Severity.ERROR,
            ["act#2"],
            "NaN first appears in the gradient of 'act#2' (Sigmoid): it produced it, its input gradient was finite.",
            {"first_layer": "act#2", "role": "gradient", "produced": True, "nonfinite_frac": 0.001},
            Fix(
                "Guard the operation that makes the NaN, or clip the input of 'act#2'.",
                "x = torch.nan_to_num(x)  # before model.act",
            ),
        ),
        Finding(
            "fp16-overflow",
            Severity.WARNING,
            [LONG],
            f"Activations of '{LONG}' reach 1.00e5, beyond fp16's maximum 65504: they become inf in fp16.",
            {
                "absmax": 1e5,
                "headroom_binades": math.log2(FP16_MAX / 1e5),
                "overflow_frac": 0.345,
                "threshold": FP16_MAX,
            },
            Fix(
                "Keep this block in fp32 (autocast disabled), or train in bf16.",
                f"with torch.autocast(device_type='cuda', enabled=False):\n    y = model.{LONG}(x.float())",
            ),
        ),
        Finding(
            "poor-init",
            Severity.WARNING,
            ["stem.conv"],
            "'stem.conv' has weight std 0.5, 1.8x Kaiming's 0.272 for ReLU (He et al. 2015).",
            {
                "weight_std": 0.5774,
                "recommended_std": 0.2722,
                "ratio": 2.121,
                "ratio_threshold": [0.5, 2.0],
                "gain": float("inf"),
                "history": [1, 2, 3, 4, 5, 6, 7, 8],
            },
            Fix(
                "Re-initialise with Kaiming normal.",
                "nn.init.kaiming_normal_(model.stem.conv.weight, nonlinearity='relu')",
            ),
        ),
        Finding(
            "vanishing-gradient",
            Severity.INFO,
            ["act", "act#2", "head"],
            "∂ℓ/∂h shrinks 1e3-fold from 'head' to 'act'.",
            {"ratio": float("nan")},
            None,
        ),
    ]
    report.analysis = {
        "depth": [],
        "first_unhealthy_forward": None,
        "first_unhealthy_backward": "head",
        "init": [
            {
                "name": "stem.conv",
                "type": "Conv2d",
                "fan_in": 27,
                "fan_out": 576,
                "weight_std": 0.5774,
                "recommended_std": math.sqrt(2 / 27),
                "scheme": "kaiming",
                "code": "...",
            },
            {
                "name": LONG,
                "type": "Linear",
                "fan_in": 64,
                "fan_out": 64,
                "weight_std": 0.0289,
                "recommended_std": math.sqrt(2 / 128),
                "scheme": "xavier",
                "code": "...",
            },
            {
                "name": "head",
                "type": "Linear",
                "fan_in": 64,
                "fan_out": 10,
                "weight_std": 0.00578,
                "recommended_std": float("inf"),
                "scheme": "xavier",
                "code": "...",
            },
        ],
        "loss_scale": {
            "format": "fp16",
            "exponent": 20,
            "scale": 2.0**20,
            "comparison": "GradScaler's default 2^16 is safe but leaves 12.0% of the gradient values flushed to zero",
            "method": "largest k with gradient absmax 0.00577 x 2^k <= fp16 max 65504 is 23; minus 3 of headroom",
            "normal_frac": 0.97,
            "code": 'scaler = torch.amp.GradScaler("cuda", init_scale=2.0**20)',
        },
        "clip": {"threshold": 5.0, "method": "2 x the median of 1 observed norm", "code": "clip(5)"},
    }
    return report


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
    assert path.exists(), f"missing golden file {path}; run with GRADSCOPE_UPDATE_GOLDEN=1"
    assert text + "\n" == path.read_text(encoding="utf-8"), f"{name} differs from its golden file"


@pytest.fixture(autouse=True)
def _no_env_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)


# --- goldens ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [80, 120])
def test_console_golden(width: int) -> None:
    _golden(f"report_{width}.txt", render(synthetic_report(), "table", width=width))


def test_console_golden_undiagnosed() -> None:
    _golden("report_undiagnosed_80.txt", render(synthetic_report(diagnosed=False), "table", width=80))


def test_markdown_golden() -> None:
    _golden("report.md", render(synthetic_report(), "markdown"))


def test_markdown_golden_undiagnosed() -> None:
    _golden("report_undiagnosed.md", render(synthetic_report(diagnosed=False), "markdown"))


# --- layout ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [50, 64, 80, 100, 160])
@pytest.mark.parametrize("diagnosed", [True, False])
def test_no_line_exceeds_width(width: int, diagnosed: bool) -> None:
    text = render(synthetic_report(diagnosed=diagnosed), "table", width=width)
    longest = max(len(line) for line in text.splitlines())
    assert longest <= width
    assert "\x1b[" not in text  # colour off by default


def test_long_name_truncated_in_the_middle_at_80_columns() -> None:
    text = render(synthetic_report(), "table", width=80)
    rows = [line for line in text.splitlines() if re.match(r"\s*2 ", line)]
    assert rows, "the row of layer 2 is missing"
    assert LONG not in rows[0]
    # both ends survive: where it sits and which leaf module it is
    assert "enc" in rows[0] and "out_proj" in rows[0] and "…" in rows[0]
    # the findings still name it in full (they fold, they do not truncate)
    assert LONG in text.replace("\n", "")


def test_headroom_and_std_columns_match_closed_form() -> None:
    report = synthetic_report()
    text = render(report, "table", width=120)
    row = next(line for line in text.splitlines() if LONG in line)
    # ramp of half-width 1e5: absmax = 1e5, headroom = log2(65504 / 1e5) = -0.61 binades
    headroom = f"{math.log2(FP16_MAX / 1e5):+.1f}"
    assert headroom == "-0.6" and headroom in row
    # std of linspace(-a, a, n) = a·sqrt((n+1) / (3(n-1)))
    std = 1e5 * math.sqrt(1001 / (3 * 999))
    assert f"{std:.2e}".replace("e+0", "e") in row
    # recommended std beside the weight std: Xavier sqrt(2/128) = 0.125
    assert "1.25e-1" in row
    assert "ovf" in row


def test_flags_call_sites_not_executed_and_notes_are_shown() -> None:
    report = synthetic_report()
    for fmt in ("table", "markdown"):
        text = render(report, fmt, width=100)
        pattern = r"\| 4 \|" if fmt == "markdown" else r" *4 +act#2 +Sigmoid"
        nan_row = next(line for line in text.splitlines() if re.match(pattern, line))
        assert "act#2" in nan_row
        assert "nan" in nan_row
        assert "aux_head" in text
        assert "jit_block" in text
        assert "relu" in text


def test_missing_analysis_shows_dash() -> None:
    text = render(synthetic_report(diagnosed=False), "table", width=100)
    row = next(line for line in text.splitlines() if "stem.conv" in line)
    assert row.rstrip().split()[6] == "—"  # rec std
    assert "No findings" in text


def test_markup_in_names_is_printed_literally() -> None:
    report = synthetic_report()
    report.record.layers[1].name = "blocks[bold]0[/bold]"
    text = render(report, "table", width=120)
    assert "blocks[bold]0[/bold]" in text


def test_depth_profile_bars_follow_log10_rms() -> None:
    text = render(synthetic_report(), "table", width=100)
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Depth profile"))
    bars = {}
    for line in lines[start + 2 : start + 8]:
        parts = line.split()
        bars[parts[1]] = (float(parts[2]), line.count("█"))
    # rms of a zero-mean ramp of half-width a: a·sqrt((n+1) / (3(n-1)))
    rms_head = 1e-8 * math.sqrt(1001 / (3 * 999))
    assert bars["head"][0] == pytest.approx(math.log10(rms_head), abs=0.05)
    # the bar length grows with log10 rms: stem.conv (1e-3) > LONG (1e-4) > head (1e-8)
    lengths = [bars[name][1] for name in ("stem.conv", "act", "head")]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]
    assert "!" in next(line for line in lines[start:] if " head " in line)  # 1e-8 is below 1e-6


# --- consistency -----------------------------------------------------------------------------------


def _counts(findings: list[Finding]) -> dict[str, int]:
    return {s.value: sum(1 for f in findings if Severity(f.severity) is s) for s in Severity}


@pytest.mark.parametrize("diagnosed", [True, False])
def test_summary_counts_match_findings(diagnosed: bool) -> None:
    report = synthetic_report(diagnosed=diagnosed)
    expected = _counts(report.findings)
    for fmt in ("table", "markdown"):
        text = render(report, fmt, width=100)
        m = re.search(r"(\d+) errors? · (\d+) warnings? · (\d+) infos? — (healthy|unhealthy)", text)
        assert m, fmt
        assert (int(m[1]), int(m[2]), int(m[3])) == (expected["error"], expected["warning"], expected["info"])
        assert (m[4] == "healthy") == (expected["error"] + expected["warning"] == 0)
    table = render(report, "table", width=100)
    assert table.count("✖ ") == expected["error"]
    assert table.count("▲ ") == expected["warning"]
    md = render(report, "markdown")
    for severity in ("error", "warning", "info"):
        assert len(re.findall(rf"^\| \S+ {severity} \|", md, flags=re.M)) == expected[severity]
    fixes_with_code = sum(1 for f in report.findings if f.fix is not None and f.fix.code)
    analysis_code = sum(1 for key in ("loss_scale", "clip") if (report.analysis.get(key) or {}).get("code"))
    assert md.count("```python") == fixes_with_code + analysis_code


def test_findings_ordered_by_severity_and_show_evidence_threshold_fix() -> None:
    text = render(synthetic_report(), "table", width=100)
    positions = [text.index(code) for code in ("✖ nonfinite", "▲ fp16-overflow", "▲ poor-init", "• vanishing")]
    assert positions == sorted(positions)
    block = text[text.index("▲ fp16-overflow") : text.index("▲ poor-init")]
    assert re.search(r"^ +absmax +1\.00e5$", block, flags=re.M)  # evidence: a short table, one row each
    assert "threshold: threshold=6.55e4" in block
    assert "fix: Keep this block in fp32" in block
    assert "torch.autocast" in block
    poor = text[text.index("▲ poor-init") : text.index("• vanishing")]
    assert re.search(r"^ +gain +inf$", poor, flags=re.M) and "… 2 more" in poor  # non-finite evidence, a long list cut


# --- JSON ------------------------------------------------------------------------------------------


def _strict(text: str) -> object:
    def reject(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=reject)


def test_json_is_one_strict_schema_1_document() -> None:
    report = synthetic_report()
    text = render(report, "json")
    data = _strict(text)
    assert isinstance(data, dict)
    assert data["schema"] == 1
    assert data == _strict(json.dumps(report.to_dict()))
    assert data["summary"] == {"errors": 1, "warnings": 2, "infos": 1, "healthy": False, "verdict": "unhealthy"}
    assert [layer["name"] for layer in data["layers"]] == [layer.name for layer in report.layers]
    assert data["findings"][2]["evidence"]["gain"] == "inf"
    assert data["findings"][3]["evidence"]["ratio"] == "nan"
    # exactly one document: a decoder stops at its end, and nothing follows
    _, end = json.JSONDecoder().raw_decode(text)
    assert text[end:].strip() == ""


@pytest.mark.parametrize("diagnosed", [True, False])
def test_json_round_trip_rerenders_identically(diagnosed: bool) -> None:
    report = synthetic_report(diagnosed=diagnosed)
    again = Report.from_dict(json.loads(render(report, "json")))
    for fmt in ("table", "markdown", "json"):
        assert render(again, fmt, width=80) == render(report, fmt, width=80), fmt


def test_unknown_format_is_a_gradscope_error() -> None:
    with pytest.raises(GradscopeError, match="table, json, markdown, html"):
        render(synthetic_report(), "pdf")


# --- colour ----------------------------------------------------------------------------------------


def test_colour_on_and_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    report = synthetic_report()
    coloured = render(report, "table", width=100, color=True)
    assert "\x1b[" in coloured
    plain = re.sub(r"\x1b\[[0-9;]*m", "", coloured)
    assert plain == render(report, "table", width=100)
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b[" not in render(report, "table", width=100, color=True)


# --- a real audit ----------------------------------------------------------------------------------


def test_real_audit_renders_within_80_columns() -> None:
    from gradscope.auditing import audit

    torch.manual_seed(0)
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(32, 32), relu, nn.Linear(32, 32), relu, nn.Linear(32, 4))
    report = audit(model, input_shape=(16, 32))
    text = render(report, "table", width=80)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "1#2" in text  # the ReLU module called twice: two call sites
    for layer in report.layers:
        assert layer.name in text
    again = Report.from_dict(json.loads(render(report, "json")))
    assert render(again, "table", width=80) == text
