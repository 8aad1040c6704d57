"""Formatting shared by the console and Markdown renderers.

Everything here reads a :class:`~gradscope.report.Report` defensively: the
analysis may be missing (``{}`` when the diagnosis did not run), and after a
JSON round trip its non-finite numbers are the strings ``"nan"``/``"inf"``
(strict JSON has no NaN literal), so every number goes through
:func:`as_float` before it is printed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gradscope.numbers import special
from gradscope.report import Finding, Report, Severity

MISSING = "—"  # shown wherever a number could not be measured or was not analysed

# Short per-layer flags for the layer table, one per finding code, plus the raw
# facts read straight from the statistics (nan, inf, ovf) so that the table is
# informative even when no diagnosis ran.
FLAG_BY_CODE: dict[str, str] = {
    "nonfinite": "nan",
    "vanishing-gradient": "vg",
    "exploding-gradient": "eg",
    "vanishing-activations": "va",
    "exploding-activations": "ea",
    "fp16-overflow": "ovf",
    "fp16-underflow": "unf",
    "bf16-overflow": "ovf",
    "bf16-underflow": "unf",
    "dead-units": "dead",
    "saturated-units": "sat",
    "poor-init": "init",
    "gradient-spike": "spike",
    "update-ratio": "upd",
    "exploding-through-time": "ett",
    "vanishing-through-time": "vtt",
}

FLAG_MEANING: dict[str, str] = {
    "nan": "NaN in an activation, gradient or weight",
    "inf": "inf in an activation, gradient or weight",
    "ovf": "values beyond the format's maximum (or too little headroom)",
    "unf": "gradients below the format's range (flush to zero)",
    "vg": "vanishing gradient",
    "eg": "exploding gradient",
    "va": "vanishing activations",
    "ea": "exploding activations",
    "dead": "dead ReLU units",
    "sat": "saturated units",
    "init": "poor init",
    "spike": "gradient spike",
    "upd": "update ratio",
    "ett": "exploding through time",
    "vtt": "vanishing through time",
}

SEVERITY_ORDER = (Severity.ERROR, Severity.WARNING, Severity.INFO)
SEVERITY_TITLE = {Severity.ERROR: "Errors", Severity.WARNING: "Warnings", Severity.INFO: "Info"}

# The healthy range of gradient values, from the course material (DESIGN.md):
# roughly [1e-6, 1e3].  Used only to draw the depth profile's guide marks; the
# verdicts themselves come from gradscope.diagnose.
HEALTHY_LOG10 = (-6.0, 3.0)


def as_float(value: Any) -> float | None:
    """A number from a report field, or None when it is absent or not numeric.

    Accepts ints, floats and the strings that ``json_safe`` writes for
    non-finite values ("nan", "inf", "-inf").
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def sci(value: Any) -> str:
    """3 significant digits in scientific notation with a short exponent: ``1.23e-4``."""
    x = as_float(value)
    if x is None:
        return MISSING
    fixed = special(x)
    if fixed is not None:
        return fixed
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def binades(value: Any) -> str:
    """Headroom in binades, signed, one decimal (negative means overflow)."""
    x = as_float(value)
    if x is None:
        return MISSING
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:+.1f}"


def number(value: Any) -> str:
    """A number for prose and evidence: plain when moderate, scientific otherwise."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    x = as_float(value)
    if x is None:
        return MISSING if value is None else str(value)
    if math.isfinite(x) and x != 0 and 1e-3 <= abs(x) < 1e4:
        return f"{x:.4g}"
    if math.isfinite(x) and x == int(x) and abs(x) < 1e4:
        return str(int(x))
    return sci(x)


def evidence_value(value: Any, *, limit: int | None = None) -> str:
    """An evidence entry as one short line: numbers via :func:`number`; a list as
    ``a, b, c … N more``; a mapping as ``k=v, k=v … N more``; a value nested inside
    those summarised (``k=v k=v …``, ``N values``), never a dict or list repr.  At
    most ``limit`` (default EVIDENCE_ITEMS) items and EVIDENCE_VALUE_CHARS
    characters; the JSON report keeps the whole value."""
    limit = EVIDENCE_ITEMS if limit is None else limit
    if isinstance(value, (Mapping, list, tuple)) and not value:
        return "none"
    if not isinstance(value, (Mapping, list, tuple)):
        return _scalar(value)
    # one nested item gets the room of all; with more, the first keeps room for "… N more"
    fields, room = (
        (NESTED_ITEMS, EVIDENCE_VALUE_CHARS - 16) if len(value) > 1 else (EVIDENCE_ITEMS, EVIDENCE_VALUE_CHARS)
    )
    if isinstance(value, Mapping):
        return _capped([f"{k}={_nested(v, fields, room - len(str(k)) - 1)}" for k, v in value.items()], limit)
    if all(isinstance(v, Mapping) for v in value):
        return _capped([_nested(v, fields, room) for v in value], limit, separator="; ")
    return _capped([_nested(v, fields, room) for v in value], limit)


def _range(value: Any) -> str | None:
    """``lo–hi`` for a two-number list (a band, a threshold range), else None."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(as_float(v) is not None for v in value):
        return f"{number(value[0])}–{number(value[1])}"
    return None


def _scalar(value: Any) -> str:
    if isinstance(value, str) and as_float(value) is None:
        return value
    return number(value)


def _nested(value: Any, fields: int, room: int) -> str:
    """A value inside a list or mapping of the evidence: a scalar, or its first
    ``fields`` scalar fields, whole, within ``room`` characters."""
    if isinstance(value, Mapping):
        items = [f"{k}={_scalar(v)}" for k, v in value.items() if not isinstance(v, (Mapping, list, tuple))]
        kept: list[str] = []
        for item in items[:fields]:
            if kept and sum(len(x) + 1 for x in kept) + len(item) > room - 4:  # room for "( …)"
                break
            kept.append(item)
        shown = " ".join(kept)
        more = len(value) - len(kept)
        return f"({shown}{' …' if more > 0 else ''})" if shown else _plural(len(value), "field", "fields")
    if isinstance(value, (list, tuple)):
        return _plural(len(value), "value", "values")
    return _scalar(value)


def _capped(items: list[str], limit: int, *, separator: str = ", ") -> str:
    """``items`` joined, as many as fit in ``limit`` items and EVIDENCE_VALUE_CHARS
    characters (at least one, cut), then ``… N more``."""
    shown: list[str] = []
    length = 0
    for item in items[:limit]:
        tail = len(f" … {len(items)} more")
        if shown and length + len(separator) + len(item) + tail > EVIDENCE_VALUE_CHARS:
            break
        shown.append(item)
        length += len(item) + (len(separator) if len(shown) > 1 else 0)
    more = len(items) - len(shown)
    room = EVIDENCE_VALUE_CHARS - (len(f" … {more} more") if more else 0)
    if len(shown) == 1 and len(shown[0]) > room:
        shown[0] = shown[0][: room - 1] + ("" if more else "…")
    return separator.join(shown) + (f" … {more} more" if more > 0 else "")


def is_threshold_key(key: str) -> bool:
    """Evidence keys that state the threshold a finding crossed."""
    return "threshold" in key or key in ("limit", "bound", "healthy_range")


def split_evidence(evidence: Mapping[str, Any]) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """(measurements, thresholds) in the evidence's own order."""
    measured = [(k, v) for k, v in evidence.items() if not is_threshold_key(str(k))]
    thresholds = [(k, v) for k, v in evidence.items() if is_threshold_key(str(k))]
    return measured, thresholds


# How a watched finding evolved (gradscope.watching.alerts.FindingHistory.evolution):
# shown as one "seen" entry, the full history stays in the JSON report.
EVOLUTION_KEYS = ("first_step", "last_step", "flushes_seen", "alerts", "active_at_end", "history", "note")
EVIDENCE_ENTRIES = 8  # measurements shown per finding; the JSON report has them all
EVIDENCE_VALUE_CHARS = 100
EVIDENCE_ITEMS = 6  # items of a list or mapping shown in one evidence value
NESTED_ITEMS = 3  # fields of a mapping nested inside one (a layer's numbers)


def _seen(evidence: Mapping[str, Any]) -> str | None:
    first, last = evidence.get("first_step"), evidence.get("last_step")
    if first is None:
        return str(evidence["note"]) if evidence.get("note") else None
    steps = f"step {first}" if last in (None, first) else f"steps {first}–{last}"
    seen = as_float(evidence.get("flushes_seen"))
    alerts = as_float(evidence.get("alerts"))
    bits = []
    if seen is not None:
        bits.append(_plural(int(seen), "observation", "observations"))
    if alerts is not None:
        bits.append(_plural(int(alerts), "alert", "alerts"))
    if "active_at_end" in evidence:
        bits.append("active at the end" if evidence["active_at_end"] else "cleared")
    return steps + (f" ({', '.join(bits)})" if bits else "")


def _short(value: Any, key: str = "") -> str:
    if isinstance(value, (list, tuple)) and len(value) > 2 and all(isinstance(v, Mapping) for v in value):
        return _plural(len(value), "entry", "entries")
    bounds = _range(value) if is_threshold_key(key) or "band" in key or "range" in key else None
    text = bounds or evidence_value(value)
    return text if len(text) <= EVIDENCE_VALUE_CHARS else text[: EVIDENCE_VALUE_CHARS - 1] + "…"


def evidence_entries(evidence: Mapping[str, Any]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(measurements, thresholds) as short (key, text) pairs for a table: unknown
    values left out, the watch's evolution fields folded into one ``seen`` entry,
    long values cut, at most EVIDENCE_ENTRIES measurements."""
    measured_raw, thresholds_raw = split_evidence(evidence)
    tracked = "flushes_seen" in evidence  # annotated by the watch's alert tracker
    folded = EVOLUTION_KEYS if tracked else ()
    measured = [(str(k), _short(v, str(k))) for k, v in measured_raw if v is not None and k not in folded]
    seen = _seen(evidence) if tracked else None
    if seen is not None:
        measured.append(("seen", seen))
    if len(measured) > EVIDENCE_ENTRIES:
        more = len(measured) - (EVIDENCE_ENTRIES - 1)
        measured = measured[: EVIDENCE_ENTRIES - 1] + [("…", f"{more} more in the JSON report")]
    thresholds: list[tuple[str, str]] = []
    for k, v in thresholds_raw:
        if isinstance(v, Mapping):  # a rule's thresholds by name: one entry each
            thresholds += [(str(name), _short(limit, str(k))) for name, limit in v.items() if limit is not None]
        elif v is not None:
            thresholds.append((str(k), _short(v, str(k))))
    return measured, thresholds


def layer_list(names: list[str], *, limit: int = 4) -> str:
    """``a, b, c … z (30 layers)`` for long lists; the first and last layers matter most."""
    if not names:
        return MISSING
    if len(names) <= limit:
        return ", ".join(names)
    head = ", ".join(names[: limit - 1])
    return f"{head} … {names[-1]} ({len(names)} layers)"


def truncate_middle(text: str, width: int) -> str:
    """Keep both ends of a long dotted name: ``enc…out_proj``, ``encoder.…f_attn.out_proj``.

    The tail (the leaf module) is what tells layers apart and the head says
    where in the model they sit, so the middle is what goes.  Whole trailing
    components are kept when they fit beside at least three leading characters.
    """
    if width <= 0:
        return ""
    if len(text) <= width:
        return text
    if width <= 2:
        return text[:width]
    parts = text.split(".")
    tail = ""
    for i in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[i:])
        if len(candidate) + 1 + 3 > width:
            break
        tail = candidate
    if not tail or (width - 1 - len(tail)) > 2 * len(tail):
        # no whole component fits, or keeping whole ones would waste the room: cut by characters
        tail_len = (width - 1) * 2 // 3
        tail = text[len(text) - tail_len :]
    return text[: width - 1 - len(tail)] + "…" + tail


def truncate_end(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    return text[: max(0, width - 1)] + "…" if width > 0 else ""


def grouped(findings: Iterable[Finding]) -> list[tuple[Severity, list[Finding]]]:
    """Findings by severity, most severe first, each group in the report's order."""
    groups: dict[Severity, list[Finding]] = {s: [] for s in SEVERITY_ORDER}
    for finding in findings:
        groups[Severity(finding.severity)].append(finding)
    return [(s, fs) for s, fs in groups.items() if fs]


def summary_text(report: Report) -> str:
    """``2 errors · 1 warning · 0 advice — unhealthy``, from ``report.summary()``."""
    s = report.summary()
    parts = [
        _plural(s["errors"], "error", "errors"),
        _plural(s["warnings"], "warning", "warnings"),
        _plural(s["infos"], "info", "infos"),
    ]
    verdict = s.get("verdict") or ("healthy" if s["healthy"] else "unhealthy")
    text = " · ".join(parts) + f" — {verdict}"
    if s.get("inconclusive"):
        text += ": " + "; ".join(s["inconclusive"])
    return text


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def primary_format(report: Report) -> str:
    """The low-precision format whose headroom the layer table shows (fp16 unless the run asked otherwise)."""
    formats = report.run.get("formats") or ["fp16"]
    return str(formats[0])


@dataclass
class LayerRow:
    """One row of the per-layer table, already formatted."""

    index: str
    name: str
    type: str
    activation_std: str
    gradient_rms: str
    weight_std: str
    recommended_std: str
    headroom: str
    flags: list[str]
    log10_gradient_rms: float | None


def init_by_name(report: Report) -> dict[str, Mapping[str, Any]]:
    entries = report.analysis.get("init") if isinstance(report.analysis, Mapping) else None
    out: dict[str, Mapping[str, Any]] = {}
    for entry in entries or []:
        if isinstance(entry, Mapping) and "name" in entry:
            out[str(entry["name"])] = entry
    return out


def _stat(stats: Any, attribute: str) -> float | None:
    if stats is None or stats.count == 0:
        return None
    return float(getattr(stats, attribute))


def _headroom(layer: Any, fmt: str) -> float | None:
    """The smaller headroom of the layer's output and of ∂ℓ/∂h: the tighter of the two limits fp16 use."""
    values = []
    for stats in (layer.activation, layer.gradient):
        if stats is None or stats.count == 0:
            continue
        try:
            h = stats.format_fractions(fmt)[f"{fmt}_headroom_binades"]
        except ValueError:  # an unknown format name in the run: nothing to show
            return None
        values.append(h)
    finite_or_not = [v for v in values if not math.isnan(v)]
    if not finite_or_not:
        return math.nan if values else None
    return min(finite_or_not)


def _raw_flags(layer: Any, fmt: str) -> list[str]:
    """Facts visible in the statistics alone, independent of any rule."""
    flags = []
    roles = [layer.get(r) for r in ("activation", "gradient", "weight", "weight_grad")]
    if any(s is not None and s.has_nan for s in roles):
        flags.append("nan")
    if any(s is not None and s.has_inf for s in roles):
        flags.append("inf")
    for stats in (layer.activation, layer.gradient):
        if stats is None or stats.count == 0:
            continue
        try:
            if stats.format_fractions(fmt)[f"{fmt}_overflow_frac"] > 0:
                flags.append("ovf")
                break
        except ValueError:
            break
    return flags


def layer_rows(report: Report) -> list[LayerRow]:
    """The per-layer table: statistics, the recommended init std and the flags."""
    fmt = primary_format(report)
    init = init_by_name(report)
    flags_by_layer: dict[str, list[str]] = {}
    for finding in report.findings:
        flag = FLAG_BY_CODE.get(finding.code)
        if flag is None:
            flag = finding.code.split("-")[0][:5]
        for name in finding.layers:
            flags_by_layer.setdefault(name, []).append(flag)
    rows = []
    for layer in report.layers:
        entry = init.get(layer.name, {})
        weight_std = _stat(layer.weight, "std")
        if weight_std is None:
            weight_std = as_float(entry.get("weight_std"))
        rms = _stat(layer.gradient, "rms")
        log10 = math.log10(rms) if rms is not None and math.isfinite(rms) and rms > 0 else None
        flags: list[str] = []
        for flag in _raw_flags(layer, fmt) + flags_by_layer.get(layer.name, []):
            if flag not in flags:
                flags.append(flag)
        rows.append(
            LayerRow(
                index=str(layer.index),
                name=layer.name,
                type=layer.type,
                activation_std=sci(_stat(layer.activation, "std")),
                gradient_rms=sci(rms),
                weight_std=sci(weight_std),
                recommended_std=sci(entry.get("recommended_std")),
                headroom=binades(_headroom(layer, fmt)),
                flags=flags,
                log10_gradient_rms=log10,
            )
        )
    return rows


def header_items(report: Report) -> list[tuple[str, str]]:
    """(label, text) pairs describing the model and the run."""
    model, run = report.model, report.run
    items: list[tuple[str, str]] = []
    source = str(model.get("source") or MISSING)
    kind = [str(model[k]) for k in ("type",) if model.get(k) and model.get(k) != model.get("source")]
    if model.get("format"):
        kind.append(f"format {model['format']}")
    items.append(("model", source + (f" ({', '.join(kind)})" if kind else "")))
    params = model.get("parameters")
    if params is not None:
        text = f"{number(int(params))} parameters" if isinstance(params, int) else f"{params} parameters"
        trainable = model.get("trainable_parameters")
        if isinstance(trainable, int) and isinstance(params, int) and trainable != params:
            text += f" ({number(trainable)} trainable)"
        items.append(("size", text))
    if run.get("mode") == "watch":
        return items + _watch_header(report)
    shape = run.get("input_shape")
    dtype = run.get("input_dtype")
    inputs = " ".join(x for x in (str(dtype) if dtype else "", str(list(shape)) if shape else "") if x) or MISSING
    details = []
    if run.get("inputs"):
        details.append(str(run["inputs"]))
    if run.get("vocab") is not None:
        details.append(f"vocab {run['vocab']}")
    if run.get("seed") is not None and run.get("inputs", "synthetic") == "synthetic":
        details.append(f"seed {run['seed']}")
    if run.get("input_inferred_from"):
        details.append(f"shape inferred from {run['input_inferred_from']}")
    items.append(("inputs", inputs + (f" ({'; '.join(details)})" if details else "")))
    loss = run.get("loss")
    loss_from = run.get("loss_from")
    items.append(("loss", (str(loss) if loss else MISSING) + (f": {loss_from}" if loss_from else "")))
    run_bits = []
    if run.get("batches") is not None:
        run_bits.append(f"{run['batches']} batch" + ("" if run["batches"] == 1 else "es"))
    for key in ("mode", "device"):
        if run.get(key):
            run_bits.append(f"{key} {run[key]}")
    if run.get("formats"):
        run_bits.append("formats " + ", ".join(str(f) for f in run["formats"]))
    if run_bits:
        items.append(("run", " · ".join(run_bits)))
    return items


def _watch_header(report: Report) -> list[tuple[str, str]]:
    """What a watched run knows instead of an audit's inputs and loss: the steps,
    the loss given to ``scope.step``, and how the statistics were taken."""
    run = report.run
    training = report.analysis.get("training") if isinstance(report.analysis, Mapping) else None
    training = training if isinstance(training, Mapping) else {}
    steps = training.get("steps", run.get("steps"))
    every = training.get("every", run.get("every"))
    sampled = training.get("sampled_steps")
    bits = [f"{steps} optimizer steps"] if steps is not None else []
    if every is not None:
        bits.append(f"every {every}" + (f" ({sampled} sampled)" if sampled is not None else ""))
    if run.get("tier"):
        bits.append(f"tier {run['tier']}")
    items = [("steps", " · ".join(bits) or MISSING)]
    record_input = report.record.input
    inputs = "the training batches"
    if record_input is not None and record_input.count:
        inputs += f" ({number(record_input.count)} values recorded on sampled steps)"
    items.append(("inputs", inputs))
    loss = as_float(training.get("loss_last"))
    items.append(
        ("loss", f"last {number(loss)} (as given to scope.step)" if loss is not None else "not given to scope.step")
    )
    coverage = run.get("statistics")
    cut = as_float(coverage.get("diverged_at")) if isinstance(coverage, Mapping) else None
    if isinstance(coverage, Mapping) and cut is not None:
        kept = coverage.get("sampled_steps")
        items.append(
            (
                "stats",
                f"steps before {int(cut)} ({kept} sampled): the run went non-finite at step {int(cut)} and "
                f"had diverged, later statistics excluded",
            )
        )
    elif isinstance(coverage, Mapping) and coverage.get("cleared_episodes"):
        spans = coverage["cleared_episodes"]
        first = spans[0] if isinstance(spans, list) and spans and isinstance(spans[0], list) else None
        span = f" (steps {first[0]} to {first[1]})" if first and len(first) == 2 else ""
        items.append(
            (
                "stats",
                f"finite steps ({coverage.get('sampled_steps')} sampled): the run went non-finite and recovered"
                f"{span}, {coverage.get('excluded_sampled_steps')} non-finite sampled steps excluded",
            )
        )
    run_bits = ["mode watch"]
    if run.get("formats"):
        run_bits.append("formats " + ", ".join(str(f) for f in run["formats"]))
    if run.get("gradients"):
        run_bits.append(f"gradients {run['gradients']}")
    items.append(("run", " · ".join(run_bits)))
    return items


def training_lines(training: Mapping[str, Any]) -> list[str]:
    """The watched run in sentences: steps, norms, spikes, AutoClip, first bad step."""
    lines = []
    norm_last, norm_max = (
        as_float(training.get("global_grad_norm_last")),
        as_float(training.get("global_grad_norm_max")),
    )
    if norm_last is not None:
        text = f"global gradient norm: last {number(norm_last)}, max {number(norm_max)}"
        nonfinite = training.get("nonfinite_norm_steps") or 0
        if nonfinite:
            text += f"; non-finite at {_plural(int(nonfinite), 'step', 'steps')}"
        lines.append(text)
    clipping = training.get("clipping")
    if isinstance(clipping, Mapping):
        lines.append(
            f"norms measured before the trainer's clipping at max_norm {number(clipping.get('max_norm'))}: "
            f"{clipping.get('clipped_steps', 0)} steps clipped, last post-clip norm "
            f"{number(clipping.get('global_grad_norm_post_clip_last'))}"
        )
    spikes = int(as_float(training.get("spikes")) or 0)
    if spikes:
        steps = [str(s) for s in training.get("spike_steps") or []]
        shown = ", ".join(steps[:6]) + (" …" if len(steps) > 6 or spikes > len(steps) else "")
        lines.append(f"gradient spikes: {spikes} (steps {shown})")
    else:
        lines.append("gradient spikes: none")
    clip = training.get("clip")
    if isinstance(clip, Mapping) and clip.get("threshold") is not None:
        seen = int(as_float(clip.get("norms_seen")) or 0)
        if seen >= MIN_NORMS_FOR_ADVICE:
            lines.append(
                f"AutoClip: clip the global norm at {number(clip['threshold'])}, the 10th percentile of "
                f"{seen} global norms (median {number(clip.get('median_threshold'))})"
            )
        else:
            lines.append(f"AutoClip: {_plural(seen, 'global norm', 'global norms')} seen, too few for a threshold")
    first = training.get("first_nonfinite")
    if isinstance(first, Mapping):
        where = f" in {first['layer']}" if first.get("layer") else ""
        role = ROLE_NAMES.get(str(first.get("role")), str(first.get("role") or "value"))
        origin = first.get("origin")
        how = f", {origin}" if origin and origin != "unknown" else ""
        source = f" ({'from' if origin == 'received' else 'by'} {first['source']})" if first.get("source") else ""
        lines.append(f"first non-finite: step {first.get('step')}, {role}{where}{how}{source}")
    else:
        lines.append("first non-finite: none")
    skipped = training.get("skipped_steps")
    if skipped is not None:
        lines.append(f"GradScaler: {skipped} steps skipped, last scale {number(training.get('loss_scale'))}")
    return lines


# Advice needs a distribution: a percentile of one norm is that norm.
MIN_NORMS_FOR_ADVICE = 2
ROLE_NAMES = {
    "activation": "activation",
    "gradient": "gradient ∂ℓ/∂h",
    "weight_grad": "weight gradient",
    "weight": "weight",
    "loss": "loss",
    "input": "input",
}


def _diverged(report: Report) -> tuple[int | None, bool]:
    """The step a watched run diverged at, and whether the report's statistics
    leave out its non-finite steps (``run["statistics"]``: a watch report does; a
    report saved before that field existed mixes the blow-up in).  A run whose
    non-finite episodes cleared gives (None, True); (None, False) otherwise (an
    audit's batch is one moment)."""
    training = report.analysis.get("training") if isinstance(report.analysis, Mapping) else None
    first = training.get("first_nonfinite") if isinstance(training, Mapping) else None
    if not isinstance(first, Mapping):
        return None, False
    coverage = report.run.get("statistics") if isinstance(report.run, Mapping) else None
    if not isinstance(coverage, Mapping) or "diverged_at" not in coverage:
        return int(as_float(first.get("step")) or 0), False
    cut = as_float(coverage.get("diverged_at"))
    if cut is None:
        # The run recovered (its non-finite episodes cleared): their steps are left
        # out, and there is no "before step k" to say.
        return None, True
    return int(cut), True


@dataclass
class AnalysisItem:
    """One fact from the depth analysis: a title, sentences, and an optional snippet."""

    title: str
    lines: list[str]
    code: str = ""


def _recommendation(title: str, value: Mapping[str, Any], headline: str | None) -> AnalysisItem:
    """A loss-scale or clipping recommendation: headline, comparison, method, snippet.

    Known keys (those of ``gradscope.advice``) read as sentences; the other
    numbers stay in the JSON report.  A dict with none of the known keys is
    listed as ``key=value`` rather than dropped.
    """
    known = {"code", "method", "comparison", "format", "exponent", "scale", "threshold"}
    lines = [headline] if headline else []
    if value.get("comparison"):
        lines.append(str(value["comparison"]))
    if value.get("method"):
        lines.append(f"how: {value['method']}")
    if not lines:  # an analysis of a shape this renderer does not know: show it raw rather than nothing
        lines.append(", ".join(f"{k}={evidence_value(v)}" for k, v in value.items() if k not in known))
    return AnalysisItem(title, lines, str(value.get("code") or ""))


def analysis_items(report: Report) -> list[AnalysisItem]:
    """Facts from the depth analysis: first unhealthy layers, the loss scale, the clipping threshold."""
    analysis = report.analysis if isinstance(report.analysis, Mapping) else {}
    items = []
    training = analysis.get("training")
    if isinstance(training, Mapping):
        items.append(AnalysisItem("Training run", training_lines(training)))
    diverged, excluded = _diverged(report)
    if "first_unhealthy_forward" in analysis or "first_unhealthy_backward" in analysis:
        unseen = "not assessed" if analysis.get("inconclusive") else "none"
        fwd = analysis.get("first_unhealthy_forward") or unseen
        bwd = analysis.get("first_unhealthy_backward") or unseen
        items.append(AnalysisItem("First layer out of the healthy range", [f"forward: {fwd} · backward: {bwd}"]))
    scale = analysis.get("loss_scale")
    if isinstance(scale, Mapping) and scale and diverged is not None and not excluded:
        items.append(
            AnalysisItem(
                "Loss scale",
                [
                    f"not advised: the run went non-finite at step {diverged} and the statistics include the "
                    "blow-up, so a scale computed from "
                    "them would fit the blow-up, not the training; fix the non-finite values first"
                ],
            )
        )
    elif isinstance(scale, Mapping) and scale:
        exponent, value = scale.get("exponent"), scale.get("scale")
        fmt = scale.get("format") or primary_format(report)
        headline = None
        if exponent is not None or value is not None:
            power = f"2^{exponent}" if exponent is not None else ""
            amount = number(value) if value is not None else ""
            headline = f"{fmt}: " + " = ".join(x for x in (power, amount) if x)
        item = _recommendation("Loss scale", scale, headline)
        if diverged is not None:
            item.lines.insert(
                1 if headline else 0,
                f"from the statistics before step {diverged}, where the run went non-finite (later steps excluded)",
            )
        items.append(item)
    clip = analysis.get("clip")
    observed = as_float(clip.get("norms_observed")) if isinstance(clip, Mapping) else None
    if isinstance(training, Mapping) and isinstance(training.get("clip"), Mapping):
        pass  # a watched run: AutoClip from every step's norm is in the training item
    elif isinstance(clip, Mapping) and clip and observed is not None and observed < MIN_NORMS_FOR_ADVICE:
        median = number(clip.get("median_norm")) if clip.get("median_norm") is not None else ""
        items.append(
            AnalysisItem(
                "Gradient clipping",
                [
                    f"one global gradient norm observed{f' ({median})' if median else ''}: too few to choose a "
                    "threshold; gradscope.watch derives one (AutoClip) from a training run"
                ],
            )
        )
    elif isinstance(clip, Mapping) and clip:
        threshold = clip.get("threshold")
        headline = f"clip the global gradient norm at {number(threshold)}" if threshold is not None else None
        items.append(_recommendation("Gradient clipping", clip, headline))
    return items
