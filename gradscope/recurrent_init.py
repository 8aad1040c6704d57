"""The init of torch's recurrent modules (nn.RNN, nn.GRU, nn.LSTM) that the
recurrent findings advise and ``apply_init(model, "recurrent")`` applies.

Per stacked layer and direction, gate block by gate block (torch stacks the
gates' matrices along the rows: i, f, g, o for an LSTM, r, z, n for a GRU):

* ``weight_hh``: orthogonal (Saxe et al. 2014: every singular value 1, so the
  linearised step keeps ∂ℓ/∂h's norm); the identity for a ReLU nn.RNN (IRNN,
  Le et al. 2015);
* ``weight_ih``: Xavier uniform over the block's fan-in and fan-out (Glorot &
  Bengio 2010), so every gate's pre-activation starts with unit-order spread;
* ``weight_hr`` (proj_size): orthogonal;
* biases zero, so no gate starts saturated, except the LSTM forget gate's
  ``bias_hh`` block at 1: the cell state is kept at the start (Gers et al.
  2000; Jozefowicz et al. 2015).
"""

from __future__ import annotations

from typing import Any

# torch is imported inside the functions: the diagnosis imports EVIDENCE_KEY from
# here, and a report read back from JSON is diagnosed without torch.

GATE_BLOCKS = {"RNN": 1, "GRU": 3, "LSTM": 4}
FORGET_BLOCK = 1  # the forget gate's row block in an LSTM (torch's i, f, g, o order)
FORGET_BIAS = 1.0
# Findings put the call sites this init cures under this evidence key.
EVIDENCE_KEY = "reinit_recurrent"


def is_recurrent(module: Any) -> bool:
    from torch import nn

    return isinstance(module, (nn.RNN, nn.GRU, nn.LSTM))


def _kind(module: Any) -> str:
    from torch import nn

    return "LSTM" if isinstance(module, nn.LSTM) else ("GRU" if isinstance(module, nn.GRU) else "RNN")


def recurrent_std(module: Any) -> float:
    """The std of the first recurrent weight (what ``apply_init`` reports before and after)."""
    weight = module.weight_hh_l0
    return float(weight.detach().float().std())


def init_recurrent(module: Any) -> None:
    """Re-initialise one nn.RNN/nn.GRU/nn.LSTM in place (see the module docstring)."""
    import torch
    from torch import nn

    kind = _kind(module)
    blocks = GATE_BLOCKS[kind]
    hidden = int(module.hidden_size)
    relu = kind == "RNN" and getattr(module, "nonlinearity", "tanh") == "relu"
    with torch.no_grad():
        for name, param in module.named_parameters(recurse=False):
            if name.startswith("weight_hh"):
                for g in range(blocks):
                    block = param[g * hidden : (g + 1) * hidden]
                    if relu:
                        nn.init.eye_(block)
                    else:
                        nn.init.orthogonal_(block)
            elif name.startswith("weight_ih"):
                for g in range(blocks):
                    nn.init.xavier_uniform_(param[g * hidden : (g + 1) * hidden])
            elif name.startswith("weight_hr"):
                nn.init.orthogonal_(param)
            elif name.startswith("bias"):
                param.zero_()
                if kind == "LSTM" and name.startswith("bias_hh"):
                    param[FORGET_BLOCK * hidden : (FORGET_BLOCK + 1) * hidden].fill_(FORGET_BIAS)


def recurrent_fix_layers(finding: dict[str, Any]) -> list[str]:
    """The call sites a finding (as a dict) asks to re-initialise with this init."""
    if finding.get("severity") == "info":  # advice, not a fault to cure
        return []
    evidence = finding.get("evidence") or {}
    return list(evidence.get(EVIDENCE_KEY) or [])
