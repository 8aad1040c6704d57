"""Every path a command reads or writes, checked before any model code runs.

Inputs (MODEL, the ``--arch`` factory's file, ``--inputs``, a report JSON)
must be regular files: a FIFO or a device would make ``open`` block or read
forever, so they are refused from ``stat`` alone, before anything opens them.

Outputs never destroy data: an output path may not be one of the inputs
(compared by device and inode, so a hard link or another spelling of the same
file is caught), nor a symbolic link, a directory, a FIFO, a device or a
socket; a ``--tensorboard`` run directory may be new or empty, never an
existing run.  The folder that will receive an output must exist (or, for a
run directory, be creatable) and accept a new file, which is tried, not guessed
from permission bits (root ignores them; read-only mounts do not).

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from gradscope.errors import InputError


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


@dataclass(frozen=True)
class InputFile:
    """An input the command will read: how to name it, and its identity on disk."""

    label: str  # e.g. "model file 'ckpt.pt'"
    device: int
    inode: int


def check_input_file(path: str | Path, what: str) -> InputFile:
    """``path`` must name a regular file (symbolic links are followed); checked with
    ``stat`` only, so a FIFO is refused without ever being opened."""
    text = str(path)
    try:
        info = os.stat(text)
    except FileNotFoundError:
        raise InputError(f"{what} {text!r} does not exist") from None
    except NotADirectoryError:
        raise InputError(f"{what} {text!r} does not exist (a part of the path is a file)") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {text!r}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        from gradscope.model_dirs import directory_hint

        raise InputError(f"{what} {text!r} is a directory, not a file{directory_hint(text)}")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{what} {text!r} is {_kind(info.st_mode)}, not a regular file")
    return InputFile(f"{what} {text!r}", info.st_dev, info.st_ino)


def spec_file(spec: str) -> str | None:
    """The file a MODEL or ``--arch`` spec names, if any: the spec itself, or the
    ``file.py`` of ``file.py:factory``; None for ``package.module:factory``.

    Mirrors ``gradscope.loaders.factory.split_spec`` without importing torch: a
    spec that exists on disk is a file, even with a colon in its name.
    """
    if os.path.lexists(spec) or ":" not in spec:
        return spec
    target, _, _attr = spec.rpartition(":")
    if not target:
        return spec
    if target.endswith(".py") or "/" in target or "\\" in target or os.path.lexists(target):
        return target
    return None  # package.module:factory: imported, not opened by path


def check_model_inputs(model: str | None, arch: str | None, inputs_file: str | None) -> list[InputFile]:
    """Check MODEL, the ``--arch`` file and ``--inputs`` before anything opens them."""
    found: list[InputFile] = []
    if model is not None:
        target = spec_file(model)
        if target is not None:
            what = "Python file" if target != model else "model file"
            found.append(check_input_file(target, what))
    if arch:
        target = spec_file(arch)
        if target is not None:
            found.append(check_input_file(target, "--arch file"))
    if inputs_file:
        found.append(check_input_file(inputs_file, "inputs file"))
    return found


@dataclass
class OutputPlan:
    """The outputs of one command, all checked: files (``--output``, ``--out``) and
    run directories (``--tensorboard``), by option name."""

    files: dict[str, Path] = field(default_factory=dict)
    directories: dict[str, Path] = field(default_factory=dict)


def _same_as_input(info: os.stat_result, inputs: list[InputFile]) -> InputFile | None:
    for item in inputs:
        if (info.st_dev, info.st_ino) == (item.device, item.inode):
            return item
    return None


def _probe_writable(folder: Path, option: str, target: str) -> None:
    """Create and remove a hidden file in ``folder``: the only test that also holds
    for root and for read-only mounts."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".gradscope-probe-", dir=folder)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise InputError(
            f"cannot write {option} {target!r}: directory {str(folder)!r} is not writable ({reason})"
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def _existing(path: str, option: str, verb: str) -> os.stat_result | None:
    """What stands at ``path`` itself (``lstat``: a link is not followed), or None."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise InputError(f"cannot {verb} {option} {path!r}: a part of the path is a file, not a directory") from None
    except OSError as exc:
        raise InputError(f"cannot {verb} {option} {path!r}: {exc.strerror or exc}") from None


def check_output_file(path: str, option: str, inputs: list[InputFile]) -> Path:
    """A file output: new, or an existing regular file that is none of the inputs."""
    if not path:
        raise InputError(f"{option} needs a file name")
    target = Path(path)
    info = _existing(path, option, "write")
    if info is not None:
        if stat.S_ISLNK(info.st_mode):
            raise InputError(
                f"{option} {path!r} is a symbolic link; gradscope does not write through links (name a new file)"
            )
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{option} {path!r} is {_kind(info.st_mode)}; name a regular file to write")
        same = _same_as_input(info, inputs)
        if same is not None:
            raise InputError(f"{option} {path!r} is the {same.label}; writing there would destroy it (name a new file)")
    elif path.endswith(("/", os.sep)):
        raise InputError(f"{option} {path!r} names a directory; name a file to write")
    folder = target.parent
    if not folder.is_dir():
        if folder.exists():
            raise InputError(f"cannot write {option} {path!r}: {str(folder)!r} is not a directory")
        raise InputError(f"cannot write {option} {path!r}: directory {str(folder)!r} does not exist")
    _probe_writable(folder, option, path)
    return target


def existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of ``path`` that exists (``.`` for a bare relative name)."""
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def check_output_directory(path: str, option: str, inputs: list[InputFile]) -> Path:
    """A run directory: new (its missing parents are created when it is written) or
    an existing empty directory; never a file, a link, or a run that already has data."""
    if not path:
        raise InputError(f"{option} needs a directory name")
    target = Path(path)
    info = _existing(path, option, "create")
    if info is not None:
        if stat.S_ISLNK(info.st_mode):
            raise InputError(f"{option} {path!r} is a symbolic link; name a new directory for the run")
        if stat.S_ISREG(info.st_mode):
            what = _same_as_input(info, inputs)
            label = f"the {what.label}" if what else "a file"
            raise InputError(f"{option} {path!r} is {label}; it must name a directory for the run")
        if not stat.S_ISDIR(info.st_mode):
            raise InputError(f"{option} {path!r} is {_kind(info.st_mode)}; it must name a directory for the run")
        try:
            empty = not any(os.scandir(path))
        except OSError as exc:
            raise InputError(f"cannot read {option} {path!r}: {exc.strerror or exc}") from None
        if not empty:
            raise InputError(
                f"{option} {path!r} already holds files; gradscope never writes into an existing run "
                "(name a new directory)"
            )
        _probe_writable(target, option, path)
        return target
    folder = existing_ancestor(target)
    if not folder.is_dir():
        raise InputError(f"cannot create {option} {path!r}: {str(folder)!r} is not a directory")
    _probe_writable(folder, option, path)
    return target


def _check_files_outside_runs(plan: OutputPlan) -> None:
    """A file output may not lie inside a run directory: the run must be new or empty
    when it is moved into place, and the run directory holds only the run."""
    for option, target in plan.files.items():
        where = Path(os.path.realpath(target.parent)) / target.name
        for run_option, run in plan.directories.items():
            if where.is_relative_to(os.path.realpath(run)):
                raise InputError(
                    f"{option} {str(target)!r} is inside the {run_option} run directory {str(run)!r}, which "
                    "holds only the run; write it next to the run instead"
                )


def plan_outputs(
    inputs: list[InputFile], files: dict[str, str | None], directories: dict[str, str | None] | None = None
) -> OutputPlan:
    """Check every output of a command (option name -> path or None) against the inputs and each other."""
    plan = OutputPlan()
    for option, path in files.items():
        if path:
            plan.files[option] = check_output_file(path, option, inputs)
    for option, path in (directories or {}).items():
        if path:
            plan.directories[option] = check_output_directory(path, option, inputs)
    seen: dict[str, str] = {}
    for option, target in [*plan.files.items(), *plan.directories.items()]:
        key = os.path.abspath(target)
        if key in seen:
            raise InputError(f"{option} and {seen[key]} name the same path {str(target)!r}; give each its own")
        seen[key] = option
    _check_files_outside_runs(plan)
    return plan
