"""The HTML report: one self-contained page to share, print, or show in Jupyter.

Same content and words as the console and Markdown reports (the text comes from
``gradscope.render._format``): the header, the verdict, the findings by
severity with their evidence as a short table and the fix with its snippet, the
depth profile as an inline SVG chart, and for a watched run the training
analysis, the loss and global-norm curves (with the AutoClip threshold) and the
layer x step heatmaps of ``report.run["history"]`` as inline PNG.

Self-contained means nothing is fetched: no font, stylesheet, script or image
outside the file (images are ``data:`` URIs), and the full page declares a
Content-Security-Policy that forbids any load and every script, so even a
string that escaped escaping could not run or call out.  Every string of the
report goes through ``html.escape`` (layer names, messages and snippets come
from model code or a foreign JSON: a layer may be called ``<script>``).
The output is deterministic: no timestamp, nothing random.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from gradscope.render import _format as F
from gradscope.render import svg
from gradscope.report import Finding, Report, Severity
from gradscope.version import version

ROOT_CLASS = "gradscope-report"
VERDICT_TEXT = {True: "Healthy", False: "Unhealthy", None: "Inconclusive"}
VERDICT_KEY = {True: "healthy", False: "unhealthy", None: "inconclusive"}
_SEVERITY_MARK = {Severity.ERROR: "✖", Severity.WARNING: "▲", Severity.INFO: "•"}

# No load of any kind, no script; inline styles and data: images only (the page is
# viewed from file://, mail attachments and CI artefacts, where a fetch is a leak).
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _e(text: object) -> str:
    return escape(str(text), quote=True)


# Every selector is scoped under the root class, so the fragment shown in Jupyter
# styles itself and nothing around it.  The palette is set on the root in both
# themes (a notebook's own dark theme does not tell the page); the dark one only on screen, so print is light.
_CSS = """
.gradscope-report{--bg:#ffffff;--fg:#1f2328;--muted:#59636e;--border:#d1d9e0;--panel:#f6f8fa;
--error:#cf222e;--warning:#9a6700;--info:#0969da;--ok:#1a7f37;--flag:rgba(207,34,46,.07);
--band:rgba(26,127,55,.08);--act:#0969da;--grad:#bc4c00;--wgrad:#8250df;--loss:#0969da;--norm:#bc4c00;
background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
padding:16px 20px;max-width:1200px;margin:0 auto;text-align:left}
@media screen and (prefers-color-scheme:dark){.gradscope-report{--bg:#0d1117;--fg:#e6edf3;--muted:#9198a1;
--border:#3d444d;--panel:#151b23;--error:#ff7b72;--warning:#d29922;--info:#58a6ff;--ok:#3fb950;
--flag:rgba(255,123,114,.12);--band:rgba(63,185,80,.10);--act:#58a6ff;--grad:#ffa657;--wgrad:#d2a8ff;
--loss:#58a6ff;--norm:#ffa657}}
.gradscope-report h1{font-size:22px;margin:0 0 8px}
.gradscope-report h2{font-size:18px;margin:24px 0 8px;border-bottom:1px solid var(--border);padding-bottom:4px}
.gradscope-report h3{font-size:15px;margin:16px 0 6px}
.gradscope-report code,.gradscope-report pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
font-size:12.5px}
.gradscope-report pre{background:var(--panel);border:1px solid var(--border);border-radius:6px;padding:8px 10px;
overflow-x:auto;white-space:pre;margin:6px 0}
.gradscope-report table{border-collapse:collapse;margin:6px 0}
.gradscope-report th,.gradscope-report td{border:1px solid var(--border);padding:3px 8px;vertical-align:top;
text-align:left}
.gradscope-report th{background:var(--panel);font-weight:600}
.gradscope-report td.gs-num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.gradscope-report td.gs-value{font-variant-numeric:tabular-nums}
.gradscope-report .gs-meta th{background:none;border:none;padding:1px 12px 1px 0;color:var(--muted);font-weight:500;
white-space:nowrap}
.gradscope-report .gs-meta td{border:none;padding:1px 0}
.gradscope-report .gs-verdict{border:2px solid var(--v);border-left-width:10px;border-radius:8px;padding:10px 14px;
margin:12px 0}
.gradscope-report .gs-verdict-word{font-size:26px;font-weight:700;color:var(--v)}
.gradscope-report .gs-verdict-healthy{--v:var(--ok)}
.gradscope-report .gs-verdict-unhealthy{--v:var(--error)}
.gradscope-report .gs-verdict-inconclusive{--v:var(--warning)}
.gradscope-report .gs-muted{color:var(--muted)}
.gradscope-report .gs-finding{border:1px solid var(--border);border-left:5px solid var(--sev);border-radius:6px;
padding:8px 12px;margin:8px 0}
.gradscope-report .gs-sev-error{--sev:var(--error)}
.gradscope-report .gs-sev-warning{--sev:var(--warning)}
.gradscope-report .gs-sev-info{--sev:var(--info)}
.gradscope-report .gs-group-title{color:var(--sev)}
.gradscope-report .gs-badge{color:var(--sev);font-weight:700}
.gradscope-report .gs-message{margin:4px 0 6px}
.gradscope-report .gs-fix-summary{margin:6px 0 2px}
.gradscope-report ul{margin:4px 0;padding-left:22px}
.gradscope-report figure{margin:8px 0 16px}
.gradscope-report figcaption{color:var(--muted);font-size:12.5px;margin-top:4px;max-width:900px}
.gradscope-report .gs-scroll{overflow-x:auto;max-width:100%}
.gradscope-report .gs-row{display:flex;flex-wrap:wrap;gap:12px 28px}
.gradscope-report img.gs-heatmap{max-width:100%;height:auto;
border:1px solid var(--border);background:#fff}
.gradscope-report svg{display:block;font-family:inherit;overflow:visible}
.gradscope-report svg text{fill:var(--fg);font-size:11px}
.gradscope-report svg .gs-tick,.gradscope-report svg .gs-name{fill:var(--muted)}
.gradscope-report svg .gs-name-flagged{fill:var(--error);font-weight:700}
.gradscope-report svg .gs-grid{stroke:var(--border);stroke-width:1}
.gradscope-report svg .gs-axis{stroke:var(--muted);stroke-width:1}
.gradscope-report svg .gs-band{fill:var(--band)}
.gradscope-report svg .gs-band-edge{stroke:var(--ok);stroke-width:1;stroke-dasharray:4 3;opacity:.7}
.gradscope-report svg .gs-flagged{fill:var(--flag)}
.gradscope-report svg .gs-line{fill:none;stroke-width:1.6}
.gradscope-report svg .gs-pt{stroke:var(--bg);stroke-width:.8}
.gradscope-report svg .gs-nonfinite{stroke-width:2.2;fill:none}
.gradscope-report svg .gs-threshold{stroke:var(--error);stroke-width:1.4;stroke-dasharray:6 4}
.gradscope-report svg .gs-threshold-label{fill:var(--error);paint-order:stroke;stroke:var(--bg);stroke-width:3px;
stroke-linejoin:round}
.gradscope-report svg .gs-mark{stroke-width:1.4}
.gradscope-report svg .gs-mark-nonfinite{stroke:var(--error)}
.gradscope-report svg .gs-mark-spike{stroke:var(--warning);stroke-dasharray:2 3}
.gradscope-report svg .gs-s-activation{stroke:var(--act);fill:var(--act)}
.gradscope-report svg .gs-s-gradient{stroke:var(--grad);fill:var(--grad)}
.gradscope-report svg .gs-s-weight_grad{stroke:var(--wgrad);fill:var(--wgrad)}
.gradscope-report svg .gs-s-loss{stroke:var(--loss);fill:var(--loss)}
.gradscope-report svg .gs-s-grad_norm{stroke:var(--norm);fill:var(--norm)}
.gradscope-report svg .gs-line.gs-s-activation,.gradscope-report svg .gs-line.gs-s-gradient,
.gradscope-report svg .gs-line.gs-s-weight_grad,.gradscope-report svg .gs-line.gs-s-loss,
.gradscope-report svg .gs-line.gs-s-grad_norm{fill:none}
.gradscope-report svg .gs-pt.gs-nonfinite{fill:none}
.gradscope-report footer{margin-top:24px;color:var(--muted);font-size:12.5px}
@media print{.gradscope-report{max-width:none;padding:0}
.gradscope-report .gs-finding,.gradscope-report figure,.gradscope-report .gs-verdict{break-inside:avoid}
.gradscope-report .gs-scroll{overflow:visible}.gradscope-report svg,.gradscope-report img.gs-heatmap{max-width:100%;
height:auto}.gradscope-report pre{white-space:pre-wrap}}
"""


def render_html(report: Report) -> str:
    """The report as one self-contained HTML document (without a trailing newline).

    The strings of ``report`` should already be free of control characters
    (``gradscope.render.render`` cleans them); here everything is escaped.
    """
    title = f"gradscope report — {report.model.get('source') or 'model'}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="color-scheme" content="light dark">',
            f'<meta name="generator" content="gradscope {_e(version())}">',
            f"<title>{_e(title)}</title>",
            "</head>",
            '<body style="margin:0">',
            render_html_fragment(report),
            "</body>",
            "</html>",
        ]
    )


def render_html_fragment(report: Report) -> str:
    """The report as one ``<div>`` with its own scoped ``<style>`` (for Jupyter's ``_repr_html_``)."""
    summary = report.summary()
    parts: list[str] = [f'<div class="{ROOT_CLASS}" data-verdict="{VERDICT_KEY[summary["healthy"]]}">']
    parts.append(f"<style>{_CSS.strip()}</style>")
    parts += _header(report)
    parts += _verdict(report)
    parts += _findings(report)
    training = report.analysis.get("training") if isinstance(report.analysis, Mapping) else None
    if isinstance(training, Mapping) or report.run.get("mode") == "watch":
        parts += _training(report, training if isinstance(training, Mapping) else {})
    parts += _depth_profile(report)
    parts += _analysis(report)
    parts += _layer_table(report)
    parts += _extras(report)
    parts.append(f"<footer>gradscope {_e(version())} · {_e(F.summary_text(report))}</footer>")
    parts.append("</div>")
    return "\n".join(parts)


# -- header and verdict ---------------------------------------------------------------------------


def _header(report: Report) -> list[str]:
    rows = [*F.header_items(report), ("gradscope", version())]
    out = ["<h1>gradscope report</h1>", '<table class="gs-meta">']
    out += [f"<tr><th>{_e(label)}</th><td>{_e(text)}</td></tr>" for label, text in rows]
    out.append("</table>")
    return out


def _verdict(report: Report) -> list[str]:
    summary = report.summary()
    healthy = summary["healthy"]
    key = VERDICT_KEY[healthy]
    out = [
        f'<section class="gs-verdict gs-verdict-{key}" role="status">',
        f'<div class="gs-verdict-word">{VERDICT_TEXT[healthy]}</div>',
        f'<div class="gs-summary">{_e(F.summary_text(report))}</div>',
    ]
    reasons = summary.get("inconclusive") or []
    if reasons:
        out.append('<p class="gs-muted">Not assessed, so not called healthy:</p><ul>')
        out += [f"<li>{_e(r)}</li>" for r in reasons]
        out.append("</ul>")
    out.append("</section>")
    return out


# -- findings -------------------------------------------------------------------------------------


def _findings(report: Report) -> list[str]:
    groups = F.grouped(report.findings)
    if not groups:
        return ["<h2>Findings</h2>", '<p class="gs-no-findings">No findings: nothing out of the healthy ranges.</p>']
    out = ["<h2>Findings</h2>"]
    for severity, findings in groups:
        out.append(f'<section class="gs-group gs-sev-{severity.value}">')
        out.append(f'<h3 class="gs-group-title">{F.SEVERITY_TITLE[severity]} ({len(findings)})</h3>')
        for finding in findings:
            out += _finding(severity, finding)
        out.append("</section>")
    return out


def _finding(severity: Severity, finding: Finding) -> list[str]:
    layers = F.layer_list(finding.layers)
    out = [
        f'<article class="gs-finding gs-sev-{severity.value}" data-code="{_e(finding.code)}">',
        f'<div><span class="gs-badge">{_SEVERITY_MARK[severity]} {severity.value}</span> '
        f"<code>{_e(finding.code)}</code> · "
        f'<span class="gs-layers" title="{_e(", ".join(finding.layers))}">{_e(layers)}</span></div>',
        f'<p class="gs-message">{_e(finding.message)}</p>',
    ]
    measured, thresholds = F.evidence_entries(finding.evidence)
    if measured or thresholds:
        out.append('<table class="gs-evidence"><tr><th colspan="2">evidence</th></tr>')
        out += [f'<tr><td>{_e(k)}</td><td class="gs-value">{_e(v)}</td></tr>' for k, v in measured]
        out += [f'<tr><td>threshold: {_e(k)}</td><td class="gs-value">{_e(v)}</td></tr>' for k, v in thresholds]
        out.append("</table>")
    if finding.fix is not None:
        out.append(f'<p class="gs-fix-summary"><strong>fix:</strong> {_e(finding.fix.summary)}</p>')
        if finding.fix.code.strip():
            out.append(f'<pre class="gs-fix-code"><code>{_e(finding.fix.code.strip(chr(10)))}</code></pre>')
    out.append("</article>")
    return out


# -- the depth profile ----------------------------------------------------------------------------

_DEPTH_SERIES = (
    ("activation", "activation RMS", "activation", "circle"),
    ("gradient", "∂ℓ/∂h RMS", "gradient", "square"),
    ("weight_grad", "weight-gradient RMS", "weight_grad", "diamond"),
)


def _rms(stats: Any) -> float | None:
    if stats is None or stats.count == 0:
        return None
    return float(stats.rms)


def _depth_profile(report: Report) -> list[str]:
    out = ["<h2>Depth profile</h2>"]
    layers = report.layers
    if not layers:
        return out + ['<p class="gs-muted">No layer was recorded.</p>']
    rows = F.layer_rows(report)
    names = [layer.name for layer in layers]
    series = []
    for key, label, role, marker in _DEPTH_SERIES:
        values = [_rms(layer.get(role)) for layer in layers]
        if all(v is None for v in values):
            continue
        tips = [f"{layer.name} ({layer.type}): {label} {F.sci(v)}" for layer, v in zip(layers, values, strict=True)]
        series.append(svg.Series(key, label, values, marker, tips))
    if not series:
        return out + ['<p class="gs-muted">No activation or gradient statistics were recorded.</p>']
    flagged = {i: ", ".join(F.FLAG_MEANING.get(f, f) for f in row.flags) for i, row in enumerate(rows) if row.flags}
    caption = "Depth profile: per-layer RMS on a log axis, input to output"
    chart = svg.depth_profile_svg(names, series, flagged=flagged, caption=caption)
    lo, hi = F.HEALTHY_LOG10
    diverged = _first_bad_step(report)
    coverage = report.run.get("statistics") if isinstance(report.run, Mapping) else None
    if diverged is None:
        note = ""
    elif isinstance(coverage, Mapping) and "diverged_at" in coverage:
        # A watch report's statistics leave out its non-finite steps (run["statistics"]).
        note = f" The run went non-finite at step {F.number(diverged)}: these statistics leave its NaN/inf steps out."
    else:
        note = f" The run went non-finite at step {F.number(diverged)}: these whole-run statistics include the blow-up."
    out += [
        '<figure class="gs-figure gs-figure-depth">',
        f'<div class="gs-scroll">{chart}</div>',
        f"<figcaption>Per-layer RMS of the output (activation), of ∂ℓ/∂h and of the weight gradient, "
        f"log axis, layers in forward order (input → output). The shaded band is the healthy gradient range "
        f"[1e{lo:g}, 1e{hi:g}]; highlighted columns and red names are the layers with findings or raw flags; "
        f"✕ on the top edge is a value that is not finite, a mark on the bottom edge a zero. "
        f"Hover a point for its value.{_e(note)}</figcaption>",
        "</figure>",
    ]
    return out


def _first_bad_step(report: Report) -> int | None:
    """The first non-finite step of a watched run (its whole-run statistics then include the blow-up)."""
    training = report.analysis.get("training") if isinstance(report.analysis, Mapping) else None
    first = training.get("first_nonfinite") if isinstance(training, Mapping) else None
    step = F.as_float(first.get("step")) if isinstance(first, Mapping) else None
    return int(step) if step is not None and math.isfinite(step) else None


# -- the watched run ------------------------------------------------------------------------------


def _training(report: Report, training: Mapping[str, Any]) -> list[str]:
    out = ["<h2>Training run</h2>", '<section class="gs-training">']
    lines = F.training_lines(training) if training else ["no training analysis in this report"]
    out.append(_sentences_table(lines))
    history = report.run.get("history")
    if isinstance(history, Mapping):
        out += _curves(history, training)
        out += _heatmaps(history)
    else:
        out.append(
            '<p class="gs-muted">No layer × step history in this report '
            '(<code>report.run["history"]</code>): curves and heatmaps are not shown.</p>'
        )
    out.append("</section>")
    return out


def _sentences_table(lines: Sequence[str]) -> str:
    """``key: text`` sentences (the console's training lines) as a two-column table."""
    rows = []
    for line in lines:
        key, sep, rest = line.partition(": ")
        if sep:
            rows.append(f"<tr><th>{_e(key)}</th><td>{_e(rest)}</td></tr>")
        else:
            rows.append(f'<tr><td colspan="2">{_e(line)}</td></tr>')
    return '<table class="gs-meta gs-training-lines">' + "".join(rows) + "</table>"


def _floats(values: Any, count: int) -> list[float | None]:
    values = list(values or [])[:count]
    out = [F.as_float(v) for v in values]
    return out + [None] * (count - len(out))


def _curves(history: Mapping[str, Any], training: Mapping[str, Any]) -> list[str]:
    steps = [F.as_float(s) for s in history.get("steps") or []]
    if not steps or not all(s is not None and math.isfinite(s) for s in steps):
        return []
    xs = [float(s) for s in steps if s is not None]
    marks: list[svg.Mark] = []
    first = training.get("first_nonfinite")
    first_step = F.as_float(first.get("step")) if isinstance(first, Mapping) else None
    if isinstance(first, Mapping) and first_step is not None and math.isfinite(first_step):
        where = f" in {first['layer']}" if first.get("layer") else ""
        label = f"first non-finite value at step {F.number(int(first_step))}{where}"
        marks.append(svg.Mark(first_step, label, "gs-mark-nonfinite"))
    for s in training.get("spike_steps") or []:
        value = F.as_float(s)
        if value is not None and math.isfinite(value):
            marks.append(svg.Mark(value, f"gradient spike at step {F.number(int(value))}", "gs-mark-spike"))
    threshold = F.as_float(history.get("clip_threshold"))
    threshold_label = ""
    if threshold is not None:
        clip = training.get("clip") if isinstance(training.get("clip"), Mapping) else {}
        seen = F.as_float(clip.get("norms_seen")) if clip else None
        threshold_label = f"AutoClip threshold {F.number(threshold)}" + (
            f" (from {F.number(int(seen))} norms)" if seen is not None else ""
        )
    loss = svg.curve_svg(
        xs,
        _floats(history.get("loss"), len(xs)),
        key="loss",
        label="loss",
        caption="Loss per optimizer step",
        marks=marks,
    )
    norm = svg.curve_svg(
        xs,
        _floats(history.get("grad_norm"), len(xs)),
        key="grad_norm",
        label="global gradient norm",
        caption="Global gradient norm per optimizer step, with the clip threshold",
        threshold=threshold,
        threshold_label=threshold_label,
        marks=marks,
    )
    legend = "Red line: the first non-finite step; dotted: gradient spikes"
    if threshold is not None:
        legend += "; dashed: the AutoClip threshold"
    merged = (
        " Each point is one column of the history (columns merge pairwise on long runs): "
        "the loss of its last step, the largest global norm of its steps."
    )
    return [
        "<h3>Loss and global gradient norm</h3>",
        '<figure class="gs-figure gs-figure-curves"><div class="gs-row">',
        loss,
        norm,
        f"</div><figcaption>{_e(legend)}. A gap is a step without a finite measurement.{merged}</figcaption></figure>",
    ]


_QUANTITIES = (
    ("gradient", "log10 ∂ℓ/∂h RMS per layer and step"),
    ("activation", "log10 activation RMS per layer and step"),
)


def _png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR chunk (PNG spec, section 11.2.2), or None."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def _heatmaps(history: Mapping[str, Any]) -> list[str]:
    try:
        from gradscope.render.heatmap import heatmap_png
    except ImportError as exc:  # Pillow (or the module) missing: the rest of the report still renders
        return [f'<p class="gs-muted">Heatmaps unavailable: {_e(exc)}</p>']
    out = ["<h3>Layer × step heatmaps</h3>", '<div class="gs-row">']
    for quantity, caption in _QUANTITIES:
        try:
            png = heatmap_png(dict(history), quantity)
        except ImportError as exc:
            out.append(f'<p class="gs-muted">Heatmap unavailable: {_e(exc)}</p>')
            continue
        size = _png_size(png)
        dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
        data = base64.b64encode(png).decode("ascii")
        out.append(
            f'<figure class="gs-figure gs-figure-heatmap" data-quantity="{quantity}">'
            f'<img class="gs-heatmap" alt="{_e(caption)}"{dims} src="data:image/png;base64,{data}"></figure>'
        )
    out.append("</div>")
    return out


# -- analysis, the layer table, extras ------------------------------------------------------------


def _analysis(report: Report) -> list[str]:
    items = [item for item in F.analysis_items(report) if item.title != "Training run"]
    if not items:
        return []
    out = ["<h2>Analysis</h2>"]
    for item in items:
        out.append(f'<section class="gs-analysis-item"><h3>{_e(item.title)}</h3>')
        out.append(_sentences_table(item.lines))
        if item.code:
            out.append(f"<pre><code>{_e(item.code.strip(chr(10)))}</code></pre>")
        out.append("</section>")
    return out


def _layer_table(report: Report) -> list[str]:
    rows = F.layer_rows(report)
    if not rows:
        return []
    fmt = F.primary_format(report)
    headers = ["#", "layer", "type", "act std", "∂ℓ/∂h rms", "w std", "rec std", f"{fmt} headroom", "flags"]
    out = [
        f"<h2>Per-layer statistics ({len(rows)} layers)</h2>",
        '<div class="gs-scroll"><table class="gs-layers-table"><thead><tr>',
        "".join(f"<th>{_e(h)}</th>" for h in headers),
        "</tr></thead><tbody>",
    ]
    for r in rows:
        numbers = (r.activation_std, r.gradient_rms, r.weight_std, r.recommended_std, r.headroom)
        css = ' class="gs-row-flagged"' if r.flags else ""
        out.append(
            f'<tr{css}><td class="gs-num">{_e(r.index)}</td><td><code>{_e(r.name)}</code></td><td>{_e(r.type)}</td>'
            + "".join(f'<td class="gs-num">{_e(v)}</td>' for v in numbers)
            + f"<td>{_e(', '.join(r.flags))}</td></tr>"
        )
    out.append("</tbody></table></div>")
    seen: list[str] = list(dict.fromkeys(f for r in rows for f in r.flags))
    legend = (
        "act std: std of the layer's output · ∂ℓ/∂h rms: RMS of the loss gradient w.r.t. that output · "
        "w std / rec std: weight std now / recommended · headroom: binades below the format's max"
    )
    out.append(f'<p class="gs-muted">{_e(legend)}</p>')
    if seen:
        meaning = " · ".join(f"{f} = {F.FLAG_MEANING.get(f, f)}" for f in seen)
        out.append(f'<p class="gs-muted">flags: {_e(meaning)}</p>')
    return out


def _extras(report: Report) -> list[str]:
    out = []
    if report.record.not_executed:
        names = ", ".join(f"<code>{_e(n)}</code>" for n in report.record.not_executed)
        out.append(f"<h2>Not executed</h2><p>Hooked, never called in the forward: {names}</p>")
    if report.record.notes:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in report.record.notes) + "</ul>")
    return out


__all__ = ["render_html", "render_html_fragment"]
