"""``dropout``: dropout layers configured or placed where they hurt.

Read from the model (the rates) and the record (execution order and ranges):

* a rate outside [0, 0.9): p ≥ 0.9 keeps under a tenth of the units and scales
  them by 1/(1−p) ≥ 10, so the layer's output is mostly noise (Srivastava et al.
  2014 used p = 0.5 for hidden units and 0.2 for inputs); p = 1 zeroes
  everything and p < 0 or > 1 makes the forward raise (``error``);
* dropout right before a BatchNorm layer: BatchNorm's running variance is
  collected on dropped-out activations in training but applied to undropped
  ones at inference, a "variance shift" (Li et al. 2019, "Understanding the
  disharmony between dropout and batch normalization by variance shift")
  (``warning``).  Other normalisations (LayerNorm, RMSNorm, GroupNorm) use each
  example's own statistics at inference too, and post-LN Transformers put
  dropout right before the residual add and its LayerNorm by design (the add
  is no module, so the record shows dropout → LayerNorm): not reported;
* dropout as the model's last layer: it zeroes and rescales the predictions
  themselves, which the loss then fits (``warning``); the lecture applies it
  to hidden outputs, ``o = W₂·dropout(h) + b₂``;
* the 1/(1−p) rescale pushing an activation past a low-precision format's
  maximum: the input fits (|x| ≤ 65504 for fp16) but x/(1−p) does not, so
  training-mode dropout makes inf where the eval-mode model is fine — the mT5
  failure of the Hugging Face debugging guide (6.27e4 through Dropout(p=0.1)
  becomes 6.97e4 > 65504) (``error``).
"""

from __future__ import annotations

from gradscope.diagnose.layers import BATCHNORM_TYPES, Context
from gradscope.formats import get_format
from gradscope.numbers import percent
from gradscope.record import LayerRecord
from gradscope.report import Finding, Fix, Severity

DROPOUT_TYPES = {"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout"}
MAX_RATE = 0.9  # p at or above this keeps < 10 % of units, each scaled by >= 10 (see above)


def _rate(ctx: Context, layer: LayerRecord) -> float | None:
    module = ctx.module_of(layer)
    p = getattr(module, "p", None)
    return float(p) if isinstance(p, (int, float)) else None


def _expr(layer: LayerRecord) -> str:
    return "model" if layer.module == "model" else f"model.get_submodule({layer.module!r})"


def _rate_finding(layer: LayerRecord, p: float) -> Finding | None:
    if 0 <= p < MAX_RATE:
        return None
    broken = p < 0 or p >= 1
    return Finding(
        code="dropout",
        severity=Severity.ERROR if broken else Severity.WARNING,
        layers=[layer.name],
        message=(
            f"{layer.name}: dropout rate p={p:g} "
            + (
                "is outside [0, 1): the forward raises or drops every unit"
                if broken
                else f"keeps only {percent(1 - p)} of the units and scales them by 1/(1−p) = {1 / (1 - p):.3g}: "
                "the output is mostly noise"
            )
        ),
        evidence={"p": p, "allowed": [0.0, MAX_RATE]},
        fix=Fix("use p between 0.1 and 0.5 for hidden units (Srivastava et al. 2014)", f"{_expr(layer)}.p = 0.5"),
    )


def _placement(ctx: Context, layer: LayerRecord, p: float | None) -> Finding | None:
    i = ctx.position[layer.name]
    rest = ctx.layers[i + 1 :]
    if not rest:
        return Finding(
            code="dropout",
            severity=Severity.WARNING,
            layers=[layer.name],
            message=(
                f"{layer.name} is the model's last layer: dropout zeroes and rescales the predictions "
                "themselves; apply it to hidden outputs (o = W·dropout(h) + b) instead"
            ),
            evidence={"p": p, "position": "output"},
            fix=Fix(
                "move the dropout before the output layer",
                "# e.g. nn.Sequential(..., nn.Dropout(p), nn.Linear(h, out))",
            ),
        )
    nxt = rest[0]
    if nxt.type not in BATCHNORM_TYPES:
        return None
    return Finding(
        code="dropout",
        severity=Severity.WARNING,
        layers=[layer.name, nxt.name],
        message=(
            f"{layer.name} feeds {nxt.name} ({nxt.type}) directly: BatchNorm's running variance is learnt on "
            "dropped-out activations but used on undropped ones at inference (the variance shift of Li et al. 2019)"
        ),
        evidence={"p": p, "next_layer": nxt.name, "next_type": nxt.type},
        fix=Fix(
            "place dropout after the normalisation (and its activation), e.g. Linear → BatchNorm → ReLU → Dropout",
            f"# reorder: {nxt.name} before {layer.name}",
        ),
    )


def _rescale_overflow(ctx: Context, layer: LayerRecord, p: float | None) -> Finding | None:
    """The mT5 failure: |x| fits the format, |x|/(1−p) does not."""
    out = layer.activation
    before = ctx.previous(layer)
    if out is None or before is None or before.activation is None or not p or p >= 1:
        return None
    if before.output_shape != layer.output_shape:
        return None  # not (known to be) the dropout's input
    x_max = before.activation.absmax
    for fmt in ctx.formats:
        fmax = get_format(fmt).max
        scaled = x_max / (1 - p)
        if not (x_max <= fmax < scaled) or not out.absmax > x_max:
            continue  # fits either way, or the dropout did not rescale (eval mode)
        return Finding(
            code="dropout",
            severity=Severity.ERROR,
            layers=[layer.name],
            message=(
                f"{layer.name}: Dropout(p={p:g}) in training mode scales its input by 1/(1−p) = {1 / (1 - p):.3g}: "
                f"|x| up to {x_max:.3g} fits {fmt} (max {fmax:g}) but {scaled:.3g} does not and becomes inf — "
                "the mT5 failure (Hugging Face debugging guide)"
            ),
            evidence={
                "p": p,
                "format": fmt,
                "format_max": fmax,
                "input_absmax": x_max,
                "rescaled_absmax": scaled,
                "input_layer": before.name,
            },
            fix=Fix(
                f"keep {before.name} and {layer.name} in fp32/bf16, or bring {before.name}'s outputs below "
                f"{fmax * (1 - p):.3g} (= {fmt} max × (1−p))",
                'with torch.autocast(device_type="cuda", enabled=False):\n'
                f"    h = {_expr(layer)}({_expr(before)}(x.float()))",
            ),
        )
    return None


def rule_dropout(ctx: Context) -> list[Finding]:
    """``dropout`` findings: rates, placement, and the fp16 rescale overflow."""
    findings: list[Finding] = []
    for layer in ctx.layers:
        if layer.type not in DROPOUT_TYPES or layer.call != 1:
            continue
        p = _rate(ctx, layer)
        found = [
            f
            for f in (
                _rate_finding(layer, p) if p is not None else None,
                _placement(ctx, layer, p),
                _rescale_overflow(ctx, layer, p),
            )
            if f is not None
        ]
        if found:
            findings.append(_combined(found))
    return findings


def _combined(found: list[Finding]) -> Finding:
    """One finding per dropout layer (findings are keyed by code and first layer): the
    worst one's fix, every problem in the message and evidence."""
    if len(found) == 1:
        return found[0]
    worst = max(found, key=lambda f: Severity(f.severity).rank)
    layers = list(dict.fromkeys(name for f in found for name in f.layers))
    return Finding(
        code="dropout",
        severity=worst.severity,
        layers=layers,
        message="; ".join(f.message for f in found),
        evidence={"problems": [f.evidence for f in found]},
        fix=worst.fix,
    )
