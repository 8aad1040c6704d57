"""Loaders for model files: TorchScript, torch.export, torch.save and safetensors.

Safety rule (``gradscope.loaders.consent``): nothing is unpickled with the
full unpickler and no TorchScript is loaded unless the user passed
``--trust-code``.  ``torch.load(weights_only=True)`` only rebuilds tensors and
plain containers and refuses any other global *before* creating it, so it is
the probe that tells a state_dict from a pickled module.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradscope.loaders.consent import refuse
from gradscope.loaders.detect import LoadError
from gradscope.loaders.pickles import describe_imports, unsafe_globals

# Keys under which training scripts commonly nest the weights in a checkpoint
# (plain PyTorch tutorials, Lightning, timm, fairseq).
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")


def first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split("\n")[:1]).strip()
    return text or type(exc).__name__


def torch_load(path: Path, *, weights_only: bool) -> Any:
    """``torch.load`` of the file's content, whatever its name.

    torch.load given a *path* ending in ``.safetensors`` reads it with
    ``safetensors.torch.load_file`` (torch/serialization.py, ``load``, since 2.13),
    so a torch.save file so named failed; an open handle leaves the format to
    the bytes, as gradscope's contract says.
    """
    with path.open("rb") as handle, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(handle, map_location="cpu", weights_only=weights_only)


def torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through an open handle: what is written never depends on the name."""
    with path.open("wb") as handle:
        torch.save(obj, handle)


def code_refused(path: Path, exc: pickle.UnpicklingError) -> list[str]:
    """The globals that made ``torch.load(weights_only=True)`` refuse ``path``, when it refused code.

    Its restricted unpickler says "Weights only load failed" for a global it does
    not allow *and* for bytes it cannot parse at all (a CSV, a ``.npy``, a stream
    cut short: "Unsupported operand 49", "pickle data was truncated").  Only a
    file whose opcodes name an import is code; the rest is damaged or another format.
    """
    if "Weights only load failed" not in str(exc):
        return []
    return unsafe_globals(path)


def not_torch_save(path: Path, what: str = "") -> LoadError:
    """The message for a file the restricted unpickler cannot parse and that imports nothing."""
    return LoadError(
        f"{what}{str(path)!r} is damaged or not a torch.save file: torch.load(weights_only=True) cannot parse it "
        "(truncated, or another format such as CSV or NumPy) and it imports no code"
    )


def load_weights_only(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with each failure turned into a one-line LoadError.

    An object the restricted unpickler refuses is a pickled Python object: the
    message names the globals it would import (read from the opcodes, never run).
    """
    try:
        return torch_load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        imports = code_refused(path, exc)
        if not imports:
            raise not_torch_save(path) from exc
        raise refuse(
            path,
            f"is a pickled Python object{describe_imports(imports)}; unpickling it can run arbitrary code",
            "save model.state_dict() and pass it with --arch",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise LoadError(f"{str(path)!r} is truncated or damaged: {first_line(exc)}") from exc


def load_trusted_pickle(path: Path) -> Any:
    """The full unpickler, for ``--trust-code`` only."""
    try:
        return torch_load(path, weights_only=False)
    except (AttributeError, ModuleNotFoundError) as exc:
        raise LoadError(
            f"unpickling {str(path)!r} needs the code that defined the model: {first_line(exc)} "
            "(import it first, or save a state_dict and pass --arch)"
        ) from exc
    except Exception as exc:
        raise LoadError(f"cannot unpickle {str(path)!r}: {type(exc).__name__}: {first_line(exc)}") from exc


def state_dict_keys(obj: Any, path: Path) -> tuple[str, ...]:
    """The keys leading from a loaded torch.save object to its state_dict: () for a bare one.

    A mapping that is at least half tensors is the state_dict; otherwise the first
    of CHECKPOINT_KEYS that holds a mapping is followed.  ``gradscope fix`` writes
    the fixed weights back to this same entry (``gradscope.cli.checkpoint``).
    """
    if not isinstance(obj, Mapping):
        raise LoadError(f"{str(path)!r} holds a {type(obj).__name__}, not a state_dict")
    tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
    if tensors and len(tensors) >= len(obj) / 2:
        return ()
    for key in CHECKPOINT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return (key, *state_dict_keys(inner, path))
    keys = ", ".join(map(str, list(obj)[:6]))
    raise LoadError(f"{str(path)!r} holds a dict ({keys}) with no state_dict of tensors in it")


def extract_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a state_dict or of a checkpoint dict that nests one, and where they were."""
    keys = state_dict_keys(obj, path)
    for key in keys:
        obj = obj[key]
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return tensors, "".join(f"[{key!r}]" for key in keys)


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


def tied_names(model: nn.Module) -> dict[str, set[str]]:
    """Each name of a parameter or buffer that the architecture ties -> its other names.

    A tie is one tensor object registered under two names (GPT-2's ``lm_head.weight``
    is ``transformer.wte.weight``); safetensors and ``save_pretrained`` store it once.
    """
    groups: dict[int, list[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        groups.setdefault(id(tensor), []).append(name)
    return {name: set(names) - {name} for names in groups.values() if len(names) > 1 for name in names}


def _covers(keys: set[str], expected: set[str], tied: dict[str, set[str]]) -> bool:
    """``keys`` are the model's, and each model key they lack is tied to one they have."""
    return keys <= expected and all(tied.get(k, set()) & keys for k in expected - keys)


def _strip_prefix(state: dict[str, torch.Tensor], expected: set[str], tied: dict[str, set[str]]) -> dict:
    """Drop a wrapper prefix (DDP's ``module.``, Lightning's ``model.``) when that makes the keys match."""
    if _covers(set(state), expected, tied):
        return state
    for prefix in ("module.", "model.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            stripped = {k[len(prefix) :]: v for k, v in state.items()}
            if _covers(set(stripped), expected, tied):
                return stripped
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> list[str]:
    """``model.load_state_dict(state, strict=True)`` with a one-line message naming
    the missing and unexpected keys, or the first shape mismatch.

    A key the file lacks is accepted only when the architecture ties it to a key
    the file has (same tensor object under both names); the returned notes say
    which were filled that way.
    """
    expected = model.state_dict()
    tied = tied_names(model)
    state = dict(_strip_prefix(state, set(expected), tied))
    filled: list[str] = []
    for key in expected:
        if key not in state:
            source = next((alias for alias in sorted(tied.get(key, ())) if alias in state), None)
            if source is not None:
                state[key] = state[source]
                filled.append(f"{key} = {source}")
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
    if not filled:
        return []
    return [f"tied weights the file stores once, loaded from their twin: {_listing(filled)}"]


def load_torchscript(path: Path, *, trusted: bool) -> Any:
    """``torch.jit.load``: a TorchScript file is a program, loaded only with consent."""
    if not trusted:
        raise refuse(
            path,
            "is a TorchScript program: loading and running it executes its code (__setstate__ at load, forward "
            "at the audit), which can create or overwrite files",
            "audit the Python model (file.py:factory), a torch.export .pt2 of it, or its state_dict with --arch",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.9+ deprecates TorchScript; users still have the files
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise LoadError(f"{str(path)!r} is not a loadable TorchScript file: {first_line(exc)}") from exc


def load_export(path: Path, *, trusted: bool) -> tuple[Any, list[str]]:
    """(ExportedProgram, notes) of a ``.pt2`` archive, read as data unless ``trusted`` (see ``loaders.pt2``)."""
    from gradscope.loaders.pt2 import load_archive

    return load_archive(path, trusted=trusted)
