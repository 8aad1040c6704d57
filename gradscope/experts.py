"""Mixture-of-experts layers whose experts live in fused 3-D parameters.

transformers 5.x stores all experts of a layer in one parameter per projection:
``MixtralExperts.gate_up_proj`` is ``(E, 2·I, H)`` and ``down_proj`` ``(E, H, I)``,
and its forward picks ``gate_up_proj[e]`` for the tokens routed to expert ``e``
(no ``nn.Linear`` per expert).  Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 and
GPT-OSS do the same; GPT-OSS stores the transpose, ``(E, in, out)``, used as
``x @ W[e]`` (its ``is_transposed`` flag, ``transformers.integrations.moe``).

Two things follow that a per-module view misses:

* ``torch.nn.init``'s fans of a 3-D tensor read it as a 1-D convolution
  (fan_in = size(1)·size(2)): for ``(E, out, in)`` that is ``out·in``, not the
  ``in`` each expert's matrix multiplies by.  ``expert_fans`` gives the fans of
  one expert's matrix.
* Which experts the router chose is an integer tensor passed to the experts
  module, never a floating output the recorder sees.  ``ExpertProbe`` counts,
  during the audit, the tokens each expert receives (from that index argument)
  and the squared norm of each expert's weight gradient, all on the device;
  ``summary()`` reads them once, after the passes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradscope.own_hooks import OwnHook
from gradscope.placement import clean_name

# Elements converted to float64 at once when summing one expert's slice: the
# audit's temporaries stay O(chunk), never O(tensor) (the promise of
# gradscope.chunked: an audit's peak memory is the model's own).  Mixtral-8x7B's
# gate_up_proj is 8 x 28672 x 4096: a whole float64 copy would be 7.5 GB.
CHUNK = 1 << 20


def per_expert_sums(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σx, Σx²) over each expert's slice ``tensor[e]``, in float64, on the tensor's
    device, read in chunks of ``CHUNK`` elements (no host sync)."""
    experts = int(tensor.shape[0])
    sums = torch.zeros(experts, dtype=torch.float64, device=tensor.device)
    squares = torch.zeros_like(sums)
    with torch.no_grad():
        for e in range(experts):
            flat = tensor[e].detach().reshape(-1)
            for chunk in flat.split(CHUNK):
                wide = chunk.double()
                sums[e] += wide.sum()
                squares[e] += wide.square().sum()
    return sums, squares


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding every expert of a layer in 3-D parameters: its class name
    says ``Experts`` (transformers' ``*Experts``, whose leading dimension is
    ``num_experts``) and it owns at least one 3-D parameter directly."""
    if "Experts" not in type(module).__name__:
        return False
    return any(p.dim() == 3 for p in module.parameters(recurse=False))


def fused_weights(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The 3-D parameters (one matrix per expert) of a fused experts module."""
    for name, param in module.named_parameters(recurse=False):
        if param.dim() == 3:
            yield name, param


def expert_fans(module: nn.Module, name: str, shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """(fan_in, fan_out) of one expert's matrix of the fused parameter ``name``.

    The layout is transformers' ``(E, out, in)`` (``F.linear(x, W[e])``) unless the
    module says ``is_transposed`` (GPT-OSS: ``(E, in, out)``, ``x @ W[e]``), or a
    sibling bias ``<name>_bias`` of shape ``(E, d)`` shows which side is the output.
    """
    _, first, second = (int(s) for s in shape)
    transposed = getattr(module, "is_transposed", None)
    if transposed is None:
        bias = getattr(module, f"{name}_bias", None)
        if isinstance(bias, torch.Tensor) and bias.dim() == 2 and first != second:
            transposed = int(bias.shape[1]) == second
    return (first, second) if transposed else (second, first)


def expert_count(module: nn.Module) -> int:
    """The number of experts: the leading dimension of the fused parameters."""
    return int(next(fused_weights(module))[1].shape[0])


def fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every fused experts module, in definition order."""
    return [(name, module) for name, module in model.named_modules() if is_fused_experts(module)]


def router_of(model: nn.Module, name: str, experts: int) -> str | None:
    """The qualified name of the router beside the experts module ``name``: a sibling
    owning a ``weight`` of shape ``(E, hidden)`` (transformers' ``mlp.gate`` /
    ``mlp.router``, a ``*TopKRouter``), or None when there is none to be found."""
    parent_name, _, own = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        return None
    for child_name, child in parent.named_children():
        weight = getattr(child, "weight", None)
        if child_name == own or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if int(weight.shape[0]) == experts:
            return f"{parent_name}.{child_name}" if parent_name else child_name
    return None


def _routing_index(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The router's choice among the experts module's inputs: its integer tensor
    (``top_k_index``, ``router_indices``, ``selected_experts``: (tokens, top_k))."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dim() >= 1:
            if value.dtype is not torch.bool:
                return value
    return None


@dataclass
class _Site:
    """The device-side tallies of one experts module (no host read until ``summary``)."""

    experts: int
    tokens: torch.Tensor | None = None  # (E,) tokens each expert received, over all passes
    routed: int = 0  # token rows routed (python ints from shapes: no host read)
    top_k: int = 0
    calls: int = 0
    unread: int = 0  # calls whose routing could not be read
    grad_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter -> (E,) Σ grad²
    grad_reads: dict[str, int] = field(default_factory=dict)  # parameter -> gradients tallied


class ExpertProbe:
    """Counts tokens per expert and per-expert weight-gradient norms during an audit.

    A forward pre-hook on each fused experts module reads the router's index
    argument and adds one to each chosen expert with ``scatter_add_`` (no host
    sync, no data-dependent shape); a tensor hook on each fused parameter adds
    the squared norm of each expert's slice of the gradient.  Everything stays on
    the device until ``summary()``; every hook comes off on ``close()``.  It changes
    nothing the model computes: the hooks return None and read detached values.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.sites: dict[str, _Site] = {}
        self._modules: dict[str, nn.Module] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> ExpertProbe:
        try:
            for name, module in fused_experts(self.model):
                site = self.sites[name] = _Site(experts=expert_count(module))
                self._modules[name] = module
                self._handles.append(module.register_forward_pre_hook(OwnHook(self._counter(site)), with_kwargs=True))
                for pname, param in fused_weights(module):
                    if param.requires_grad:
                        self._handles.append(param.register_hook(self._grad_tally(site, pname)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @staticmethod
    def _counter(site: _Site) -> Any:
        def count(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            site.calls += 1
            index = _routing_index(args, kwargs)
            if index is None or index.dim() < 1:
                site.unread += 1
                return
            with torch.no_grad():
                flat = index.detach().reshape(-1).long()
                # Out-of-range ids (a sentinel for tokens sent to no local expert, as in
                # expert parallelism, or -1 for a dropped token) land in an extra bin
                # that is dropped.
                outside = (flat < 0) | (flat >= site.experts)
                flat = flat.masked_fill(outside, site.experts)
                bins = torch.zeros(site.experts + 1, dtype=torch.float64, device=flat.device)
                bins.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
                counts = bins[: site.experts]
                site.tokens = counts if site.tokens is None else site.tokens + counts
            site.routed += int(index.shape[0]) if index.dim() >= 2 else int(index.numel())
            site.top_k = int(index.shape[-1]) if index.dim() >= 2 else 1

        return count

    @staticmethod
    def _grad_tally(site: _Site, name: str) -> Any:
        def tally(grad: torch.Tensor) -> None:
            with torch.no_grad():
                _, sq = per_expert_sums(grad)
                previous = site.grad_sq.get(name)
                site.grad_sq[name] = sq if previous is None else previous + sq
            site.grad_reads[name] = site.grad_reads.get(name, 0) + 1

        return tally

    def summary(self) -> list[dict[str, Any]]:
        """``report.run["experts"]``: one entry per fused experts module (one host read each).

        Per module: ``module``, ``experts`` (E), ``top_k``, ``tokens`` (token rows routed
        over all passes), ``calls``, ``unread_calls``, ``tokens_per_expert`` (E counts:
        token-choices, summing to tokens·top_k), and ``weights``: per fused parameter
        its ``shape``, per-expert ``fan_in``/``fan_out``, ``weight_std`` per expert and
        ``grad_rms`` per expert (over the passes; null when no gradient reached it).
        """
        rows: list[dict[str, Any]] = []
        for name, site in self.sites.items():
            module = self._modules[name]
            counts = site.tokens.cpu().tolist() if site.tokens is not None else None
            weights = []
            for pname, param in fused_weights(module):
                fan_in, fan_out = expert_fans(module, pname, tuple(param.shape))
                n = param[0].numel()
                sums, squares = per_expert_sums(param)
                # Σ(x - mean)² = Σx² - (Σx)²/n; std with Bessel's correction, as torch.std
                var = (squares - sums.square() / n).clamp_min(0.0) / max(n - 1, 1)
                std = var.sqrt().cpu().tolist()
                per_expert = n * max(site.grad_reads.get(pname, 0), 1)
                sq = site.grad_sq.get(pname)
                rms = (sq / per_expert).sqrt().cpu().tolist() if sq is not None else None
                weights.append(
                    {"name": pname, "shape": list(param.shape), "fan_in": fan_in, "fan_out": fan_out,
                     "weight_std": std, "grad_rms": rms}
                )  # fmt: skip
            rows.append(
                {"module": _shown(name), "type": type(module).__name__, "experts": site.experts,
                 "router": _shown(router) if (router := router_of(self.model, name, site.experts)) else None,
                 "router_bias": router is not None
                 and isinstance(getattr(self.model.get_submodule(router), "bias", None), torch.Tensor),
                 "top_k": site.top_k, "tokens": site.routed, "calls": site.calls, "unread_calls": site.unread,
                 "tokens_per_expert": [int(c) for c in counts] if counts is not None else None,
                 "weights": weights}
            )  # fmt: skip
        return rows


def _shown(name: str) -> str:
    # The name the recorder reports the module under (wrapper components dropped).
    return clean_name(name) or "model"
