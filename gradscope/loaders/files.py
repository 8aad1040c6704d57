"""Loaders for model files: TorchScript, torch.export, torch.save and safetensors.

Safety rule: nothing is unpickled with the full unpickler unless the user
passed ``--trust-pickle``.  ``torch.load(weights_only=True)`` only rebuilds
tensors and plain containers and refuses any other global *before* creating
it, so it is the probe that tells a state_dict from a pickled module.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradscope.loaders.detect import LoadError
from gradscope.loaders.pickles import unsafe_globals

# Keys under which training scripts commonly nest the weights in a checkpoint
# (plain PyTorch tutorials, Lightning, timm, fairseq).
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")


def first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split("\n")[:1]).strip()
    return text or type(exc).__name__


def load_weights_only(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with each failure turned into a one-line LoadError.

    An object the restricted unpickler refuses is a pickled Python object: the
    message names the globals it would import (read from the opcodes, never run).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise LoadError(f"{str(path)!r} is not a readable torch.save file: {first_line(exc)}") from exc
        names = unsafe_globals(path)
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        what = f" (it imports {shown})" if shown else ""
        raise LoadError(
            f"{str(path)!r} is a pickled Python object{what}; unpickling it can run arbitrary code, so gradscope "
            "refused to load it. Pass --trust-pickle only if you trust its source, or save model.state_dict() "
            "and pass --arch"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise LoadError(f"{str(path)!r} is truncated or damaged: {first_line(exc)}") from exc


def load_trusted_pickle(path: Path) -> Any:
    """The full unpickler, for ``--trust-pickle`` only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError) as exc:
        raise LoadError(
            f"unpickling {str(path)!r} needs the code that defined the model: {first_line(exc)} "
            "(import it first, or save a state_dict and pass --arch)"
        ) from exc
    except Exception as exc:
        raise LoadError(f"cannot unpickle {str(path)!r}: {type(exc).__name__}: {first_line(exc)}") from exc


def extract_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a state_dict or of a checkpoint dict that nests one, and where they were."""
    if isinstance(obj, Mapping):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(obj) / 2:
            return tensors, ""
        for key in CHECKPOINT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                found, where = extract_state_dict(inner, path)
                return found, f"[{key!r}]{where}"
        keys = ", ".join(map(str, list(obj)[:6]))
        raise LoadError(f"{str(path)!r} holds a dict ({keys}) with no state_dict of tensors in it")
    raise LoadError(f"{str(path)!r} holds a {type(obj).__name__}, not a state_dict")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise LoadError(
            "reading safetensors files needs the safetensors package: pip install 'gradscope[safetensors]'"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise LoadError(f"{str(path)!r} is a damaged safetensors file: {first_line(exc)}") from exc


def _listing(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _strip_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (DDP's ``module.``, Lightning's ``model.``) when that makes the keys match."""
    for prefix in ("module.", "model.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            stripped = {k[len(prefix) :]: v for k, v in state.items()}
            if set(stripped) == expected:
                return stripped
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with a one-line message naming
    the missing and unexpected keys, or the first shape mismatch."""
    expected = model.state_dict()
    state = _strip_prefix(state, set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        raise LoadError(f"the weights in {str(path)!r} do not match --arch {arch}: " + "; ".join(parts))
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise LoadError(
                f"the weights in {str(path)!r} do not match --arch {arch}: {key} has shape "
                f"{list(state[key].shape)} in the file but {list(value.shape)} in the model"
            )
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise LoadError(f"loading {str(path)!r} into --arch {arch} failed: {first_line(exc)}") from exc


def load_torchscript(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.9+ deprecates TorchScript; users still have the files
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise LoadError(f"{str(path)!r} is not a loadable TorchScript file: {first_line(exc)}") from exc


def load_export(path: Path) -> Any:
    """The ExportedProgram of a ``.pt2`` archive (``torch.export.load``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(str(path))
    except Exception as exc:
        raise LoadError(f"{str(path)!r} is not a loadable torch.export archive: {first_line(exc)}") from exc
