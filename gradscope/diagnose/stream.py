"""poor-init of what enters a pre-norm residual stream: an embedding far louder than the blocks.

In a pre-norm Transformer (GPT-2, Llama, Mistral, GPT-NeoX, T5) each block reads
the stream through a normalisation and adds what it writes back:
``h_{k+1} = h_k + f_k(norm(h_k))``.  The normalisation hides the stream's scale
from the block's input, so the per-layer activation checks see nothing wrong;
but the blocks write O(their own weights) whatever the stream's scale, so when
the embedding puts in 100 and a block writes 0.007, the blocks are 1e-4 of the
stream, and the final normalisation (dividing by the stream's RMS) shrinks every
block's gradient by the same factor.  The conventions keep the embedding on the
blocks' scale: GPT-2 (Radford et al. 2019) and Llama draw it at std 0.02, the
``initializer_range`` of transformers' configs, as their projections.

Measured on the record: the stream that enters the first block is the input of
the first normalisation after the embeddings (their sum, checked); what a block
writes is the output of the parametrised layer right before each later
normalisation (``o_proj`` before ``post_attention_layernorm``, ``down_proj``
before the next ``input_layernorm``).  A post-norm model (BERT) normalises the
stream itself, so the embedding's scale does not survive it: the rule needs the
stream to keep the embedding's scale up to the last normalisation.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from gradscope import advice
from gradscope.diagnose import thresholds as th
from gradscope.diagnose.layers import EMBEDDING_TYPES, NORM_TYPES, TRANSPARENT_TYPES, Context, is_parametrised
from gradscope.record import LayerRecord
from gradscope.report import Finding, Fix, Severity

# GPT-2 (Radford et al. 2019; transformers' GPT2Config.initializer_range) and Llama
# (LlamaConfig.initializer_range) draw token and position embeddings at std 0.02.
EMBEDDING_STD = 0.02
# The stream entering the first normalisation is the embeddings' sum when its
# second moment is within this factor of the sum of theirs (uncorrelated tables
# add their second moments; a dropout or a scale in between stays within it).
SUM_TOLERANCE = 2.0


def _m2(layer: LayerRecord, role: str) -> float | None:
    stats = layer.stats.get(role)
    if stats is None or stats.count == 0 or not stats.moments_valid:
        return None
    value = stats.rms**2
    return value if math.isfinite(value) else None


def _writer(ctx: Context, norm_position: int) -> LayerRecord | None:
    """The parametrised layer right before the normalisation at ``norm_position``."""
    for layer in reversed(ctx.layers[:norm_position]):
        if layer.type in TRANSPARENT_TYPES:
            continue
        if is_parametrised(layer, ctx.by_name) and layer.type not in EMBEDDING_TYPES:
            return layer
        return None
    return None


def stream_analysis(ctx: Context) -> dict[str, Any] | None:
    """The stream's scale entering the first block against what the blocks write, or None
    when the model has no embedding-fed, normalised residual stream to judge."""
    from gradscope.diagnose.depth import structure

    # Trainable tables only: a frozen sinusoidal table (Whisper's positions, RMS 1/√2) is
    # a fixed design, not an init to redo (its blocks write ~0.0085: ratio 83 at init).
    tables = [
        x
        for x in ctx.layers
        if x.type in EMBEDDING_TYPES and x.parameters > 0 and x.weight_grad is not None and _m2(x, "activation")
    ]
    if not tables:
        return None
    start = ctx.position[tables[0].name]
    norms = [i for i, x in enumerate(ctx.layers) if i > start and x.type in NORM_TYPES and _m2(x, "input")]
    if len(norms) < 3:
        return None
    first = ctx.layers[norms[0]]
    entering = [x for x in tables if ctx.position[x.name] < norms[0]]
    tables_m2 = sum(_m2(x, "activation") or 0.0 for x in entering)
    stream_m2 = _m2(first, "input") or 0.0
    if tables_m2 <= 0 or not (1 / SUM_TOLERANCE <= stream_m2 / tables_m2 <= SUM_TOLERANCE):
        return None  # something else (a projection, a scale) shapes the stream's entry
    found = structure(ctx)
    writes = []
    for i in norms[1:]:
        writer = _writer(ctx, i)
        if writer is None or found.in_scaled_branch(writer) or writer.name in found.zero_layers:
            continue
        m2 = _m2(writer, "activation")
        if m2:
            writes.append((writer.name, m2))
    if len(writes) < 2:
        return None
    write_rms = math.sqrt(statistics.median(m2 for _, m2 in writes))
    last_m2 = _m2(ctx.layers[norms[-1]], "input") or 0.0
    return {
        "embeddings": [x.name for x in entering],
        "embedding_rms": {x.name: math.sqrt(_m2(x, "activation") or 0.0) for x in entering},
        "stream_rms_first_block": math.sqrt(stream_m2),
        "stream_rms_last_norm": math.sqrt(last_m2),
        "block_write_rms": write_rms,
        "writers": len(writes),
        "ratio": math.sqrt(stream_m2) / write_rms,
    }


def rule_stream_scale(ctx: Context) -> list[Finding]:
    """poor-init: the embedding's scale swamps what the blocks write into a pre-norm stream."""
    if ctx.during_training:
        return []
    facts = stream_analysis(ctx)
    if facts is None or facts["ratio"] <= th.STREAM_RATIO_HIGH:
        return []
    entry, last = facts["stream_rms_first_block"], facts["stream_rms_last_norm"]
    if not (1 / SUM_TOLERANCE <= last / entry <= SUM_TOLERANCE):
        return []  # the blocks (or a post-norm) rescale the stream: the embedding's scale does not survive
    loud = [n for n, rms in facts["embedding_rms"].items() if rms > EMBEDDING_STD * th.STREAM_RATIO_HIGH**0.5]
    loud = loud or list(facts["embedding_rms"])
    names = ", ".join(f"'{n}'" for n in loud)
    worst = max(loud, key=lambda n: facts["embedding_rms"][n])
    code = "import torch.nn as nn\n\n" + "\n".join(
        f"nn.init.normal_({advice.module_expression(ctx.by_name[n].module)}.weight, std={EMBEDDING_STD:g})"
        for n in loud
    )
    return [
        Finding(
            code="poor-init",
            severity=Severity.WARNING,
            layers=loud,
            message=(
                f"The embedding {names} puts RMS {facts['embedding_rms'][worst]:.3g} into the residual stream, "
                f"while the blocks write RMS {facts['block_write_rms']:.3g} ({facts['ratio']:.3g}x less, "
                f"through normalised inputs): the blocks are {1 / facts['ratio']:.2g} of the stream up to the last "
                f"normalisation (RMS {last:.3g}), which divides their contribution, and their gradients, by its scale."
            ),
            evidence={"cause": "embedding-scale", **facts, "threshold": th.STREAM_RATIO_HIGH},
            fix=Fix(
                f"re-initialise {names} at std {EMBEDDING_STD:g}, the scale of the blocks' writes (GPT-2, Radford "
                "et al. 2019, and Llama: transformers' initializer_range).",
                code,
            ),
        )
    ]
