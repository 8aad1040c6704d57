"""Evidence is a short table in every renderer: a nested value (a layer's numbers,
a list of parameter groups, a history) is one capped line of ``k=v`` items with
``… N more``, never a dict or list repr, whatever the finding code; the JSON
report keeps the whole value."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_render import synthetic_report

from gradscope.render import _format as F
from gradscope.render import render
from gradscope.report import Finding, Fix, Report, Severity

SCHEMA = Path(__file__).parent.parent / "docs" / "report-schema.md"
WIDTH = 100
# What a dict or list repr (Python or JSON) looks like inside a line.
REPR = re.compile(r"[{}]|\[\{|\[\[|\['|\[\"|': |\": |\[\d[\d., e+-]*\]")


def documented_codes() -> list[str]:
    """Every finding code: the schema's table (first cells) and the literals in gradscope's source."""
    text = SCHEMA.read_text(encoding="utf-8")
    table = text[text.index("### Finding codes") :].split("\n\n")[1]
    codes = [c for row in re.findall(r"^\| ([^|]+) \|", table, flags=re.M) for c in re.findall(r"`([a-z0-9-]+)`", row)]
    for source in (Path(__file__).parent.parent / "gradscope").rglob("*.py"):
        codes += re.findall(r'code="([a-z0-9]+-[a-z0-9-]+)"', source.read_text(encoding="utf-8"))
    return sorted(set(codes) - {"code"})


def nested_evidence(code: str) -> dict[str, object]:
    """The nested shapes findings carry (per-layer maps, parameter groups, histories,
    named thresholds, bands), with numbers that would print long if dumped."""
    layers = {
        f"encoder.layers.{i}.self_attention.out_proj": {
            "kind": "weight",
            "geometric_mean": 3.0e-7 * (i + 1),
            "last": 1.234567e-6,
            "max": 0.1234567,
            "lr_last": 1e-3,
        }
        for i in range(12)
    }
    return {
        "code_under_test": code,
        "matrix": [[1.0, 2.0], [3.0, 4.0]],
        "per_layer": layers,
        "parameters": {"3.weight": {"near_zero_frac": 0.5, "zero_frac": 0.0, "tolerance": 0.003536}},
        "groups": [{"group": 0, "lr": 1.5, "weight_decay": 1.0, "eta_lambda": 1.5, "applied": "coupled-l2"}],
        "history": [{"step": s, "severity": "warning", "layers": ["a", "b"]} for s in range(40)],
        "spike_steps": list(range(100, 160)),
        "largest_parameter_norms": {f"blocks.{i}.mlp.weight": 10.0**i for i in range(8)},
        "empty": [],
        "band": [1e-4, 1e-2],
        "thresholds": {"median_update_ratio": 0.1, "loss_growth": 2.0},
        "ratio_threshold": [0.5, 2.0],
    }


def report_with_every_code() -> Report:
    base = synthetic_report()
    findings = [
        Finding(
            code=code,
            severity=Severity.WARNING,
            layers=["stem.conv"],
            message=f"{code}: a finding with nested evidence",
            evidence=nested_evidence(code),
            fix=Fix("do the thing", "x = 1"),
        )
        for code in documented_codes()
    ]
    return Report(record=base.record, model=base.model, run=base.run, findings=findings, analysis=base.analysis)


class Cells(HTMLParser):
    """The text of every evidence value cell of an HTML report."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[str] = []
        self._in = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "td" and ("class", "gs-value") in attrs:
            self._in = True
            self.cells.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in = False

    def handle_data(self, data: str) -> None:
        if self._in:
            self.cells[-1] += data


def test_the_documented_codes_are_all_tested() -> None:
    codes = documented_codes()
    assert len(codes) >= 20 and {"update-ratio", "weight-decay", "l1-not-sparse", "nonfinite"} <= set(codes)


@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_no_evidence_line_is_a_blob(fmt: str) -> None:
    report = report_with_every_code()
    text = render(report, fmt, width=WIDTH)
    evidence_lines = [line for line in text.splitlines() if _is_evidence(line, fmt)]
    assert len(evidence_lines) >= len(documented_codes())
    for line in evidence_lines:
        assert not REPR.search(line), line
    if fmt == "table":
        assert all(len(line) <= WIDTH for line in text.splitlines())
        # every code: its per-layer map is one row, capped, with the count left out
        assert text.count("per_layer") == len(documented_codes())
        flat = re.sub(r"\s+", " ", text)
        assert re.search(
            r"per_layer encoder\.layers\.0\.self_attention\.out_proj=\(kind=weight [^)]*…\) … 11 more", flat
        )
        assert "threshold: median_update_ratio=0.1, loss_growth=2, ratio_threshold=0.5–2" in text
        assert re.search(r"^ +matrix +2 values, 2 values$", text, flags=re.M)


def _is_evidence(line: str, fmt: str) -> bool:
    if fmt == "markdown":
        return line.startswith("Evidence:")
    return line.startswith("    ") and not line.startswith("      ") or line.startswith("  threshold:")


def test_html_evidence_cells_are_short_and_flat() -> None:
    parser = Cells()
    parser.feed(report_with_every_code().to_html())
    cells = parser.cells
    assert len(cells) >= 10 * len(documented_codes())
    for cell in cells:
        assert not REPR.search(cell), cell
        assert len(cell) <= F.EVIDENCE_VALUE_CHARS


def test_json_keeps_the_whole_evidence() -> None:
    data = report_with_every_code().to_dict()
    for finding in data["findings"]:
        assert len(finding["evidence"]["per_layer"]) == 12
        assert finding["evidence"]["spike_steps"] == list(range(100, 160))
        assert finding["evidence"]["history"][39]["step"] == 39


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([35, 37, 38, 39], "35, 37, 38, 39"),
        (list(range(500)), "0, 1, 2, 3, 4, 5 … 494 more"),
        ({"a": 1, "b": "x"}, "a=1, b=x"),
        ({}, "none"),
        ([], "none"),
        ({"w": {"near_zero_frac": 0.5, "zero_frac": 0}}, "w=(near_zero_frac=0.5 zero_frac=0)"),
        ([{"step": 1, "severity": "warning"}, {"step": 2}], "(step=1 severity=warning); (step=2)"),
        ({"x": [1, 2, 3]}, "x=3 values"),
    ],
)
def test_evidence_values(value: object, expected: str) -> None:
    assert F.evidence_value(value) == expected
