"""The HTML report (``--format html``, ``Report.to_html``, ``_repr_html_``).

Structure is checked by parsing the page (``html.parser``), not by searching
text: the verdict element, one article per finding with its fix, the evidence
table, one point per layer in the depth chart, the watched-run sections only
for a watched run, nothing that loads from outside the file, and hostile
strings (a layer called ``<script>``) arriving as text, never as markup.  A
golden file pins the page for the constructed report of ``test_render``; the
browser test opens what the CLI wrote in headless Chromium.  Regenerate the
golden after a deliberate change of layout with::

    GRADSCOPE_UPDATE_GOLDEN=1 python -m pytest tests/test_html_report.py -k golden
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import sys
import types
from dataclasses import dataclass, field
from html import escape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from browser import console_errors, headless_chromium, requires_chromium
from click.testing import CliRunner
from test_render import _layer, synthetic_report

from gradscope.cli import cli
from gradscope.record import Record
from gradscope.render import _format as F
from gradscope.render import render, svg
from gradscope.render.html import CSP, ROOT_CLASS
from gradscope.report import Finding, Fix, Report, Severity
from gradscope.version import version

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("GRADSCOPE_UPDATE_GOLDEN") == "1"
HOSTILE = '<script>window.__pwned=1</script>"><img src=x onerror="window.__pwned=2">'


# -- a small DOM from html.parser --------------------------------------------------------------------


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def all_text(self) -> str:
        return "".join(self.text) + "".join(c.all_text() for c in self.children)

    def iter(self) -> Any:
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        return [
            n
            for n in self.iter()
            if (tag is None or n.tag == tag) and (cls is None or cls in n.attrs.get("class", "").split())
        ]

    def find(self, tag: str | None = None, cls: str | None = None) -> Node:
        found = self.find_all(tag, cls)
        assert found, f"no <{tag or '*'} class={cls}>"
        return found[0]


_VOID = {"meta", "img", "br", "hr", "input", "link", "source", "col", "area", "base", "wbr"}


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        assert tag not in _VOID
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].text.append(data)


def parse(page: str) -> Node:
    """The page as a tree; fails on any mis-nested or unclosed element."""
    builder = _Builder()
    builder.feed(page)
    builder.close()
    assert builder.stack == [builder.root], f"unclosed: {[n.tag for n in builder.stack[1:]]}"
    return builder.root


# -- reports ---------------------------------------------------------------------------------------


def healthy_report() -> Report:
    layers = [
        _layer("fc1", "Linear", 0, act=1.0, grad=1e-2, weight=0.1),
        _layer("fc2", "Linear", 1, act=1.0, grad=1e-2),
    ]
    return Report(record=Record(layers=layers, steps=1), model={"source": "m.py:build", "parameters": 100})


def inconclusive_report() -> Report:
    report = healthy_report()
    report.analysis["inconclusive"] = ["no gradient reached a hooked layer: the depth analysis did not run"]
    return report


def history(layers: list[str], steps: int = 30, *, bad_step: int | None = 25) -> dict[str, Any]:
    """A history dict as ``report.run["history"]`` holds it (see docs/report-schema.md)."""
    columns = list(range(1, steps + 1))
    grad = [[-3.0 + 0.02 * c + 0.5 * i for c in columns] for i in range(len(layers))]
    act = [[0.1 * i for _ in columns] for i in range(len(layers))]
    loss: list[float | None] = [2.0 / (1 + 0.1 * c) for c in columns]
    norm: list[float | None] = [1.0 + 0.05 * c for c in columns]
    nonfinite: dict[str, list[list[int]]] = {"gradient": [], "activation": []}
    if bad_step is not None:
        k = columns.index(bad_step)
        loss[k:] = [None] * (steps - k)
        norm[k:] = [None] * (steps - k)
        for row in grad:
            row[k:] = [None] * (steps - k)  # type: ignore[list-item]
        nonfinite["gradient"] = [[len(layers) - 1, k]]
    return {
        "steps": columns,
        "layers": list(layers),
        "gradient_rms_log10": grad,
        "activation_rms_log10": act,
        "nonfinite": nonfinite,
        "loss": loss,
        "grad_norm": norm,
        "clip_threshold": 1.2,
    }


def watched_report(*, with_history: bool = True) -> Report:
    report = synthetic_report()
    report.run = {"mode": "watch", "steps": 30, "every": 1, "formats": ["fp16"]}
    report.analysis["training"] = {
        "steps": 30,
        "every": 1,
        "sampled_steps": 30,
        "loss_last": 0.5,
        "global_grad_norm_last": 2.2,
        "global_grad_norm_max": 2.2,
        "spikes": 1,
        "spike_steps": [20],
        "clip": {"threshold": 1.2, "median_threshold": 2.5, "norms_seen": 24},
        "first_nonfinite": {"step": 25, "layer": "head", "role": "gradient", "origin": "produced"},
    }
    if with_history:
        report.run["history"] = history([layer.name for layer in report.layers])
    return report


def depth_series(page: Node, key: str) -> list[Node]:
    chart = page.find("svg", "gs-depth")
    group = next(g for g in chart.find_all("g", "gs-series") if g.attrs["data-series"] == key)
    return [n for n in group.iter() if "data-layer" in n.attrs]


# -- the verdict ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "word", "key"),
    [(healthy_report, "Healthy", "healthy"), (synthetic_report, "Unhealthy", "unhealthy"),
     (inconclusive_report, "Inconclusive", "inconclusive")],
)  # fmt: skip
def test_the_verdict_is_the_summary_verdict(make: Any, word: str, key: str) -> None:
    report = make()
    page = parse(report.to_html())
    assert report.summary()["verdict"] == key
    verdict = page.find("section", "gs-verdict")
    assert f"gs-verdict-{key}" in verdict.attrs["class"].split()
    assert verdict.find("div", "gs-verdict-word").all_text() == word
    assert F.summary_text(report) in verdict.all_text()
    assert page.find("div", ROOT_CLASS).attrs["data-verdict"] == key
    if key == "inconclusive":  # the reason is shown, not just the word
        assert "the depth analysis did not run" in verdict.all_text()


# -- findings, evidence, fixes ------------------------------------------------------------------------


def test_every_finding_is_shown_with_its_message_evidence_and_fix() -> None:
    report = synthetic_report()
    page = parse(report.to_html())
    articles = page.find_all("article", "gs-finding")
    expected = [f for _, group in F.grouped(report.findings) for f in group]
    assert [a.attrs["data-code"] for a in articles] == [f.code for f in expected]
    for article, finding in zip(articles, expected, strict=True):
        assert f"gs-sev-{finding.severity.value}" in article.attrs["class"]
        assert article.find("p", "gs-message").all_text() == finding.message
        assert article.find("span", "gs-layers").all_text() == F.layer_list(finding.layers)
        measured, thresholds = F.evidence_entries(finding.evidence)
        if measured or thresholds:
            rows = [[td.all_text() for td in tr.find_all("td")] for tr in article.find("table", "gs-evidence").iter()
                    if tr.tag == "tr" and tr.find_all("td")]  # fmt: skip
            assert rows == [[k, v] for k, v in measured] + [[f"threshold: {k}", v] for k, v in thresholds]
        if finding.fix is None:
            assert not article.find_all("pre")
            continue
        assert finding.fix.summary in article.find("p", "gs-fix-summary").all_text()
        assert article.find("pre", "gs-fix-code").all_text() == finding.fix.code.strip("\n")
    # severity groups, most severe first, with the console's titles and counts
    titles = [h.all_text() for h in page.find_all("h3", "gs-group-title")]
    assert titles == ["Errors (1)", "Warnings (2)", "Info (1)"]


def test_evidence_is_a_short_table_not_a_blob() -> None:
    report = synthetic_report()
    report.findings[0].evidence["history"] = list(range(500))
    page = parse(report.to_html())
    table = page.find("article", "gs-finding").find("table", "gs-evidence")
    cells = [td.all_text() for td in table.find_all("td")]
    assert all(len(c) <= F.EVIDENCE_VALUE_CHARS + len("threshold: ") for c in cells)
    assert "… 494 more" in " ".join(cells)  # the list is cut where the console cuts it


def test_header_names_model_parameters_inputs_loss_seed_and_version() -> None:
    page = parse(synthetic_report().to_html())
    rows = {tr.find("th").all_text(): tr.find("td").all_text() for tr in page.find("table", "gs-meta").find_all("tr")}
    assert rows["model"].startswith("models/net.py:build")
    assert rows["size"] == "123,456 parameters"
    assert rows["inputs"] == "float32 [64, 3, 8, 8] (synthetic; seed 0)"
    assert rows["loss"] == "ce: ce on output (10 classes)"
    assert rows["gradscope"] == version()


# -- escaping and self-containment --------------------------------------------------------------------


def hostile_report() -> Report:
    report = synthetic_report()
    for layer in report.layers:
        layer.name = HOSTILE + layer.name
    report.model["source"] = HOSTILE
    report.record.notes.append(HOSTILE)
    report.record.not_executed.append(HOSTILE)
    report.findings.append(
        Finding(
            HOSTILE,
            Severity.ERROR,
            [HOSTILE],
            HOSTILE + " </style></svg></pre>",
            {HOSTILE: HOSTILE, "threshold": HOSTILE},
            Fix(HOSTILE, f"x = '{HOSTILE}'\n</code></pre><script>window.__pwned=3</script>"),
        )
    )
    report.analysis["loss_scale"]["comparison"] = HOSTILE
    return report


def _markup(page: Node) -> tuple[list[str], list[tuple[str, str]]]:
    tags = [n.tag for n in page.iter()]
    handlers = [(n.tag, k) for n in page.iter() for k in n.attrs if k.startswith("on")]
    return tags, handlers


def test_hostile_strings_are_text_never_markup() -> None:
    report = hostile_report()
    text = report.to_html()
    page = parse(text)
    tags, handlers = _markup(page)
    assert "script" not in tags and handlers == []
    assert [n.attrs["src"] for n in page.find_all("img")] == []  # the audit has no heatmap: no image at all
    assert [n.tag for n in page.iter()].count("style") == 1
    # ... and the names arrive intact, as text the reader can see
    visible = page.all_text()
    assert visible.count(HOSTILE) >= 10
    assert escape(HOSTILE) in text
    for fragment in (report._repr_html_(), render(report, "html")):
        tags, handlers = _markup(parse(fragment))
        assert "script" not in tags and handlers == []


def test_control_characters_are_removed_as_in_the_other_formats() -> None:
    report = synthetic_report()
    report.layers[0].name = "stem\x1b[2J\u202e.conv"
    text = render(report, "html")
    assert "\x1b" not in text and "\u202e" not in text and "[2J" not in text and "<code>stem.conv</code>" in text


def _resources(page: Node) -> list[str]:
    keys = {"src", "href", "xlink:href", "srcset", "action", "poster", "data", "background", "formaction"}
    return [v for n in page.iter() for k, v in n.attrs.items() if k in keys]


@pytest.mark.parametrize("make", [synthetic_report, watched_report, hostile_report])
def test_nothing_is_loaded_from_outside_the_file(make: Any, heatmap_stub: None) -> None:
    text = make().to_html()
    page = parse(text)
    assert all(v.startswith("data:image/png;base64,") for v in _resources(page)), _resources(page)
    assert "http://" not in text and "https://" not in text
    css = page.find("style").all_text()
    assert "url(" not in css and "@import" not in css and "@font-face" not in css
    assert not page.find_all("link") and not page.find_all("script") and not page.find_all("iframe")
    meta = [n for n in page.find_all("meta") if n.attrs.get("http-equiv") == "Content-Security-Policy"]
    assert [m.attrs["content"] for m in meta] == [CSP] and "default-src 'none'" in CSP


def test_every_css_rule_is_scoped_to_the_report() -> None:
    """The Jupyter fragment must not restyle the notebook around it."""
    css = parse(synthetic_report()._repr_html_()).find("style").all_text()
    css = re.sub(r"@media[^{]*\{", "", css)  # the rules inside media queries are checked the same way
    for rule in re.findall(r"([^{}]+)\{[^{}]*\}", css):
        for selector in rule.split(","):
            assert selector.strip().startswith(f".{ROOT_CLASS}"), selector


def test_the_jupyter_fragment_is_the_page_body() -> None:
    report = synthetic_report()
    fragment = report._repr_html_()
    assert fragment.startswith(f'<div class="{ROOT_CLASS}"') and fragment.endswith("</div>")
    assert "<html" not in fragment and "<head" not in fragment and "<body" not in fragment
    assert fragment in report.to_html()


# -- the depth profile ------------------------------------------------------------------------------


def test_the_depth_chart_has_one_point_per_layer_and_series() -> None:
    report = synthetic_report()
    page = parse(report.to_html())
    layers = report.layers
    chart = page.find("svg", "gs-depth")
    assert chart.attrs["data-layers"] == str(len(layers))
    for key, role in (("activation", "activation"), ("gradient", "gradient"), ("weight_grad", "weight_grad")):
        measured = [i for i, layer in enumerate(layers) if layer.get(role) is not None]
        points = depth_series(page, key)
        assert [int(p.attrs["data-layer"]) for p in points] == measured, key
    # the NaN gradient of act#2 is drawn as a cross on the top edge, not left out
    nan_index = next(i for i, layer in enumerate(layers) if layer.name == "act#2")
    crosses = [p for p in depth_series(page, "gradient") if "gs-nonfinite" in p.attrs["class"].split()]
    assert [int(p.attrs["data-layer"]) for p in crosses] == [nan_index]
    names = [t.find("title").all_text() for t in chart.find_all("text", "gs-name")]
    assert names == [layer.name for layer in layers]


def test_the_depth_chart_puts_higher_values_higher_on_a_log_axis() -> None:
    report = synthetic_report()
    points = depth_series(parse(report.to_html()), "gradient")
    finite = [(p, report.layers[int(p.attrs["data-layer"])].gradient.rms) for p in points if p.tag == "rect"]
    ys = [float(p.attrs["y"]) for p, _ in finite]
    logs = [math.log10(v) for _, v in finite]
    # y is linear in log10(value) (SVG y grows downwards): equal decades, equal steps
    slope = (ys[-1] - ys[0]) / (logs[-1] - logs[0])
    assert slope < 0
    for y, lg in zip(ys, logs, strict=True):
        assert y == pytest.approx(ys[0] + slope * (lg - logs[0]), abs=0.15)


def test_flagged_layers_are_highlighted() -> None:
    report = synthetic_report()
    page = parse(report.to_html())
    chart = page.find("svg", "gs-depth")
    flagged_rows = [i for i, row in enumerate(F.layer_rows(report)) if row.flags]
    highlighted = chart.find_all("rect", "gs-flagged")
    assert len(highlighted) == len(flagged_rows) > 0
    red_names = [t.find("title").all_text() for t in chart.find_all("text", "gs-name-flagged")]
    assert red_names == [report.layers[i].name for i in flagged_rows]


# -- the watched run ---------------------------------------------------------------------------------


@pytest.fixture
def heatmap_stub(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    """A stand-in ``heatmap_png`` (the real one is tested with the browser test): a valid 1x1 PNG
    whose size the page must read, and a log of the calls."""
    calls: list[tuple[str, list[str]]] = []
    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    )

    def heatmap_png(history: dict[str, Any], quantity: str) -> bytes:
        calls.append((quantity, list(history["layers"])))
        return png

    module = types.ModuleType("gradscope.render.heatmap")
    module.heatmap_png = heatmap_png  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gradscope.render.heatmap", module)
    return calls


def test_watched_run_sections_appear_only_for_a_watched_run(heatmap_stub: list[Any]) -> None:
    audit = parse(synthetic_report().to_html())
    assert not audit.find_all("section", "gs-training") and not audit.find_all("svg", "gs-curve")
    assert not audit.find_all("img") and heatmap_stub == []

    report = watched_report()
    page = parse(report.to_html())
    training = page.find("section", "gs-training")
    lines = [tr.all_text() for tr in training.find("table", "gs-training-lines").find_all("tr")]
    assert any(line.startswith("AutoClip") and "1.2" in line and "24 global norms" in line for line in lines)
    assert any(line.startswith("first non-finite") and "step 25" in line and "head" in line for line in lines)
    assert any(line.startswith("gradient spikes") and "20" in line for line in lines)
    curves = training.find_all("svg", "gs-curve")
    assert [c.attrs["aria-label"] for c in curves] == [
        "Loss per optimizer step",
        "Global gradient norm per optimizer step, with the clip threshold",
    ]
    images = training.find_all("img", "gs-heatmap")
    assert [i.attrs["alt"] for i in images] == [
        "log10 ∂ℓ/∂h RMS per layer and step",
        "log10 activation RMS per layer and step",
    ]
    assert [(i.attrs["width"], i.attrs["height"]) for i in images] == [("1", "1")] * 2
    assert [q for q, _ in heatmap_stub] == ["gradient", "activation"]
    assert heatmap_stub[0][1] == [layer.name for layer in report.layers]

    caption = page.find("figure", "gs-figure-depth").find("figcaption").all_text()
    assert "non-finite at step 25: these whole-run statistics include the blow-up" in caption
    assert "blow-up" not in parse(synthetic_report().to_html()).find("figure", "gs-figure-depth").all_text()

    without = parse(watched_report(with_history=False).to_html())
    assert without.find_all("section", "gs-training") and not without.find_all("svg", "gs-curve")
    assert 'report.run["history"]' in without.find("section", "gs-training").all_text()


def test_the_heatmaps_are_the_history_pngs_inline() -> None:
    from PIL import Image

    from gradscope.render.heatmap import heatmap_png

    report = watched_report()
    page = parse(report.to_html())
    images = page.find("section", "gs-training").find_all("img", "gs-heatmap")
    assert len(images) == 2
    for image, quantity in zip(images, ("gradient", "activation"), strict=True):
        prefix, _, data = image.attrs["src"].partition(",")
        assert prefix == "data:image/png;base64"
        png = base64.b64decode(data, validate=True)
        assert png == heatmap_png(report.run["history"], quantity)
        with Image.open(io.BytesIO(png)) as decoded:
            assert (image.attrs["width"], image.attrs["height"]) == tuple(str(n) for n in decoded.size)


def test_curves_have_one_point_per_measured_step_a_gap_after_the_bad_step_and_the_clip_line(
    heatmap_stub: list[Any],
) -> None:
    report = watched_report()
    hist = report.run["history"]
    page = parse(report.to_html())
    loss, norm = page.find_all("svg", "gs-curve")
    measured = sum(v is not None for v in hist["loss"])
    assert loss.attrs["data-points"] == str(measured) == str(24)
    (line,) = loss.find_all("polyline")
    assert len(line.attrs["points"].split()) == measured
    # the threshold line sits where the axis puts 1.2, labelled with its origin
    (threshold,) = norm.find_all("line", "gs-threshold")
    assert "AutoClip threshold 1.2 (from 24 norms)" == norm.find("text", "gs-threshold-label").all_text()
    (norm_line,) = norm.find_all("polyline")
    pts = [tuple(map(float, p.split(","))) for p in norm_line.attrs["points"].split()]
    norms = [v for v in hist["grad_norm"] if v is not None]
    # y is linear in the axis' transform (log10 on a log axis, which needs a decade of data:
    # svg.LOG_AXIS_MIN_RATIO); interpolate the threshold's y from the first and last points
    spread = max(norms + [1.2]) / min(norms + [1.2])
    log_axis = spread >= svg.LOG_AXIS_MIN_RATIO
    assert ("(log axis)" in norm.find("text", "gs-legend").all_text()) == log_axis
    f = math.log10 if log_axis else (lambda v: v)
    (_, y0), (_, y1) = pts[0], pts[-1]
    slope = (y1 - y0) / (f(norms[-1]) - f(norms[0]))
    expected_y = y0 + slope * (f(1.2) - f(norms[0]))
    assert float(threshold.attrs["y1"]) == pytest.approx(expected_y, abs=0.2)
    marks = {m.find("title").all_text() for m in loss.find_all("line", "gs-mark")}
    assert marks == {"first non-finite value at step 25 in head", "gradient spike at step 20"}


def test_a_real_watched_run_renders_its_training_section() -> None:
    """``Scope.report().to_html()`` on a short run whose loss goes inf at step 12."""
    import logging

    from torch import nn

    from gradscope.watching import Scope

    logging.getLogger("gradscope").setLevel(logging.CRITICAL)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(0)
        with Scope(model, every=2, raise_on=()) as scope:
            for step in range(16):
                x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y) * (float("inf") if step == 12 else 1.0)
                loss.backward()
                scope.step(opt, loss=loss)
                opt.step()
    finally:
        logging.getLogger("gradscope").setLevel(logging.NOTSET)
    report = scope.report()
    page = parse(report.to_html())
    assert page.find("div", ROOT_CLASS).attrs["data-verdict"] == "unhealthy"
    training = page.find("section", "gs-training")
    lines = [tr.all_text() for tr in training.find("table", "gs-training-lines").find_all("tr")]
    first = report.analysis["training"]["first_nonfinite"]
    assert any(line.startswith(f"first non-finitestep {first['step']},") for line in lines), lines
    history = report.run["history"]
    loss, norm = training.find_all("svg", "gs-curve")
    assert loss.attrs["data-points"] == str(sum(F.as_float(v) is not None for v in history["loss"]))
    assert norm.attrs["data-points"] == str(sum(F.as_float(v) is not None for v in history["grad_norm"]))
    assert len(training.find_all("img", "gs-heatmap")) == 2
    assert report._repr_html_() in report.to_html()


def test_a_report_json_round_trip_renders_the_same_page(heatmap_stub: list[Any]) -> None:
    report = watched_report()
    again = Report.from_dict(json.loads(render(report, "json")))
    assert again.to_html() == report.to_html()


def test_the_page_is_deterministic() -> None:
    assert synthetic_report().to_html() == synthetic_report().to_html()


def test_html_golden() -> None:
    text = render(synthetic_report(), "html").replace(escape(version()), "VERSION")
    path = GOLDEN / "report.html"
    if UPDATE:
        path.write_text(text + "\n", encoding="utf-8")
    assert path.exists(), f"missing golden file {path}; run with GRADSCOPE_UPDATE_GOLDEN=1"
    assert text + "\n" == path.read_text(encoding="utf-8"), "report.html differs from its golden file"


# -- the CLI -------------------------------------------------------------------------------------------

MODULE_NAME = '"><img src=x onerror="alert(1)">'
HOSTILE_MODEL = f"""
import torch
from torch import nn


class Hostile(nn.Module):
    def __init__(self):
        super().__init__()
        self.add_module({MODULE_NAME!r}, nn.Linear(8, 8))  # module names may hold anything but "."
        self.add_module("<script>", nn.Sigmoid())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        for module in self.children():
            x = module(x)
        return x


def build():
    torch.manual_seed(0)
    return Hostile()
"""

EXAMPLE_MODEL = """
import torch
from torch import nn

from gradscope.examples import init_normal, mlp


def vanishing():
    # the built-in "vanishing" example: 10 x (Linear(128, 128) -> Sigmoid), weights N(0, 0.01)
    torch.manual_seed(0)
    return init_normal(mlp(10, nn.Sigmoid), 0.01)
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("html_models")
    (folder / "hostile.py").write_text(HOSTILE_MODEL)
    (folder / "example.py").write_text(EXAMPLE_MODEL)
    return folder


def run(*args: object) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_audit_format_html_on_stdout_and_in_a_file_with_the_usual_exit_code(models: Path, tmp_path: Path) -> None:
    spec = f"{models / 'example.py'}:vanishing"
    printed = run("audit", spec, "--format", "html")
    assert printed.exit_code == 1, printed.stderr  # the vanishing-gradient error, as for every format
    assert printed.stdout.startswith("<!DOCTYPE html>") and printed.stdout.endswith("</html>\n")
    target = tmp_path / "report.html"
    written = run("audit", spec, "--format", "html", "-o", target)
    assert written.exit_code == 1 and written.stdout == ""
    assert target.read_text(encoding="utf-8") == printed.stdout
    page = parse(printed.stdout)
    assert "vanishing-gradient" in [a.attrs["data-code"] for a in page.find_all("article", "gs-finding")]
    assert len(depth_series(page, "gradient")) == 21


def test_report_format_html_renders_a_saved_json(models: Path, tmp_path: Path) -> None:
    spec = f"{models / 'example.py'}:vanishing"
    saved = tmp_path / "r.json"
    assert run("audit", spec, "--format", "json", "-o", saved).exit_code == 1
    result = run("report", saved, "--format", "html", "--fail-on", "never")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == render(Report.from_dict(json.loads(saved.read_text())), "html") + "\n"


def test_hostile_layer_names_from_a_model_file_stay_text(models: Path) -> None:
    result = run("audit", f"{models / 'hostile.py'}:build", "--input-shape", "4,8", "--format", "html")
    assert result.exit_code in (0, 1), result.stderr
    page = parse(result.stdout)
    tags, handlers = _markup(page)
    assert "script" not in tags and handlers == [] and not page.find_all("img")
    names = [t.find("title").all_text() for t in page.find_all("text", "gs-name")]
    assert MODULE_NAME in names and "<script>" in names


def test_bad_input_is_one_line_and_no_file(models: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.html"
    missing = run("audit", f"{models / 'nope.py'}:build", "--format", "html", "-o", target)
    assert missing.exit_code == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert missing.stderr.startswith("gradscope: error: ") and not target.exists()
    # an output naming the input is refused before anything runs, and the input is kept
    model = models / "example.py"
    before = model.read_text()
    clash = run("audit", f"{model}:vanishing", "--format", "html", "-o", model)
    assert clash.exit_code == 2 and len(clash.stderr.strip().splitlines()) == 1
    assert model.read_text() == before
    not_json = tmp_path / "bad.json"
    not_json.write_text("{")
    bad = run("report", not_json, "--format", "html", "-o", target)
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1 and not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]  # nothing staged was left behind


def test_a_foreign_json_with_a_malformed_history_is_one_error_line(tmp_path: Path) -> None:
    data = json.loads(render(watched_report(), "json"))
    target = tmp_path / "out.html"
    for broken in (
        {"steps": "x", "layers": 5},
        {**data["run"]["history"], "loss": ["<script>"] * 30, "steps": [1e999]},
    ):
        data["run"]["history"] = broken
        (tmp_path / "r.json").write_text(json.dumps(data))
        result = run("report", tmp_path / "r.json", "--format", "html", "-o", target)
        assert result.exit_code in (1, 2), result.stderr
        if result.exit_code == 2:
            assert len(result.stderr.strip().splitlines()) == 1 and "internal error" not in result.stderr
            assert not target.exists()
        else:  # rendered without the parts it could not read
            assert "<script>" not in target.read_text(encoding="utf-8")


# -- headless Chromium -------------------------------------------------------------------------------

SCREENSHOTS = Path("/tmp/gradscope-html")


def _watched_json(path: Path) -> Report:
    """The demo's diverging run (SGD with a learning rate warmed up past the stability limit),
    saved as the report JSON the CLI re-renders."""
    import logging

    from gradscope.training_demo import train

    logging.getLogger("gradscope").setLevel(logging.CRITICAL)
    try:
        result = train()
    finally:
        logging.getLogger("gradscope").setLevel(logging.NOTSET)
    assert result.stopped is not None  # it diverged, and watch stopped it
    path.write_text(render(result.report, "json"), encoding="utf-8")
    return result.report


_INSPECT = """
const visible = (el) => { const r = el.getBoundingClientRect(); return [r.width, r.height]; };
const verdict = document.querySelector('.gs-verdict');
return {
  verdict: verdict ? verdict.innerText : null,
  verdictSize: verdict ? visible(verdict) : null,
  charts: [...document.querySelectorAll('svg.gs-chart')].map(
      (s) => [s.getAttribute('aria-label'), ...visible(s), s.querySelectorAll('[data-layer], polyline').length]),
  yTicks: [...document.querySelectorAll('svg.gs-chart')].map(
      (s) => [...s.querySelectorAll('text.gs-tick[text-anchor="end"]')].map((t) => t.textContent)
          .filter((t) => t !== 'optimizer step')),
  images: [...document.querySelectorAll('img.gs-heatmap')].map(
      (i) => [i.alt, i.complete, i.naturalWidth, i.naturalHeight, ...visible(i)]),
  scripts: document.scripts.length,
  pwned: window.__pwned === undefined ? null : window.__pwned,
};
"""


def _open_pages(pages: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Each page in light and dark: what the page shows, no console error, a full-page screenshot."""
    seen: dict[str, dict[str, Any]] = {}
    with headless_chromium(width=1280, height=900) as driver:
        for name, page in pages.items():
            for scheme in ("light", "dark"):
                driver.execute_cdp_cmd(
                    "Emulation.setEmulatedMedia",
                    {"features": [{"name": "prefers-color-scheme", "value": scheme}]},
                )
                driver.get(page.as_uri())
                info = driver.execute_script(_INSPECT)
                assert console_errors(driver) == [], (name, scheme)
                height = driver.execute_script("return document.documentElement.scrollHeight")
                driver.set_window_size(1280, min(int(height) + 140, 8000))
                driver.save_screenshot(str(SCREENSHOTS / f"{name}-{scheme}.png"))
                driver.set_window_size(1280, 900)
                seen[f"{name}-{scheme}"] = info
    for key, info in seen.items():
        assert info["scripts"] == 0 and info["pwned"] is None, key
        assert info["verdict"] and info["verdictSize"][0] > 300 and info["verdictSize"][1] > 30, key
        for label, width, height, marks in info["charts"]:
            assert width > 200 and height > 100 and marks > 0, (key, label)
        for ticks in info["yTicks"]:  # as drawn: distinct numbers on every axis (test_svg_ticks)
            assert ticks and len(set(ticks)) == len(ticks) and all(math.isfinite(float(t)) for t in ticks), (key, ticks)
    return seen


DEPTH_LABEL = "Depth profile: per-layer RMS on a log axis, input to output"


@pytest.mark.slow
@requires_chromium
def test_audit_pages_render_in_headless_chromium(models: Path) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    audit_page = SCREENSHOTS / "audit.html"
    result = run("audit", f"{models / 'example.py'}:vanishing", "--format", "html", "-o", audit_page)
    assert result.exit_code == 1, result.stderr
    hostile_page = SCREENSHOTS / "hostile.html"
    result = run("audit", f"{models / 'hostile.py'}:build", "--input-shape", "4,8", "--format", "html", "-o",
                 hostile_page)  # fmt: skip
    assert result.exit_code in (0, 1), result.stderr
    seen = _open_pages({"audit": audit_page, "hostile": hostile_page})
    for scheme in ("light", "dark"):
        audit = seen[f"audit-{scheme}"]
        assert audit["verdict"].startswith("Unhealthy")
        assert [c[0] for c in audit["charts"]] == [DEPTH_LABEL]
        # one point per layer and series (21 activations, 21 ∂ℓ/∂h, 11 weight gradients), plus one line each
        assert audit["charts"][0][3] == 21 + 21 + 11 + 3
        assert audit["images"] == []
    assert seen["hostile-light"]["verdict"].startswith(("Healthy", "Unhealthy"))


@pytest.mark.slow
@requires_chromium
def test_a_watched_run_page_renders_in_headless_chromium() -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    _watched_json(SCREENSHOTS / "watched.json")
    watched_page = SCREENSHOTS / "watched.html"
    result = run("report", SCREENSHOTS / "watched.json", "--format", "html", "-o", watched_page)
    assert result.exit_code == 1, result.stderr
    seen = _open_pages({"watched": watched_page})
    for scheme in ("light", "dark"):
        watch = seen[f"watched-{scheme}"]
        assert watch["verdict"].startswith("Unhealthy")
        assert [c[0] for c in watch["charts"]] == [
            "Loss per optimizer step",
            "Global gradient norm per optimizer step, with the clip threshold",
            DEPTH_LABEL,
        ]
        assert len(watch["images"]) == 2, "the heatmaps of report.run['history']"
        for alt, complete, natural_w, natural_h, width, height in watch["images"]:
            assert complete and natural_w > 0 and natural_h > 0 and width > 100 and height > 50, alt
