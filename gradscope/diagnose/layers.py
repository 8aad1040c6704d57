"""What kind of layer a call site is, read from its recorded type name.

The diagnosis works on a Record (which may come from JSON, with no model), so
layers are classified by class name.  Unknown types are treated as opaque:
never assumed to be an activation or a normalisation.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from gradscope.record import LayerRecord, Record

# ReLU family: Kaiming (He et al. 2015) is the init that keeps them at gain 1.
RELU_TYPES = {"ReLU", "ReLU6", "RReLU"}
LEAKY_TYPES = {"LeakyReLU", "PReLU"}
SMOOTH_RELU_TYPES = {"GELU", "SiLU", "Mish", "ELU", "CELU", "SELU", "Hardswish", "Softplus"}
# Bounded activations: Xavier (Glorot & Bengio 2010).
SQUASH_TYPES = {"Tanh", "Sigmoid", "Hardtanh", "Hardsigmoid", "Softsign", "LogSigmoid", "Tanhshrink"}
ACTIVATION_TYPES = RELU_TYPES | LEAKY_TYPES | SMOOTH_RELU_TYPES | SQUASH_TYPES
# Activations that output exact zeros for negative inputs: they can die.
DYING_TYPES = {"ReLU", "ReLU6"}
# Activations with two asymptotes: they can saturate.
SATURATING_TYPES = {"Tanh", "Sigmoid"}


class TypeFamily:
    """A set of layer class names that also holds the classes libraries write for
    the same job under their own names: ``name in family`` is true for the exact
    names and for names matching ``pattern``.

    Types are read from class names (a Record may come from JSON, with no model),
    and every library names its own normalisation: transformers' ``LlamaRMSNorm``,
    ``GemmaRMSNorm``, ``T5LayerNorm``, ``ConvNextLayerNorm``, torchvision's
    ``FrozenBatchNorm2d``, timm's ``LayerNorm2d``.  An exact-name set took them for
    unknown layers: the depth rule ignored the scale they divide by and the
    update-ratio rule judged their gains (Gemma's start at 0) as weights.
    """

    def __init__(self, exact: set[str], pattern: str) -> None:
        self.exact = frozenset(exact)
        self.pattern = re.compile(pattern)
        self._seen: dict[str, bool] = {}  # name -> member: the recorder asks per hooked forward

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        member = self._seen.get(name)
        if member is None:
            member = self._seen[name] = name in self.exact or self.pattern.search(name) is not None
        return member

    def __iter__(self) -> Iterator[str]:
        """The exact names (a pattern has no list)."""
        return iter(sorted(self.exact))


# Layers that normalise their input: the init scale before them does not
# matter to the forward signal (Ioffe & Szegedy 2015).
NORM_TYPES = TypeFamily(
    {
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LazyBatchNorm1d", "LazyBatchNorm2d",
        "LazyBatchNorm3d", "LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
        "RMSNorm", "LocalResponseNorm",
    },
    # a class name ending in a normalisation's name, with an optional 1d/2d/3d
    r"(?:RMS|Layer|Group|Batch|Instance)Norm(?:[123][dD])?$",
)  # fmt: skip
# Batch normalisation (running statistics, a mode that matters).
BATCHNORM_TYPES = TypeFamily({t for t in NORM_TYPES if "BatchNorm" in t}, r"BatchNorm(?:[123][dD])?$")
# Layers that pass the signal through element-wise without changing its scale
# in expectation: skipped when looking for "the activation after a layer".
TRANSPARENT_TYPES = {
    "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout", "Identity",
    "Flatten", "Unflatten",
}  # fmt: skip
# Lookup tables: their output scale is a design choice, not a per-layer gain.
# Libraries subclass or rewrite them (OPTLearnedPositionalEmbedding,
# ScaledWordEmbedding, VocabParallelEmbedding; ViTEmbeddings owns the class token
# and position table).
EMBEDDING_TYPES = TypeFamily({"Embedding", "EmbeddingBag"}, r"Embeddings?$")
# Layers whose init gradscope analyses and can fix (fan_in/fan_out as torch.nn.init).
INIT_TYPES = {"Linear", "Conv1d", "Conv2d", "Conv3d", "LazyLinear", "LazyConv1d", "LazyConv2d", "LazyConv3d"}


def activation_kind(type_name: str) -> str:
    """Return "relu", "leaky_relu", "identity" or the lower-case type name of another activation."""
    if type_name in RELU_TYPES:
        return "relu"
    if type_name in LEAKY_TYPES:
        return "leaky_relu"
    return type_name.lower()


def is_parametrised(layer: LayerRecord, by_name: dict[str, LayerRecord]) -> bool:
    """A layer with a matrix-shaped weight (Linear, Conv, Embedding, attention...)."""
    if layer.fan_in is not None:
        return True
    shared = by_name.get(layer.shares_weights_with or "")
    return shared is not None and shared.fan_in is not None


def width(layer: LayerRecord) -> int | None:
    """Values per example in the layer's output (all but the leading dimension)."""
    shape = layer.output_shape
    if not shape or len(shape) < 2:
        return None
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return n or None


@dataclass
class Context:
    """A record plus what every rule needs to know about it."""

    record: Record
    formats: tuple[str, ...] = ("fp16",)
    model: Any = None  # the nn.Module, when the diagnosis runs next to it
    steps: int = 1
    analysis: dict[str, Any] = field(default_factory=dict)
    found: set[str] = field(default_factory=set)  # codes found by the rules run so far
    during_training: bool = False  # watch: the weights are being trained, never advise re-initialising
    cache: dict[str, Any] = field(default_factory=dict)  # derived once per diagnosis (the structure)
    # When gradscope built the loss as softmax cross-entropy (an audit): the class
    # count, the logits' element count and the loss it measured (``diagnose.logits``).
    loss_classes: int | None = None
    loss_logits: int | None = None
    loss_value: float | None = None
    # The audit's attention-score extremes per module (gradscope.attention_scores).
    attention_scores: list[dict[str, Any]] | None = None
    # The mode the audit ran the model in ("train", "eval"); the model at hand is back
    # in its own mode by the time the diagnosis reads it.
    mode: str | None = None
    # The audit's fused mixture-of-experts modules: routing and per-expert weights
    # (gradscope.experts.ExpertProbe.summary, read by diagnose.experts).
    experts: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self.layers: list[LayerRecord] = sorted(self.record.layers, key=lambda x: x.index)
        self.by_name: dict[str, LayerRecord] = {layer.name: layer for layer in self.layers}
        self.position: dict[str, int] = {layer.name: i for i, layer in enumerate(self.layers)}

    def parametrised(self) -> list[LayerRecord]:
        return [layer for layer in self.layers if is_parametrised(layer, self.by_name)]

    def previous(self, layer: LayerRecord) -> LayerRecord | None:
        i = self.position[layer.name]
        return self.layers[i - 1] if i > 0 else None

    def activation_after(self, layer: LayerRecord) -> tuple[str, LayerRecord | None]:
        """The kind of what follows ``layer`` in execution order, skipping transparent layers.

        After an embedding, further embeddings are skipped too (parallel lookups).
        Returns ("relu" | "leaky_relu" | "tanh" | ... , the activation's record),
        ("norm", the normalisation's record), or ("identity", None) when the next
        layer is anything else (another Linear, the end of the model, an opaque
        module): the signal goes on unchanged as far as gradscope can tell.
        """
        lookup = layer.type in EMBEDDING_TYPES
        for nxt in self.layers[self.position[layer.name] + 1 :]:
            if nxt.type in TRANSPARENT_TYPES:
                continue
            if lookup and nxt.type in EMBEDDING_TYPES:
                # Lookups read ids, not the previous layer's output: embeddings run
                # back to back are parallel branches whose sum the next layer reads
                # (BERT's word + token-type + position tables into one LayerNorm;
                # Llama's rotary table between embed_tokens and the first RMSNorm).
                continue
            if nxt.type in ACTIVATION_TYPES:
                return activation_kind(nxt.type), nxt
            if nxt.type in NORM_TYPES:
                return "norm", nxt
            return "identity", None
        return "identity", None

    def module_of(self, layer: LayerRecord | None) -> Any:
        """The recorded layer's module when the model is at hand, else None."""
        if layer is None or self.model is None:
            return None
        try:
            return self.model if layer.module == "model" else self.model.get_submodule(layer.module)
        except AttributeError:
            return None

    def norm_eps(self, norm: LayerRecord | None) -> float:
        """The eps a normalisation adds to the variance it divides by: the module's own
        when the model is at hand, else torch's default for BatchNorm/LayerNorm/GroupNorm
        (1e-5; RMSNorm's default is smaller, so 1e-5 errs towards less rescaling)."""
        default = 1e-5
        module = self.module_of(norm)
        if module is None:
            return default
        for name in ("eps", "variance_epsilon", "epsilon"):  # torch; transformers' RMSNorms
            value = getattr(module, name, None)
            if isinstance(value, (int, float)) and value >= 0:
                return float(value)
        return default

    def negative_slope(self, activation: LayerRecord | None) -> float:
        """The leaky ReLU's slope, read from the model when it is at hand (default 0.01)."""
        if activation is None or self.model is None:
            return 0.01
        try:
            module = self.model if activation.module == "model" else self.model.get_submodule(activation.module)
        except AttributeError:
            return 0.01
        slope = getattr(module, "negative_slope", None)
        if slope is None and hasattr(module, "weight"):  # PReLU: its learnt slope
            try:
                slope = float(module.weight.detach().float().mean())
            except (RuntimeError, TypeError):
                slope = None
        return float(slope) if slope is not None else 0.01
