"""Consent for code (issue 10): hostile model files, built here, in every container gradscope accepts.

Each payload creates a marker file when its code runs.  Without
``--trust-code`` no marker may ever appear, and ``audit`` and ``fix`` exit 2
with exactly one line on stderr and no traceback.  With ``--trust-code`` the
file loads as before (the markers prove its code ran).  ``--inputs`` files are
data only: refused even with the flag.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from hostile_files import (
    Case,
    FileTensor,
    export_scaled,
    graph_calls_from_file,
    pickled_module,
    poison_constants,
    poison_example_inputs,
    poison_weights,
    rewrite_archive,
    save_scripted_writer,
    shape_expression_runs,
    state_dict_payload,
    torch_save_bytes,
    with_native_code,
)
from test_cli_models import load_models_module, make_model_files

from gradscope.cli import cli

CASES = [
    "pt_module",
    "pt_checkpoint_arch",
    "legacy_pickle_arch",
    "pt2_weights",
    "pt2_constants",
    "pt2_example_inputs",
    "pt2_graph_op",
    "pt2_shape_expression",
    "pt2_native_code",
    "torchscript",
    "inputs_file",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile_base")
    files = make_model_files(folder)
    files["scaled"] = export_scaled(folder / "scaled.pt2")
    return files


def make_case(name: str, base: dict[str, Path], folder: Path) -> Case:
    """Write the hostile file of ``name`` into ``folder``; markers go to ``folder / "markers"``."""
    markers = folder / "markers"
    markers.mkdir(parents=True, exist_ok=True)
    marker = markers / name
    inputs = ["--inputs", str(base["inputs"]), "--loss", "mean"]
    arch = ["--arch", f"{base['models']}:build"]
    if name == "pt_module":
        return Case(name, [str(pickled_module(folder / "model.pt", marker)), *inputs], [marker])
    if name in ("pt_checkpoint_arch", "legacy_pickle_arch"):
        reference = load_models_module(base["models"].parent).build()
        checkpoint = {"epoch": 3, "state_dict": state_dict_payload(reference, marker)}
        path = folder / "weights.bin"  # the extension says nothing
        # the zip format, or the legacy one: a bare stream of pickles
        torch.save(checkpoint, path, _use_new_zipfile_serialization=name == "pt_checkpoint_arch")
        return Case(name, [str(path), *arch, *inputs], [marker])
    if name.startswith("pt2_"):
        edit = {
            "pt2_weights": poison_weights,
            "pt2_constants": poison_constants,
            "pt2_example_inputs": poison_example_inputs,
            "pt2_graph_op": graph_calls_from_file,
            "pt2_shape_expression": shape_expression_runs,
        }.get(name)
        path = rewrite_archive(base["scaled"], folder / "model.pt2", edit(marker) if edit else with_native_code)
        if name == "pt2_graph_op":
            return Case(name, [str(path), "--loss", "mean"], [], [marker])
        return Case(name, [str(path), "--loss", "mean"], [marker] if edit else [])
    if name == "torchscript":
        path = save_scripted_writer(folder / "model.pt", marker)
        return Case(name, [str(path), *inputs], [marker], [Path(f"{marker}.forward")])
    assert name == "inputs_file"
    path = folder / "inputs.pt"
    path.write_bytes(torch_save_bytes(FileTensor(marker, (6, 12))))
    return Case(name, [f"{base['models']}:build", "--inputs", str(path)], [marker], refused_even_trusted=True)


def run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_refused(exit_code: int, stdout: str, stderr: str, case: Case) -> None:
    assert exit_code == 2, (exit_code, stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("gradscope: error: ") and "Traceback" not in stderr
    assert stdout == ""
    assert not any(marker.exists() for marker in case.markers), "code ran without consent"


def remove(markers: list[Path]) -> None:
    for marker in markers:
        marker.unlink(missing_ok=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_audit_refuses_code_and_runs_it_only_with_consent(base: dict[str, Path], tmp_path: Path, name: str) -> None:
    case = make_case(name, base, tmp_path)
    refused = run("audit", *case.args, "--format", "json")
    assert_refused(refused.exit_code, refused.stdout, refused.stderr, case)
    if case.refused_even_trusted:
        assert "--trust-code does not apply" in refused.stderr
    else:
        assert "--trust-code" in refused.stderr
    trusted = run("audit", *case.args, "--format", "json", "--trust-code")
    if case.refused_even_trusted:
        assert_refused(trusted.exit_code, trusted.stdout, trusted.stderr, case)
        return
    assert trusted.exit_code in (0, 1), trusted.stderr
    assert json.loads(trusted.stdout)["schema"] == 1
    assert all(marker.exists() for marker in case.markers), "with consent the file's code runs, as before"


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_fix_refuses_code_and_runs_it_only_with_consent(base: dict[str, Path], tmp_path: Path, name: str) -> None:
    case = make_case(name, base, tmp_path)
    out = tmp_path / "fixed.pt"
    refused = run("fix", *case.args, "--out", out)
    assert_refused(refused.exit_code, refused.stdout, refused.stderr, case)
    assert not out.exists()
    trusted = run("fix", *case.args, "--out", out, "--trust-code")
    if case.refused_even_trusted:
        assert_refused(trusted.exit_code, trusted.stdout, trusted.stderr, case)
        return
    assert all(marker.exists() for marker in case.load_markers)
    if name in ("pt_module", "pt_checkpoint_arch", "legacy_pickle_arch"):  # Python models: fixed and written
        assert trusted.exit_code == 0, trusted.stderr
        first = "0.weight" if name == "pt_module" else "fc1.weight"
        saved = torch.load(out, weights_only=True)  # a checkpoint keeps its structure (epoch, nesting)
        assert first in saved.get("state_dict", saved)
    else:  # compiled models load with consent, then fix explains it needs the Python model
        assert trusted.exit_code == 2 and "fix needs the Python model" in trusted.stderr
        assert not out.exists()


def gradscope(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gradscope", *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "command"),
    [("pt_module", "audit"), ("pt2_example_inputs", "audit"), ("torchscript", "audit"), ("pt2_weights", "fix")],
)
def test_refusals_in_a_real_process(base: dict[str, Path], tmp_path: Path, name: str, command: str) -> None:
    case = make_case(name, base, tmp_path)
    out = ["--format", "json"] if command == "audit" else ["--out", tmp_path / "o.pt"]
    done = gradscope(command, *case.args, *out)
    assert_refused(done.returncode, done.stdout, done.stderr, case)
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.slow
def test_consent_in_a_real_process_runs_the_code_as_before(base: dict[str, Path], tmp_path: Path) -> None:
    case = make_case("torchscript", base, tmp_path)
    done = gradscope("audit", *case.args, "--format", "json", "--trust-pickle")  # the alias gives consent too
    assert done.returncode in (0, 1), done.stderr
    assert json.loads(done.stdout)["model"]["format"] == "torchscript"
    assert all(marker.exists() for marker in case.markers)
    remove(case.markers)
    case = make_case("pt2_graph_op", base, tmp_path / "graph")
    done = gradscope("audit", *case.args, "--format", "json", "--trust-code")
    assert done.returncode in (0, 1), done.stderr
    assert all(marker.exists() for marker in case.markers)


def test_refusals_say_what_the_code_is(base: dict[str, Path], tmp_path: Path) -> None:
    expected = {
        "pt_module": ["pickled Python object", "from_file"],
        "pt2_weights": ["weights (data/weights/weight_evil)", "from_file"],
        "pt2_constants": ["constants (data/constants/tensor_evil)", "from_file"],
        "pt2_example_inputs": ["example inputs (data/sample_inputs/model.pt)", "from_file"],
        "pt2_graph_op": ["graph uses operator aten.from_file"],
        "pt2_native_code": ["compiled native code", "data/aotinductor/"],
        "torchscript": ["TorchScript program"],
    }
    for name, words in expected.items():
        case = make_case(name, base, tmp_path / name)
        result = run("audit", *case.args)
        assert result.exit_code == 2
        for word in [*words, "--trust-code"]:
            assert word in result.stderr, (name, result.stderr)


def test_an_ordinary_export_audits_with_no_flag(base: dict[str, Path]) -> None:
    result = run("audit", base["scaled"], "--loss", "mean", "--format", "json")
    assert result.exit_code in (0, 1), result.stderr
    report = json.loads(result.stdout)
    assert report["model"]["format"] == "export"
    assert report["run"]["input_shape"] == [4, 12]  # its example inputs, read weights-only
    assert {layer["name"] for layer in report["layers"]} >= {"fc"}


# -- damaged archives, Python callables in a graph, and refusing big pickles cheaply -----------


def _damaged(base: dict[str, Path], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)

    def broken_json(records: dict[str, bytes]) -> None:
        records["models/model.json"] = records["models/model.json"][:300]

    def wrong_version(records: dict[str, bytes]) -> None:
        records["archive_version"] = b"999"

    def no_weights_config(records: dict[str, bytes]) -> None:
        del records["data/weights/model_weights_config.json"]

    def short_weight(records: dict[str, bytes]) -> None:
        records["data/weights/weight_0"] = records["data/weights/weight_0"][:7]

    edits = {"broken_json": broken_json, "wrong_version": wrong_version, "no_config": no_weights_config}
    edits["short_weight"] = short_weight
    return {name: rewrite_archive(base["scaled"], folder / f"{name}.pt2", edit) for name, edit in edits.items()}


def test_damaged_archives_give_one_line_and_no_torch_log(base: dict[str, Path], tmp_path: Path) -> None:
    words = {
        "broken_json": "damaged torch.export archive",
        "wrong_version": "version '999'",
        "no_config": "without its weights",
        "short_weight": "damaged torch.export archive",
    }
    for name, path in _damaged(base, tmp_path).items():
        for trust in ([], ["--trust-code"]):
            result = run("audit", path, *trust)
            assert result.exit_code == 2, (name, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and words[name] in lines[0] and "Traceback" not in result.stderr, (name, lines)


@pytest.mark.slow
def test_damaged_archive_in_a_real_process_prints_one_line(base: dict[str, Path], tmp_path: Path) -> None:
    # torch logs through its own stderr handler; a real process shows whether any of it escapes.
    path = _damaged(base, tmp_path)["broken_json"]
    done = gradscope("audit", path, "--format", "json")
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_graph_op_allow_list() -> None:
    import os

    from gradscope.loaders.consent import CodeRefused
    from gradscope.loaders.pt2 import check_graph_ops, disallowed_op

    aten = torch.ops.aten
    assert disallowed_op(aten.linear.default) is None and disallowed_op(aten.gelu.default) is None
    assert disallowed_op(aten.from_file.default) == "aten.from_file"
    assert disallowed_op(aten.add) is None and disallowed_op(aten.from_file) == "aten.from_file"  # packets
    assert disallowed_op(aten._print.default) == "aten._print"
    assert disallowed_op(os.system) == "system"
    assert disallowed_op("torch.serialization.os.system") is not None  # an unresolved name is refused too
    program = torch.export.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),))
    check_graph_ops(program, Path("ok.pt2"))  # an ordinary graph passes
    node = next(n for n in program.graph.nodes if n.op == "call_function")
    node.target = os.getcwd  # what "torch.serialization.os.getcwd" in an archive resolves to
    with pytest.raises(CodeRefused, match="graph uses operator getcwd"):
        check_graph_ops(program, Path("evil.pt2"))


def test_naming_a_big_pickles_imports_streams_it(tmp_path: Path) -> None:
    import pickle
    import tracemalloc

    from gradscope.loaders.pickles import SCAN_LIMIT, unsafe_globals

    path = tmp_path / "big.pkl"
    blob = b"\0" * (3 * SCAN_LIMIT)  # 48 MiB of operand after the payload's imports
    with path.open("wb") as handle:
        pickle.dump((FileTensor(tmp_path / "never", (2,)), blob), handle)
    del blob
    tracemalloc.start()
    try:
        names = unsafe_globals(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert any(name.endswith("from_file") for name in names), names
    assert peak < 2 * SCAN_LIMIT, f"peak {peak / 2**20:.0f} MiB for a {path.stat().st_size / 2**20:.0f} MiB file"
    assert not (tmp_path / "never").exists()
