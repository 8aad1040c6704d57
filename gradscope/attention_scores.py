"""Attention scores, which no module outputs, measured during an audit's forward.

The scores ``q·kᵀ·scale`` that a softmax turns into attention weights are
computed inside an attention module (``F.scaled_dot_product_attention``, or a
``matmul`` then ``softmax`` in eager implementations), so the recorder, which
sees module outputs, never sees them.  They are where fp16 training most often
first overflows: GPT-2 without ``scale_attn_weights`` and q/k projections a
few times too large put scores of 1.4e5 > 65504 into an fp16 matmul, which
gives inf, and the softmax makes NaN of every row that holds one (field
trial), while the largest module output was 405.

``AttentionScores`` is a ``TorchFunctionMode`` active only around the audit's
forward.  It records, per innermost module, the largest finite magnitude of
each softmax input (the scores of eager attention) and of the scores of each
scaled-dot-product attention: the largest *positive* score, since only +inf
breaks a softmax (its row maximum becomes inf and inf - inf is NaN), while a
score that overflows to -inf, or a mask's finfo.min / -1e9 fill, only gets
weight 0, computed here in float32 from q and k in chunks
of at most ``CHUNK_ELEMENTS`` (fused kernels never materialise them).  It
changes nothing the model computes: every call runs as it would, the scores
are extra work on detached copies.  Anything it cannot read (a DTensor, a
nested tensor, an error) is counted as unread, never guessed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# The most score elements computed at once for one SDPA call (16 MiB of float32):
# the audit's peak memory stays the model's (benchmarks/memory.py).
CHUNK_ELEMENTS = 1 << 22

_SOFTMAXES = {torch.softmax, F.softmax, torch.Tensor.softmax}


@dataclass
class ScoreExtremes:
    """The largest finite score a module's attention computed, and how it was read."""

    max_score: float = 0.0
    calls: int = 0
    nonfinite: int = 0  # calls whose scores already held inf or NaN
    source: set[str] = field(default_factory=set)  # "sdpa", "softmax"


class AttentionScores(TorchFunctionMode):
    """Record attention-score extremes per innermost module (module docstring)."""

    def __init__(self, where: Callable[[], tuple[str, str] | None] = lambda: None) -> None:
        super().__init__()
        self.where = where  # (name, class name) of the innermost running module
        self.by_module: dict[str, ScoreExtremes] = {}
        self.unread = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        try:
            if func is F.scaled_dot_product_attention:
                self._sdpa(*args, **kwargs)
            elif func in _SOFTMAXES and args and isinstance(args[0], torch.Tensor) and self._in_attention():
                self._note(args[0].detach(), "softmax")
        except Exception:  # a probe never breaks the audit: what it cannot read is counted
            self.unread += 1
        return func(*args, **kwargs)

    def _sdpa(self, query: torch.Tensor, key: torch.Tensor, *_: Any, scale: float | None = None, **__: Any) -> None:
        if type(query) is not torch.Tensor or type(key) is not torch.Tensor or query.is_nested:
            self.unread += 1
            return
        with torch.no_grad():
            q = query.detach().float()
            k = key.detach().float()
            if k.shape[-3:-2] != q.shape[-3:-2] and q.dim() >= 3 and k.dim() >= 3:
                k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)  # grouped-query attention
            scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
            lead = q.shape[:-2]
            q = q.reshape(-1, *q.shape[-2:])
            k = k.expand(*lead, *k.shape[-2:]).reshape(-1, *k.shape[-2:])
            per_row = q.shape[-2] * k.shape[-2]
            step = max(1, CHUNK_ELEMENTS // max(per_row, 1))
            biggest, bad = 0.0, False
            for start in range(0, q.shape[0], step):
                scores = torch.matmul(q[start : start + step], k[start : start + step].transpose(-1, -2)) * scale
                finite = scores.isfinite()
                bad = bad or not bool(finite.all())
                biggest = max(biggest, float(scores.where(finite, 0.0).max()))
        self._add(biggest, bad, "sdpa")

    def _note(self, scores: torch.Tensor, source: str) -> None:
        if type(scores) is not torch.Tensor or not scores.is_floating_point() or scores.numel() == 0:
            self.unread += 1
            return
        with torch.no_grad():
            finite = scores.isfinite()
            bad = not bool(finite.all())
            biggest = max(0.0, float(scores.float().where(finite, 0.0).max()))
        self._add(biggest, bad, source)

    def _in_attention(self) -> bool:
        """A softmax is read as attention only inside a module whose class says so
        (GPT2Attention, BertSelfAttention, LlamaAttention, MultiheadAttention, *Attn):
        a classifier's log_softmax or a router's softmax is no q·kᵀ (field sweep)."""
        here = self.where()
        kind = here[1].lower() if here else ""
        return "attention" in kind or kind.endswith("attn")

    def _add(self, biggest: float, bad: bool, source: str) -> None:
        here = self.where()
        module = here[0] if here else "model"
        entry = self.by_module.setdefault(module, ScoreExtremes())
        entry.max_score = max(entry.max_score, biggest)
        entry.calls += 1
        entry.nonfinite += bad
        entry.source.add(source)

    def summary(self) -> list[dict[str, Any]]:
        """``report.run["attention_scores"]``: one row per module, in first-call order."""
        return [
            {"module": name, "max_score": e.max_score, "calls": e.calls, "nonfinite_calls": e.nonfinite,
             "source": sorted(e.source)}
            for name, e in self.by_module.items()
        ]  # fmt: skip
