"""Consent for code: a model file is data or code, and code never runs unasked.

*Data* loads with no flag: a state_dict or checkpoint that
``torch.load(weights_only=True)`` accepts, a safetensors file, a ``.pt2``
archive whose every part loads without unpickling anything but tensors and
plain containers and whose graph calls only allow-listed operators.

*Code* needs ``--trust-code`` (alias ``--trust-pickle``): a pickled module
(unpickling imports and calls whatever the pickle names), a TorchScript file
(a program: ``__setstate__`` runs at load, ``forward`` at the audit, and both
can write files through ``torch.save`` or ``torch.from_file(..., shared=True)``),
a ``.pt2`` part that needs the full unpickler, compiled native code in a
``.pt2`` (AOTInductor), or an archive graph that calls an operator outside the
allow-list.  Refusals happen before any of it runs, with one line saying why
and what to do.
"""

from __future__ import annotations

from gradscope.loaders.detect import LoadError

TRUST_FLAG = "--trust-code"


class CodeRefused(LoadError):
    """The file is code and the user did not pass ``--trust-code``."""


def refuse(path: object, what: str, alternative: str) -> CodeRefused:
    """The one-line refusal: what the file is, why that is code, what to do instead.

    Args:
        path: the file as the user named it.
        what: "is a ... (it imports ...)" - the file's nature, in the user's words.
        alternative: a data form of the same model the user can produce instead.
    """
    return CodeRefused(
        f"{str(path)!r} {what}; gradscope refused to load it without consent. Pass {TRUST_FLAG} only if you "
        f"trust its source, or {alternative}"
    )
