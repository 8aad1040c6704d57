"""What to tell a user who gives a directory as MODEL.

``save_pretrained`` (Hugging Face transformers and diffusers) writes a folder:
``config.json`` next to the weights, in ``model.safetensors`` (or the older
``pytorch_model.bin``; diffusers names them ``diffusion_pytorch_model.*``), or
in shards listed by a ``*.index.json``.  gradscope reads one weights file with
``--arch``; the message names the file in the folder, so the user can rerun.
Imports nothing heavy: the CLI checks paths before torch is imported.
"""

from __future__ import annotations

from pathlib import Path

WEIGHT_FILES = (
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin",
)
SHARD_INDEX_SUFFIX = ".index.json"


def directory_hint(path: str | Path) -> str:
    """A clause to append to "X is a directory, not a file": which file to pass instead."""
    folder = Path(path)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return f"; for a save_pretrained folder pass its weights file {str(folder / name)!r} with --arch"
    try:
        indexes = sorted(p.name for p in folder.glob("*" + SHARD_INDEX_SUFFIX))
    except OSError:
        indexes = []
    if indexes:
        return (
            f"; it holds a sharded checkpoint ({indexes[0]}), which gradscope does not read: save it as one file "
            "(save_pretrained(folder, max_shard_size='1000GB')) and pass that file with --arch"
        )
    return ""
