"""What ``gradscope fix --out`` writes: the input file with the fixed weights in it.

A checkpoint is more than weights: ``{"epoch": 7, "optimizer": {...}, "model":
{...}}``.  ``fix`` re-reads the file it loaded (with the same unpickler the
loader used), replaces only the tensors whose values the fix changed, in their
original dtype and under their original names (a ``module.`` prefix stays), and
saves the whole object again: every other key is kept as it was.  A factory or
a pickled module has no such file: its ``state_dict()`` is written.

The file's names need not map 1:1 onto the model's: a weight the architecture
ties to another (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) is
stored once by ``safetensors.torch.save_model`` and ``save_pretrained``, under
either name.  The loader fills the absent name from its twin
(``gradscope.loaders.files.load_into``); the fix writes the new value under
the name the file has, and the file keeps its names, so it loads back as the
input did, with the tie intact.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch

from gradscope.errors import InputError
from gradscope.loaders.files import state_dict_keys, tied_names, torch_load, torch_save

# Wrapper prefixes the loader strips when matching a state_dict to --arch
# (DDP's "module.", Lightning's "model.", torch.compile's "_orig_mod."), in the
# loader's order (gradscope.loaders.files._strip_prefix).
_PREFIXES = ("", "module.", "model.", "_orig_mod.")


def _locate(
    original: Any, fixed: Mapping[str, torch.Tensor], source: str, tied: Mapping[str, set[str]]
) -> tuple[tuple[Any, ...], MutableMapping, dict[str, Any]]:
    """The mapping the loader read the weights from, its path, and fixed name -> original key.

    The path is the loader's own (``state_dict_keys``: a bare state_dict, else the
    first of CHECKPOINT_KEYS), never a search for the best match: a checkpoint that
    also holds an EMA or teacher copy of the same weights has two matching entries,
    and only the one the audit loaded may change.  A model name the file lacks is
    left out when it is tied to one the file has (``tied``: name -> its twins),
    the rule the loader fills it by.
    """
    path = state_dict_keys(original, Path(source))
    mapping = original
    for key in path:
        mapping = mapping[key]
    lacking: list[str] = []
    for prefix in _PREFIXES:
        names = {
            key[len(prefix) :]: key
            for key, value in mapping.items()
            if isinstance(key, str) and key.startswith(prefix) and isinstance(value, torch.Tensor)
        }
        lacking = [name for name in fixed if name not in names and not (tied.get(name, set()) & names.keys())]
        if not lacking and isinstance(mapping, MutableMapping):
            return path, mapping, {name: names[name] for name in fixed if name in names}
    shown = ", ".join(lacking[:3]) + (f" (+{len(lacking) - 3} more)" if len(lacking) > 3 else "")
    raise InputError(
        f"{source!r} has no entry for the model's {shown} (nor for a weight tied to it), so the fix cannot be "
        "written back into it; nothing was written"
        if lacking
        else f"{source!r} holds its weights in a {type(mapping).__name__} gradscope cannot update; nothing was written"
    )


def merge_fixed(
    original: Any, fixed: Mapping[str, torch.Tensor], source: str, tied: Mapping[str, set[str]] | None = None
) -> tuple[int, tuple[Any, ...]]:
    """Put the changed tensors of ``fixed`` into ``original`` in place.

    Returns (number of tensors replaced, path of keys to the weights' mapping).
    Unchanged tensors stay the very objects that were loaded; changed ones take
    the original's dtype; weights tied in the model stay tied in the file, and a
    tied weight the file stores once is written once, under the file's name.
    """
    path, mapping, names = _locate(original, fixed, source, tied or {})
    replaced = 0
    for name, key in names.items():
        new = fixed[name]
        old = mapping[key]
        # The model's tensors themselves when dtype and device already match: saved as they
        # are, so weights tied in the model (two names, one storage) stay tied in the file.
        value = new.detach().to(device="cpu", dtype=old.dtype)
        if not torch.equal(old, value):
            mapping[key] = value
            replaced += 1
    return replaced, path


def _where(path: tuple[Any, ...]) -> str:
    return "".join(f"[{key!r}]" for key in path)


def save_fixed(loaded: Any, source: str, staged: Path, target: Path, *, trusted: bool = False) -> str:
    """Write the fixed model to ``staged`` (moved to ``target`` later); returns what was written.

    ``trusted``: the user allowed code (``--trust-code``), so the checkpoint is
    re-read with the full unpickler, as the loader read it; otherwise weights only.
    """
    module = loaded.module
    fixed = {name: tensor.detach() for name, tensor in module.state_dict().items()}
    tied = tied_names(module)
    as_safetensors = target.suffix == ".safetensors"
    if loaded.format == "state_dict":
        original = torch_load(Path(source), weights_only=not trusted)
        replaced, path = merge_fixed(original, fixed, source, tied)
        kept = [str(k) for k in original if k != path[0]] if path else []  # a bare state_dict keeps no other entry
        if as_safetensors:
            _save_safetensors(original, staged, source, target)
            return f"safetensors, {replaced} tensor(s) updated"
        torch_save(original, staged)
        also = f"; kept {', '.join(kept)}" if kept else ""
        return f"the checkpoint via torch.save, {replaced} tensor(s) updated in {_where(path) or 'it'}{also}"
    if loaded.format == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        original = load_file(source, device="cpu")
        with safe_open(source, "pt") as handle:
            metadata = handle.metadata()
        replaced, _path = merge_fixed(original, fixed, source, tied)
        if as_safetensors:
            _save_safetensors(original, staged, source, target, metadata)
        else:
            torch_save(original, staged)
        return f"{'safetensors' if as_safetensors else 'state_dict via torch.save'}, {replaced} tensor(s) updated"
    if as_safetensors:
        try:
            from safetensors.torch import save_model
        except ImportError:
            raise _no_safetensors() from None
        save_model(module, str(staged))
        return f"safetensors, {len(fixed)} tensors"
    torch_save(fixed, staged)
    return f"state_dict via torch.save, {len(fixed)} tensors"


def _no_safetensors() -> InputError:
    return InputError(
        "writing .safetensors needs the safetensors package: pip install 'gradscope[safetensors]' (or use a .pt name)"
    )


def _save_safetensors(
    original: Any, staged: Path, source: str, target: Path, metadata: dict[str, str] | None = None
) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise _no_safetensors() from None
    if not isinstance(original, Mapping) or not all(isinstance(v, torch.Tensor) for v in original.values()):
        others = (
            [str(k) for k, v in original.items() if not isinstance(v, torch.Tensor)]
            if isinstance(original, Mapping)
            else []
        )
        shown = ", ".join(others[:4]) or "non-tensor data"
        raise InputError(
            f"--out {str(target)!r} is a safetensors file, which holds only tensors, but {source!r} also holds "
            f"{shown}; use a .pt name to keep them"
        )
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in original.items():
        # safetensors refuses tensors that share memory (tied weights): each gets its own copy
        pointer = value.untyped_storage().data_ptr()
        tensors[str(key)] = value.contiguous() if pointer not in seen else value.clone().contiguous()
        seen.add(pointer)
    save_file(tensors, str(staged), metadata=metadata)
