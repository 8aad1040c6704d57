"""Which kind of model file is this?  Decided from the bytes, not the name.

Nothing here unpickles or executes anything: zip archives are identified by
their member names, safetensors by its header (an 8-byte little-endian length
followed by a JSON object, per the safetensors format specification), pickles
by their first opcode (``PROTO``, 0x80, for protocols 2 and above).
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from gradscope.errors import InputError

TORCHSCRIPT = "torchscript"
EXPORT = "export"
TORCH_SAVE = "torch_save"  # a torch.save zip or legacy file: a state_dict, a checkpoint or a pickled module
SAFETENSORS = "safetensors"
PICKLE = "pickle_stream"  # a bare pickle (or legacy torch.save) stream

# The safetensors header is capped at 100 MB by its own reference implementation;
# anything larger is not a safetensors file.
_SAFETENSORS_MAX_HEADER = 100_000_000


class LoadError(InputError):
    """A model file that cannot be used: missing, empty, truncated, unsafe, mismatched."""


def check_file(path: Path, what: str = "model file") -> None:
    """Raise LoadError unless ``path`` is a readable, non-empty regular file."""
    if not path.exists():
        raise LoadError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        from gradscope.model_dirs import directory_hint

        raise LoadError(f"{what} {str(path)!r} is a directory, not a file{directory_hint(path)}")
    if not path.is_file():  # a FIFO, socket or device: opening it could block forever
        raise LoadError(f"{what} {str(path)!r} is not a regular file (a FIFO, socket or device?)")
    try:
        size = path.stat().st_size
        with path.open("rb"):
            pass
    except OSError as exc:
        raise LoadError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None
    if size == 0:
        raise LoadError(f"{what} {str(path)!r} is empty")


def zip_members(path: Path) -> list[str] | None:
    """Member names of a zip archive, or None when the file is not a (complete) zip."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def _is_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= _SAFETENSORS_MAX_HEADER and head[8:9] == b"{" and length + 8 <= size


def detect_format(path: Path) -> str:
    """One of TORCHSCRIPT, EXPORT, TORCH_SAVE, SAFETENSORS, PICKLE.

    Raises:
        LoadError: the file is missing, empty, truncated, or none of these.
    """
    check_file(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(64)
    members = zip_members(path)
    if members is not None:
        tails = {name.split("/", 1)[1] if "/" in name else name for name in members}
        # torch.jit.save writes code/ and constants.pkl; torch.export.save writes
        # archive_format and models/*.json (torch/export/pt2_archive).
        if any(t.startswith("code/") for t in tails) or "constants.pkl" in tails:
            return TORCHSCRIPT
        if "archive_format" in tails or any(t.startswith("models/") for t in tails):
            return EXPORT
        if "data.pkl" in tails:
            return TORCH_SAVE
        raise LoadError(f"{str(path)!r} is a zip archive but not a TorchScript, torch.export or torch.save file")
    if head.startswith(b"PK"):
        raise LoadError(f"{str(path)!r} looks like a truncated or damaged zip archive (torch.save/jit/export file)")
    if _is_safetensors(head, size):
        return SAFETENSORS
    if len(head) >= 8 and struct.unpack("<Q", head[:8])[0] + 8 > size and head[8:9] == b"{":
        raise LoadError(f"{str(path)!r} looks like a truncated safetensors file (header longer than the file)")
    if head[:1] == b"\x80":
        return PICKLE
    if path.suffix == ".py":
        raise LoadError(f"{str(path)!r} is Python source: name the factory, e.g. {path}:build_model")
    raise LoadError(
        f"{str(path)!r} is not a model file gradscope recognises "
        "(TorchScript, torch.export .pt2, torch.save, safetensors)"
    )


def safetensors_header(path: Path) -> dict:
    """The safetensors JSON header (tensor names, dtypes, shapes), read without loading tensors."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        try:
            return json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LoadError(f"{str(path)!r} has a damaged safetensors header") from None
