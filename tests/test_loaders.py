"""Loaders: format detection from content, pickle safety, state_dict matching,
and audits of every format compared with autograd on the Python model."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from test_cli_models import canaries, load_models_module, make_model_files

from gradscope.errors import InputError
from gradscope.loaders import LoadError, audit_loaded, load_inputs, load_model
from gradscope.loaders import detect as det
from gradscope.loaders.factory import split_spec
from gradscope.loaders.pickles import pickle_globals, unsafe_globals


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_model_files(tmp_path_factory.mktemp("loaders"))


def _spec(files: dict[str, Path], name: str) -> str:
    return f"{files['models']}:{name}"


# -- detection ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("torchscript", det.TORCHSCRIPT),
        ("export", det.EXPORT),
        ("state_dict", det.TORCH_SAVE),
        ("checkpoint", det.TORCH_SAVE),
        ("safetensors", det.SAFETENSORS),
        ("pickle", det.TORCH_SAVE),
        ("evil_pickle", det.PICKLE),
    ],
)
def test_detect_format_from_content_not_extension(
    files: dict[str, Path], tmp_path: Path, name: str, expected: str
) -> None:
    misnamed = tmp_path / "model.bin"  # an extension that says nothing
    shutil.copy(files[name], misnamed)
    assert det.detect_format(misnamed) == expected


def test_detect_rejects_missing_empty_directory_truncated(files: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty.pt"
    empty.touch()
    truncated_zip = tmp_path / "cut.pt"
    truncated_zip.write_bytes(files["state_dict"].read_bytes()[:400])
    truncated_st = tmp_path / "cut.safetensors"
    truncated_st.write_bytes(files["safetensors"].read_bytes()[:200])
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    cases = {
        tmp_path / "absent.pt": "does not exist",
        tmp_path: "is a directory",
        empty: "is empty",
        truncated_zip: "truncated",
        text: "not a model file",
    }
    for path, words in cases.items():
        with pytest.raises(LoadError, match=words):
            det.detect_format(path)
    # The safetensors header is intact but the data is cut: detected, then refused by the reader.
    with pytest.raises(LoadError, match="safetensors"):
        load_model(str(truncated_st), arch=_spec(files, "build"))


def test_split_spec_forms(files: dict[str, Path]) -> None:
    assert split_spec("pkg.mod:make") == ("pkg.mod", "make")
    assert split_spec("dir/models.py:build") == ("dir/models.py", "build")
    assert split_spec(str(files["state_dict"])) is None  # an existing file is a file
    assert split_spec("model.pt") is None
    with pytest.raises(LoadError, match="not a Python name"):
        split_spec("models.py:not-a-name")


# -- pickle safety ------------------------------------------------------------------


def test_pickle_globals_are_read_without_running_anything(files: dict[str, Path]) -> None:
    names = pickle_globals(files["evil_pickle"].read_bytes())
    assert any(name.endswith(".open") for name in names), names
    assert any(n.endswith(".open") for n in unsafe_globals(files["evil_zip"]))
    assert unsafe_globals(files["state_dict"]) == []  # tensors and OrderedDict only
    assert not any(path.exists() for path in canaries(files["models"].parent))


@pytest.mark.parametrize("name", ["evil_pickle", "evil_zip", "pickle"])
def test_pickled_objects_are_refused_before_unpickling(files: dict[str, Path], name: str) -> None:
    with pytest.raises(LoadError, match="--trust-code") as info:
        load_model(str(files[name]))
    assert "\n" not in str(info.value)
    assert not any(path.exists() for path in canaries(files["models"].parent))


def test_trust_pickle_loads_a_pickled_module(files: dict[str, Path]) -> None:
    for consent in ({"trust_code": True}, {"trust_pickle": True}):  # trust_pickle: the former name, still accepted
        loaded = load_model(str(files["pickle"]), **consent)
        assert loaded.format == "pickle" and isinstance(loaded.module, torch.nn.Sequential)
        assert loaded.loader == "torch.load(weights_only=False)"


# -- state_dict and --arch ----------------------------------------------------------


def test_state_dict_needs_arch_and_names_the_flag(files: dict[str, Path]) -> None:
    with pytest.raises(LoadError, match="--arch"):
        load_model(str(files["state_dict"]))


def test_state_dict_mismatch_names_missing_and_unexpected_keys(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(LoadError) as info:
        load_model(str(files["state_dict"]), arch=_spec(files, "build_other"))
    message = str(info.value)
    # build_other has keys 0.*, 2.*, 3.*; the file has fc1.*, fc2.*.
    assert "missing keys: 0.weight, 0.bias, 2.weight, 2.bias (+2 more)" in message
    assert "unexpected keys: fc1.weight, fc1.bias, fc2.weight, fc2.bias" in message
    wrong_shape = tmp_path / "wrong.pt"
    state = load_models_module(files["models"].parent).build().state_dict()
    state["fc2.weight"] = torch.zeros(5, 3)
    torch.save(state, wrong_shape)
    with pytest.raises(LoadError, match=r"fc2.weight has shape \[5, 3\] in the file but \[5, 16\]"):
        load_model(str(wrong_shape), arch=_spec(files, "build"))


def test_checkpoint_with_nested_prefixed_state_dict(files: dict[str, Path]) -> None:
    loaded = load_model(str(files["checkpoint"]), arch=_spec(files, "build"))
    reference = load_models_module(files["models"].parent).build()
    assert loaded.format == "state_dict"
    assert torch.equal(loaded.module.fc1.weight, reference.fc1.weight)
    assert loaded.notes == ["weights read from checkpoint['state_dict']"]


# -- factories ----------------------------------------------------------------------


def test_factory_errors(files: dict[str, Path]) -> None:
    with pytest.raises(LoadError, match="has no attribute 'missing'"):
        load_model(_spec(files, "missing"))
    with pytest.raises(LoadError, match="returned a int, not an nn.Module"):
        load_model(_spec(files, "notmodule"))
    with pytest.raises(LoadError, match="cannot find Python module 'no_such_pkg.models'"):
        load_model("no_such_pkg.models:build")
    assert load_model(_spec(files, "instance")).module.fc1.in_features == 12  # a module attribute
    assert load_model("torch.nn:Identity").format == "factory"  # package.module:factory


def test_load_inputs_forms(tmp_path: Path) -> None:
    x = torch.randn(3, 4)
    for value in (x, (x, x), {"x": x}):
        torch.save(value, tmp_path / "in.pt")
        loaded = load_inputs(str(tmp_path / "in.pt"))
        assert type(loaded) is type(value)
    torch.save([1, 2, 3], tmp_path / "bad.pt")
    with pytest.raises(LoadError, match="must hold a tensor"):
        load_inputs(str(tmp_path / "bad.pt"))


# -- audits of every format against autograd on the Python model --------------------


def _reference(files: dict[str, Path]) -> dict[str, torch.Tensor]:
    """fc1's output and both weight gradients of the Python model under loss = mean(output)."""
    model = load_models_module(files["models"].parent).build()
    x = torch.load(files["inputs"], weights_only=True)
    hidden = model.fc1(x)
    out = model.fc2(model.act(hidden))
    out.mean().backward()
    return {
        "fc1": hidden.detach(),
        "out": out.detach(),
        "fc1.grad": model.fc1.weight.grad,
        "fc2.grad": model.fc2.weight.grad,
    }


@pytest.mark.parametrize(
    ("form", "fmt"),
    [
        ("factory", "factory"),
        ("torchscript", "torchscript"),
        ("export", "export"),
        ("state_dict", "state_dict"),
        ("safetensors", "safetensors"),
    ],
)
def test_every_format_records_the_true_weight_gradients(files: dict[str, Path], form: str, fmt: str) -> None:
    spec = _spec(files, "build") if form == "factory" else str(files[form])
    arch = _spec(files, "build") if form in ("state_dict", "safetensors") else None
    loaded = load_model(spec, arch=arch, trust_code=form == "torchscript")  # TorchScript is code
    assert loaded.format == fmt
    inputs = load_inputs(str(files["inputs"]))
    report = audit_loaded(loaded, inputs, loss="mean")
    ref = _reference(files)
    assert report.model["format"] == fmt and report.model["loader"] == loaded.loader
    for name in ("fc1", "fc2"):
        grad = report.record.layer(name).weight_grad
        expected = ref[f"{name}.grad"]
        assert grad.count == expected.numel()
        assert math.isclose(grad.rms, float(expected.pow(2).mean().sqrt()), rel_tol=1e-5)
        assert math.isclose(grad.absmax, float(expected.abs().max()), rel_tol=1e-6)
    for p in loaded.module.parameters():  # the audit restored .grad
        assert p.grad is None


def test_torchscript_records_the_whole_output_and_says_what_is_missing(files: dict[str, Path]) -> None:
    loaded = load_model(str(files["torchscript"]), trust_code=True)
    report = audit_loaded(loaded, load_inputs(str(files["inputs"])), loss="mean")
    ref = _reference(files)
    assert [layer.name for layer in report.layers] == ["fc1", "fc2", "model"]
    assert [layer.type for layer in report.layers] == ["Linear", "Linear", "MLP"]
    assert report.record.layer("fc1").activation is None  # not observable in TorchScript
    whole = report.record.layer("model").activation
    assert math.isclose(whole.mean, float(ref["out"].mean()), rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(whole.std, float(ref["out"].std(correction=0)), rel_tol=1e-4)
    # d(mean)/d(out) is 1/numel everywhere: the output gradient's rms is exactly that.
    assert math.isclose(report.record.layer("model").gradient.rms, 1 / ref["out"].numel(), rel_tol=1e-6)
    assert any("cannot carry Python hooks" in note for note in report.record.notes)
    assert report.model["type"] == "MLP"
    for _, param in loaded.module.named_parameters():
        assert not getattr(param, "_post_accumulate_grad_hooks", None)  # probe hooks removed


def test_export_records_per_layer_with_original_types(files: dict[str, Path]) -> None:
    loaded = load_model(str(files["export"]))
    report = audit_loaded(loaded, load_inputs(str(files["inputs"])), loss="mean")
    ref = _reference(files)
    assert [(layer.name, layer.type) for layer in report.layers] == [
        ("fc1", "Linear"),
        ("act", "ReLU"),
        ("fc2", "Linear"),
    ]
    fc1 = report.record.layer("fc1").activation
    assert math.isclose(fc1.mean, float(ref["fc1"].mean()), rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(fc1.std, float(ref["fc1"].std(correction=0)), rel_tol=1e-4)
    assert report.model["type"] == "MLP"


def test_export_uses_its_saved_example_inputs(files: dict[str, Path]) -> None:
    report = audit_loaded(load_model(str(files["export"])), loss="mean")
    assert report.run["input_shape"] == [4, 12]  # the shape it was exported with
    assert "inputs: the example inputs saved in the export archive" in report.record.notes


def test_torchscript_input_shape_inferred_from_first_linear(files: dict[str, Path]) -> None:
    report = audit_loaded(load_model(str(files["torchscript"]), trust_code=True))
    assert report.run["input_shape"] == [32, 12]


def test_lazy_modules_are_refused_with_a_message(tmp_path: Path) -> None:
    source = "from torch import nn\ndef build():\n    return nn.Sequential(nn.LazyLinear(3))\n"
    (tmp_path / "lazy.py").write_text(source)
    with pytest.raises(InputError, match="lazy module"):
        audit_loaded(load_model(f"{tmp_path / 'lazy.py'}:build"))


def test_export_that_cannot_be_unflattened_still_records_parameter_gradients(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gradscope.loaders.compiled as compiled

    monkeypatch.setattr(compiled, "unflatten", lambda program: None)
    loaded = load_model(str(files["export"]))
    assert not loaded.hookable and loaded.loader == "gradscope's weights-only .pt2 reader + ExportedProgram.module"
    report = audit_loaded(loaded, load_inputs(str(files["inputs"])), loss="mean", mode="eval")
    ref = _reference(files)
    assert [(layer.name, layer.type) for layer in report.layers] == [
        ("fc1", "Linear"),
        ("fc2", "Linear"),
        ("model", "MLP"),
    ]
    grad = report.record.layer("fc1").weight_grad
    assert math.isclose(grad.rms, float(ref["fc1.grad"].pow(2).mean().sqrt()), rel_tol=1e-5)
    assert any("could not be unflattened" in note for note in report.record.notes)


@pytest.mark.parametrize(
    ("factory", "loader", "hookable"),
    [
        ("scripted", "factory call returning a ScriptModule", False),
        ("exported", "factory call returning an ExportedProgram", True),
    ],
)
def test_factories_returning_scripted_or_exported_models(
    files: dict[str, Path], factory: str, loader: str, hookable: bool
) -> None:
    loaded = load_model(_spec(files, factory))
    assert (loaded.format, loaded.loader, loaded.hookable) == ("factory", loader, hookable)
    report = audit_loaded(loaded, load_inputs(str(files["inputs"])), loss="mean")
    expected = _reference(files)["fc2.grad"]
    assert math.isclose(report.record.layer("fc2").weight_grad.rms, float(expected.pow(2).mean().sqrt()), rel_tol=1e-5)
    with pytest.raises(LoadError, match="must build a Python nn.Module"):
        load_model(str(files["state_dict"]), arch=_spec(files, factory))


def test_library_load_refuses_a_fifo_without_opening_it(tmp_path) -> None:
    """Opening a FIFO blocks until a writer comes: the library refuses it from stat alone."""
    import os

    from gradscope.errors import GradscopeError
    from gradscope.loaders.detect import check_file

    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    with pytest.raises(GradscopeError, match="not a regular file"):
        check_file(fifo)
