"""Model loaders: every MODEL form of the CLI contract, with its safety rules.

``load_model(spec, arch=..., trust_code=..., seed=...)`` returns a ``LoadedModel``
naming the loader used; ``audit_loaded(loaded, ...)`` audits it, taking the
loader-specific path for formats whose submodules cannot carry hooks.

Forms (DESIGN.md, "CLI"):

* ``path/to/file.py:factory`` / ``package.module:factory`` -> ``factory``
* TorchScript zip (``code/``, ``constants.pkl``), only with ``--trust-code`` -> ``torchscript``
* torch.export archive (``archive_format``, ``models/``)    -> ``export``
* torch.save state_dict or checkpoint + ``--arch``          -> ``state_dict``
* safetensors + ``--arch``                                  -> ``safetensors``
* pickled module, only with ``--trust-code``                -> ``pickle``

Data loads with no flag; code (a pickled module, a TorchScript program, a
``.pt2`` part that needs more than tensors) is refused before it runs unless
``trust_code`` is set: see ``gradscope.loaders.consent``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradscope.loaders.detect import LoadError, check_file

__all__ = ["LoadError", "LoadedModel", "load_model", "load_inputs", "audit_loaded"]

FORMATS = ("factory", "torchscript", "export", "state_dict", "safetensors", "pickle")


@dataclass
class LoadedModel:
    """A model ready to audit, and how it was obtained."""

    module: Any  # an nn.Module (for TorchScript: an OpaqueModel shell)
    format: str  # one of FORMATS
    source: str  # what the user passed
    loader: str  # the function that loaded it, e.g. "torch.jit.load"
    hookable: bool = True  # False: only the whole model's output and the parameters can be recorded
    layer_types: dict[str, str] = field(default_factory=dict)  # qualified name -> original class name
    notes: list[str] = field(default_factory=list)
    example_inputs: Any = None  # inputs saved with the model (torch.export archives)
    input_guess: tuple[Any, ...] | None = None  # (shape, dtype, vocab) when the model cannot be inspected
    fixed_mode: str | None = None  # train/eval/mixed fixed in the file (torch.export); None: --mode applies
    seed: int | None = None  # the seed the global generators had when a factory built the model


def _arch_model(arch: str | None, path: Path, kind: str, seed: int | None) -> Any:
    from gradscope.loaders.factory import build_from_spec

    if not arch:
        raise LoadError(
            f"{str(path)!r} holds only weights ({kind}); pass --arch file.py:factory (or package.module:factory) "
            "naming the code that builds the architecture"
        )
    import torch

    model = build_from_spec(arch, seed=seed)
    if not isinstance(model, torch.nn.Module) or isinstance(model, torch.jit.ScriptModule):
        raise LoadError(f"--arch {arch} must build a Python nn.Module, not a {type(model).__name__}")
    return model


def _arch_unused(arch: str | None, spec: str, what: str) -> None:
    """``--arch`` builds the architecture for weights alone; a MODEL that carries its own would ignore it."""
    if arch:
        raise LoadError(
            f"--arch applies only to a state_dict or safetensors MODEL; {spec!r} is {what}, which carries its "
            "own architecture (drop --arch)"
        )


def load_model(
    spec: str,
    *,
    arch: str | None = None,
    trust_code: bool = False,
    trust_pickle: bool = False,
    seed: int | None = 0,
) -> LoadedModel:
    """Load MODEL as the CLI contract describes, deciding the format from the file's content.

    Args:
        spec: a factory spec or a model file.
        arch: the factory building the architecture for a state_dict or safetensors file.
        trust_code: consent to run code from the file (``--trust-code``): a pickled
            module, a TorchScript program, a ``.pt2`` part that needs the full unpickler.
        trust_pickle: the former name of ``trust_code``; either one gives consent.
        seed: seeds torch's, Python's and NumPy's global generators while a factory
            (MODEL's or ``--arch``'s) builds the model; None leaves them alone.

    Raises:
        LoadError: a one-line reason (missing, empty, truncated, mismatched, an
            ``arch`` for a MODEL that has its own architecture...); ``CodeRefused``
            when the file is code and consent was not given.
    """
    from gradscope.loaders import detect, files
    from gradscope.loaders.factory import build_from_spec, split_spec

    trusted = trust_code or trust_pickle
    if split_spec(spec) is not None:
        _arch_unused(arch, spec, "a factory")  # before any of its code runs
        loaded = _from_factory(spec, build_from_spec(spec, seed=seed))
        loaded.seed = seed
        return loaded
    path = Path(spec)
    check_file(path)
    kind = detect.detect_format(path)
    if kind in (detect.TORCHSCRIPT, detect.EXPORT):
        _arch_unused(arch, spec, "a TorchScript file" if kind == detect.TORCHSCRIPT else "a torch.export archive")
    if kind == detect.TORCHSCRIPT:
        return _torchscript(spec, files.load_torchscript(path, trusted=trusted))
    if kind == detect.EXPORT:
        program, notes = files.load_export(path, trusted=trusted)
        loaded = _export(spec, program)
        loaded.notes.extend(notes)
        if trusted:
            loaded.loader = loaded.loader.replace("gradscope's weights-only .pt2 reader", "torch.export.load")
        return loaded
    if kind == detect.SAFETENSORS:
        state = files.load_safetensors(path)
        model = _arch_model(arch, path, "safetensors", seed)
        notes = files.load_into(model, state, path, arch or "")
        return LoadedModel(
            model, "safetensors", spec, "safetensors.torch.load_file + load_state_dict", notes=notes, seed=seed
        )
    # torch.save zip, legacy torch.save or a bare pickle: probe with the restricted unpickler first.
    if trusted:
        obj = files.load_trusted_pickle(path)
        loader = "torch.load(weights_only=False)"
    else:
        obj = files.load_weights_only(path)
        loader = "torch.load(weights_only=True)"
    import torch

    if isinstance(obj, torch.nn.Module):
        _arch_unused(arch, spec, "a pickled module")
    if isinstance(obj, torch.jit.ScriptModule):  # an nn.Module too, but one that refuses hooks
        loaded = _torchscript(spec, obj)
        loaded.format, loaded.loader = "pickle", loader
        return loaded
    if isinstance(obj, torch.nn.Module):
        return LoadedModel(obj, "pickle", spec, loader)
    state, where = files.extract_state_dict(obj, path)
    model = _arch_model(arch, path, "a state_dict", seed)
    notes = files.load_into(model, state, path, arch or "")
    loaded = LoadedModel(model, "state_dict", spec, f"{loader} + load_state_dict", seed=seed)
    if where:
        loaded.notes.append(f"weights read from checkpoint{where}")
    loaded.notes.extend(notes)
    return loaded


def _from_factory(spec: str, built: Any) -> LoadedModel:
    """A factory's result; scripted modules and exported programs take their format's path."""
    import torch

    if isinstance(built, torch.jit.ScriptModule):
        loaded = _torchscript(spec, built)
    elif isinstance(built, torch.export.ExportedProgram):
        loaded = _export(spec, built)
    else:
        return LoadedModel(built, "factory", spec, "factory call")
    what = "a ScriptModule" if loaded.format == "torchscript" else "an ExportedProgram"
    loaded.loader = f"factory call returning {what}"
    loaded.format = "factory"
    return loaded


def _torchscript(spec: str, scripted: Any) -> LoadedModel:
    from gradscope.loaders.compiled import OpaqueModel, scripted_input_guess

    shell = OpaqueModel(scripted)
    # torch.jit.freeze inlines an eval-mode model and drops its ``training`` flag: train() cannot change it.
    frozen = hasattr(scripted, "_c") and not scripted._c.hasattr("training")
    return LoadedModel(
        shell,
        "torchscript",
        spec,
        "torch.jit.load",
        hookable=False,
        layer_types=shell.layer_types(),
        notes=[
            "TorchScript submodules cannot carry Python hooks: recorded the whole model's output and gradient "
            "and every parameter's weight and gradient, but no per-layer activations or output gradients "
            "(audit the Python model, file.py:factory, for those)"
        ],
        input_guess=scripted_input_guess(scripted),
        fixed_mode="eval" if frozen else None,
    )


def _export(spec: str, program: Any) -> LoadedModel:
    from gradscope.loaders.compiled import OpaqueModel, export_example_inputs, export_layer_types, unflatten
    from gradscope.loaders.pt2 import export_mode

    types = export_layer_types(program)
    example = export_example_inputs(program)
    mode = export_mode(program)
    fixed = f"torch.export fixed the {mode} mode (dropout, BatchNorm) when the program was exported"
    notes = [f"{fixed}; --mode does not change it"] if mode else []
    module = unflatten(program)
    if module is not None:
        return LoadedModel(
            module,
            "export",
            spec,
            "gradscope's weights-only .pt2 reader + torch.export.unflatten",
            layer_types=types,
            notes=notes,
            example_inputs=example,
            fixed_mode=mode,
        )
    notes.insert(
        0,
        "this exported program could not be unflattened: recorded the whole model's output and "
        "gradient and every parameter's weight and gradient, but no per-layer activations",
    )
    shell = OpaqueModel(program.module(), follow_mode=False)
    return LoadedModel(
        shell,
        "export",
        spec,
        "gradscope's weights-only .pt2 reader + ExportedProgram.module",
        hookable=False,
        layer_types=types,
        notes=notes,
        example_inputs=example,
        fixed_mode=mode,
    )


def load_inputs(spec: str) -> Any:
    """``--inputs FILE``: a tensor, a tuple/list of tensors or a dict of tensors.

    Always ``torch.load(weights_only=True)``: inputs are data, and ``--trust-code``
    does not extend to them.
    """
    import pickle

    import torch

    from gradscope.loaders.files import code_refused, first_line, not_torch_save, torch_load
    from gradscope.loaders.pickles import describe_imports

    path = Path(spec)
    check_file(path, "inputs file")
    try:
        obj = torch_load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        imports = code_refused(path, exc)
        if not imports:
            raise not_torch_save(path, "inputs file ") from None
        raise LoadError(
            f"inputs file {spec!r} is a pickled Python object{describe_imports(imports)}; --inputs are read as "
            "tensors only (weights_only=True, --trust-code does not apply): torch.save a tensor, a tuple or a "
            "dict of tensors"
        ) from None
    except Exception as exc:
        raise LoadError(
            f"cannot read inputs file {spec!r} with torch.load(weights_only=True): {first_line(exc)}"
        ) from None
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else [obj]
    if not isinstance(obj, (torch.Tensor, tuple, list, dict)) or not any(isinstance(v, torch.Tensor) for v in values):
        raise LoadError(f"inputs file {spec!r} must hold a tensor, a tuple of tensors or a dict of tensors")
    return tuple(obj) if isinstance(obj, list) else obj


def _state_true_mode(report: Any, loaded: LoadedModel) -> None:
    """``run.mode`` is the mode the model ran in: the exported one for a ``.pt2``, not ``--mode``.

    An exported graph with dropout and batch-norm fixed to different modes is
    "mixed"; one with neither behaves the same in both modes, so ``--mode`` stands.
    """
    if loaded.fixed_mode is not None:
        asked = report.run.get("mode")
        report.run["mode"] = loaded.fixed_mode
        if asked and asked != loaded.fixed_mode:
            report.record.note(f"--mode {asked} was not applied: the exported program runs in {loaded.fixed_mode} mode")


def _check_lazy(loaded: LoadedModel) -> None:
    """Lazy modules (``nn.LazyLinear``) have no weights until their first forward."""
    from torch.nn.parameter import is_lazy

    for name, module in loaded.module.named_modules():
        if any(is_lazy(p) for p in module.parameters(recurse=False)):
            from gradscope.errors import InputError

            raise InputError(
                f"{name or 'model'} ({type(module).__name__}) is a lazy module whose parameters are not "
                "initialised; run one forward in the factory before returning the model"
            )


def _unrolled(module: Any) -> Any:
    from gradscope.loaders.hookless import unrolled

    return unrolled(module)


def audit_loaded(loaded: LoadedModel, inputs: Any = None, **kwargs: Any) -> Any:
    """Audit a loaded model, then diagnose; returns the Report.

    ``kwargs`` go to ``gradscope.auditing.audit`` (input_shape, input_dtype,
    vocab, loss, batches, seed, formats, mode).  Models without hookable
    submodules are audited through the whole-model output plus a
    ``ParameterProbe``; exported layers get their original class names back
    before the diagnosis reads them.
    """
    from gradscope.auditing import audit
    from gradscope.diagnose import diagnose

    _check_lazy(loaded)
    kwargs = dict(kwargs)
    if inputs is None and kwargs.get("input_shape") is None:
        if loaded.example_inputs is not None:
            inputs = loaded.example_inputs
            loaded.notes.append("inputs: the example inputs saved in the export archive")
        elif loaded.input_guess is not None:
            shape, dtype, vocab = loaded.input_guess
            kwargs.update(input_shape=shape, input_dtype=dtype)
            if kwargs.get("vocab") is None:
                kwargs["vocab"] = vocab
        elif not loaded.hookable:
            from gradscope.errors import InputError

            raise InputError(
                f"cannot infer the input shape of {loaded.format} model {loaded.source!r}; "
                "pass --input-shape, e.g. --input-shape 32,784 (or --inputs FILE)"
            )
    common: dict[str, Any] = dict(source=loaded.source, model_format=loaded.format, diagnose=False)
    if loaded.hookable:
        report = audit(loaded.module, inputs, **common, **kwargs)
        for layer in report.layers:
            original = loaded.layer_types.get(layer.module if layer.module != "model" else "")
            if original and layer.type in ("InterpreterModule", "UnflattenedModule", "Module"):
                layer.type = original
    elif (shell := _unrolled(loaded.module)) is not None:
        report = audit(shell, inputs, **common, **kwargs)
        report.record.note("TorchScript Sequential: run child by child from Python, so every layer was recorded")
        loaded.notes = [n for n in loaded.notes if "cannot carry Python hooks" not in n]  # they were recorded
    else:
        from gradscope.loaders.hookless import ParameterProbe, merge_parameter_layers, parameter_layers

        with ParameterProbe(loaded.module) as probe:
            report = audit(loaded.module, inputs, include=["model"], **common, **kwargs)
        whole = report.record.layers[-1] if report.record.layers else None
        if whole is not None and loaded.layer_types.get(""):
            whole.type = loaded.layer_types[""]  # the scripted/exported class, not the shell's
        merge_parameter_layers(report.record, parameter_layers(loaded.module, probe, loaded.layer_types))
    for note in loaded.notes:
        report.record.note(note)
    report.model["loader"] = loaded.loader
    if loaded.seed is not None:
        report.model["seed"] = loaded.seed  # the seed the factory built the model with
    _state_true_mode(report, loaded)
    if loaded.layer_types.get(""):
        report.model["type"] = loaded.layer_types[""]  # the original class, not the shell/unflattened one
    diagnose(report, model=loaded.module)
    return report
