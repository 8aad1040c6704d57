"""The ``gradscope`` command driven in-process with click's CliRunner.

Every MODEL form, the output options, the exit codes, and every bad input of
issue 4 (one line on stderr starting ``gradscope: error:``, exit 2, no
traceback, no partial output file).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from test_cli_models import canaries, load_models_module, make_model_files

from gradscope.cli import cli
from gradscope.cli.app import exit_code
from gradscope.record import Record
from gradscope.report import Finding, Report, Severity
from gradscope.version import version


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_model_files(tmp_path_factory.mktemp("cli"))


def run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def spec(files: dict[str, Path], name: str) -> str:
    return f"{files['models']}:{name}"


def assert_one_line_error(result: Result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradscope: error: "), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]
    assert result.stdout == ""


# -- every MODEL form -------------------------------------------------------------

FORMS = [
    ("factory", [], "factory", "factory call"),
    ("torchscript", ["--trust-code"], "torchscript", "torch.jit.load"),
    ("export", [], "export", "gradscope's weights-only .pt2 reader + torch.export.unflatten"),
    ("state_dict", ["--arch", "ARCH"], "state_dict", "torch.load(weights_only=True) + load_state_dict"),
    ("checkpoint", ["--arch", "ARCH"], "state_dict", "torch.load(weights_only=True) + load_state_dict"),
    ("safetensors", ["--arch", "ARCH"], "safetensors", "safetensors.torch.load_file + load_state_dict"),
    ("pickle", ["--trust-pickle"], "pickle", "torch.load(weights_only=False)"),
]


@pytest.mark.parametrize(("form", "extra", "fmt", "loader"), FORMS, ids=[f[0] for f in FORMS])
def test_audit_every_model_form(files: dict[str, Path], form: str, extra: list[str], fmt: str, loader: str) -> None:
    model = spec(files, "build") if form == "factory" else files[form]
    extra = [spec(files, "build") if e == "ARCH" else e for e in extra]
    result = run("audit", model, *extra, "--inputs", files["inputs"], "--loss", "mean", "--format", "json")
    assert result.exit_code in (0, 1), result.stderr
    report = json.loads(result.stdout)
    assert report["schema"] == 1
    assert report["model"]["format"] == fmt and report["model"]["loader"] == loader
    assert report["model"]["source"] == str(model)
    assert report["model"]["parameters"] == 12 * 16 + 16 + 16 * 5 + 5
    assert report["run"]["input_shape"] == [6, 12]
    grads = [layer for layer in report["layers"] if layer["weight_grad"] is not None]
    assert len(grads) == 2  # both Linear layers, whatever the format


def test_package_module_factory(files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "cli_test_pkg_a1"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text("from torch import nn\ndef make():\n    return nn.Sequential(nn.Linear(6, 4))\n")
    monkeypatch.chdir(tmp_path)  # a local package, found as under `python -m`
    result = run("audit", "cli_test_pkg_a1.nets:make", "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"]["format"] == "factory" and report["run"]["input_shape"] == [32, 6]
    result = run("audit", "torch.nn:Identity", "--input-shape", "4,3", "--format", "json")
    assert_one_line_error(result, "no parameters")
    result = run("audit", "gradscope.examples_missing:build")
    assert_one_line_error(result, "cannot find Python module 'gradscope.examples_missing'")


def test_factory_attribute_that_is_a_module(files: dict[str, Path]) -> None:
    result = run("audit", spec(files, "instance"), "--format", "json")
    assert result.exit_code in (0, 1) and json.loads(result.stdout)["model"]["type"] == "MLP"


# -- inputs ---------------------------------------------------------------------------


def test_shape_inferred_from_first_linear(files: dict[str, Path]) -> None:
    report = json.loads(run("audit", spec(files, "build"), "--format", "json").stdout)
    assert report["run"]["input_shape"] == [32, 12] and report["run"]["input_dtype"] == "float32"
    assert report["run"]["input_inferred_from"] == "fc1 (Linear)"


def test_embedding_gives_int64_ids_and_vocab(files: dict[str, Path]) -> None:
    report = json.loads(run("audit", spec(files, "embed"), "--format", "json").stdout)
    assert report["run"]["input_dtype"] == "int64" and report["run"]["vocab"] == 50
    report = json.loads(
        run(
            "audit",
            spec(files, "embed"),
            "--input-shape",
            "4,7",
            "--input-dtype",
            "int64",
            "--vocab",
            "20",
            "--format",
            "json",
        ).stdout
    )
    assert report["run"]["input_shape"] == [4, 7] and report["run"]["vocab"] == 20


def test_ambiguous_shape_names_the_flag(files: dict[str, Path]) -> None:
    assert_one_line_error(run("audit", spec(files, "conv")), "--input-shape", "0 (Conv2d)")
    result = run("audit", spec(files, "conv"), "--input-shape", "2,3,8,8", "--format", "json")
    assert result.exit_code in (0, 1) and json.loads(result.stdout)["run"]["input_shape"] == [2, 3, 8, 8]


def test_run_options_reach_the_report(files: dict[str, Path]) -> None:
    result = run(
        "audit",
        spec(files, "build"),
        "--input-shape",
        "8,12",
        "--batches",
        "3",
        "--loss",
        "mse",
        "--seed",
        "7",
        "--formats",
        "fp16,bf16",
        "--mode",
        "eval",
        "--format",
        "json",
    )
    report = json.loads(result.stdout)
    assert {k: report["run"][k] for k in ("batches", "loss", "seed", "formats", "mode")} == {
        "batches": 3,
        "loss": "mse",
        "seed": 7,
        "formats": ["fp16", "bf16"],
        "mode": "eval",
    }
    fc1 = next(layer for layer in report["layers"] if layer["name"] == "fc1")
    assert fc1["activation"]["count"] == 3 * 8 * 16  # three batches of 8 rows, 16 features
    assert "bf16_overflow_frac" in fc1["activation"]


def test_inputs_file_dict_and_tuple(files: dict[str, Path], tmp_path: Path) -> None:
    torch.save({"x": torch.randn(5, 12)}, tmp_path / "kw.pt")
    report = json.loads(run("audit", spec(files, "build"), "--inputs", tmp_path / "kw.pt", "--format", "json").stdout)
    assert report["run"]["inputs"] == "given" and report["run"]["input_shape"] == [5, 12]
    torch.save((torch.randn(3, 12),), tmp_path / "args.pt")
    report = json.loads(run("audit", spec(files, "build"), "--inputs", tmp_path / "args.pt", "--format", "json").stdout)
    assert report["run"]["input_shape"] == [3, 12]


# -- output -----------------------------------------------------------------------------


def test_table_and_markdown_render(files: dict[str, Path]) -> None:
    table = run("audit", spec(files, "build"), "--width", "100")
    assert table.exit_code == 0 and "fc1" in table.stdout and "Linear" in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) <= 100
    assert "\x1b[" not in table.stdout  # no colour when stdout is not a terminal
    markdown = run("audit", spec(files, "build"), "--format", "markdown")
    assert markdown.exit_code == 0 and markdown.stdout.startswith("## gradscope")


def test_output_file_is_written_and_stdout_stays_empty(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = run("audit", spec(files, "build"), "--format", "json", "--output", out)
    assert result.exit_code == 0 and result.stdout == ""
    assert json.loads(out.read_text())["model"]["format"] == "factory"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary left behind


@pytest.mark.parametrize("bad", ["missing", "boom", "noparams"])
def test_errors_never_leave_a_partial_output(files: dict[str, Path], tmp_path: Path, bad: str) -> None:
    out = tmp_path / "report.json"
    result = run("audit", spec(files, bad), "--format", "json", "--output", out)
    assert result.exit_code == 2 and not out.exists()
    out.write_text("previous")
    run("audit", spec(files, bad), "--format", "json", "--output", out)
    assert out.read_text() == "previous" and len(list(tmp_path.iterdir())) == 1


def test_output_into_a_missing_directory_is_an_error(files: dict[str, Path], tmp_path: Path) -> None:
    assert_one_line_error(run("audit", spec(files, "build"), "-o", tmp_path / "nope" / "r.json"), "does not exist")


def test_tensorboard_run_is_written(files: dict[str, Path], tmp_path: Path) -> None:
    logdir = tmp_path / "tb"
    result = run("audit", spec(files, "build"), "--tensorboard", logdir, "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert any(p.name.startswith("events.out.tfevents") for p in logdir.rglob("*"))


def _report(*severities: str) -> Report:
    findings = [Finding("poor-init", Severity(s), ["fc1"], "m") for s in severities]
    return Report(record=Record(), findings=findings)


@pytest.mark.parametrize(
    ("severities", "fail_on", "code"),
    [
        ((), "error", 0),
        (("info",), "warning", 0),
        (("warning",), "error", 0),
        (("warning",), "warning", 1),
        (("error",), "error", 1),
        (("error", "info"), "warning", 1),
        (("error",), "never", 0),
    ],
)
def test_exit_code_follows_fail_on(severities: tuple[str, ...], fail_on: str, code: int) -> None:
    assert exit_code(_report(*severities), fail_on) == code


def test_nan_weights_are_a_finding_not_a_tool_error(files: dict[str, Path]) -> None:
    result = run("audit", spec(files, "build_nan"), "--format", "json")
    report = json.loads(result.stdout)
    fc1 = next(layer for layer in report["layers"] if layer["name"] == "fc1")
    assert fc1["weight"]["nonfinite_count"] == 1
    assert "nonfinite" in {f["code"] for f in report["findings"]}
    assert result.exit_code == 1
    assert run("audit", spec(files, "build_nan"), "--fail-on", "never", "--format", "json").exit_code == 0


# -- bad input: one line, exit 2 -----------------------------------------------------------


def test_bad_model_files(files: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty.pt"
    empty.touch()
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(files["torchscript"].read_bytes()[:1000])
    assert_one_line_error(run("audit", tmp_path / "absent.pt"), "does not exist")
    assert_one_line_error(run("audit", tmp_path), "is a directory")
    assert_one_line_error(run("audit", empty), "is empty")
    assert_one_line_error(run("audit", truncated), "truncated")


def test_state_dict_errors(files: dict[str, Path]) -> None:
    assert_one_line_error(run("audit", files["state_dict"]), "--arch")
    assert_one_line_error(
        run("audit", files["state_dict"], "--arch", spec(files, "build_other")),
        "missing keys: 0.weight",
        "unexpected keys: fc1.weight",
    )


def test_model_errors(files: dict[str, Path]) -> None:
    assert_one_line_error(run("audit", spec(files, "build"), "--input-shape", "8,7"), "fc1 (Linear)", "8x7")
    assert_one_line_error(run("audit", spec(files, "boom")), "forward raised", "kaboom")
    assert_one_line_error(run("audit", spec(files, "noparams")), "no parameters")
    assert_one_line_error(run("audit", spec(files, "missing")), "has no attribute 'missing'")
    assert_one_line_error(run("audit", spec(files, "notmodule")), "not an nn.Module")
    assert_one_line_error(run("audit", spec(files, "build"), "--formats", "fp17"), "fp17")
    assert_one_line_error(run("audit", spec(files, "build"), "--input-shape", "8,a"), "input shape")


def test_pickles_refused_without_trust(files: dict[str, Path]) -> None:
    for name in ("evil_pickle", "evil_zip", "pickle"):
        assert_one_line_error(run("audit", files[name]), "pickled Python object", "--trust-code")
    assert not any(path.exists() for path in canaries(files["models"].parent))


def test_debug_shows_the_traceback(files: dict[str, Path]) -> None:
    result = run("audit", spec(files, "boom"), "--debug")
    assert result.exit_code == 2 and "Traceback" in result.stderr and "kaboom" in result.stderr
    result = run("--debug", "audit", spec(files, "boom"))
    assert result.exit_code == 2 and "Traceback" in result.stderr


# -- other commands ---------------------------------------------------------------------


def test_help_and_version() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for command in ("audit", "fix", "report", "demo"):
        assert command in result.stdout
    audit_help = run("audit", "--help").stdout
    for word in ("--arch", "--trust-code", "--trust-pickle", "--input-shape", "--fail-on", "torch.export"):
        assert word in audit_help
    assert run("--version").stdout.strip() == f"gradscope {version()}"


def test_dashboard_is_registered_when_present() -> None:
    import importlib.util

    listed = "dashboard" in run("--help").stdout
    assert listed == (importlib.util.find_spec("gradscope.cli.dashboard") is not None)


def test_report_rerenders_a_saved_report(files: dict[str, Path], tmp_path: Path) -> None:
    saved = tmp_path / "r.json"
    assert run("audit", spec(files, "build"), "--format", "json", "-o", saved).exit_code == 0
    again = run("report", saved, "--format", "json")
    assert again.exit_code == 0
    original, rerendered = json.loads(saved.read_text()), json.loads(again.stdout)
    assert rerendered["layers"] == original["layers"] and rerendered["findings"] == original["findings"]
    assert rerendered["model"] == original["model"]
    table = run("report", saved)
    assert table.exit_code == 0 and "fc1" in table.stdout
    (tmp_path / "bad.json").write_text("{not json")
    assert_one_line_error(run("report", tmp_path / "bad.json"), "not valid JSON")
    (tmp_path / "old.json").write_text(json.dumps({"schema": 99}))
    assert_one_line_error(run("report", tmp_path / "old.json"), "schema")
    assert_one_line_error(run("report", tmp_path / "none.json"), "does not exist")


def test_fix_writes_a_kaiming_state_dict(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fixed.pt"
    result = run("fix", spec(files, "build"), "--scheme", "kaiming", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert "before:" in result.stdout and "after:" in result.stdout and "fc1" in result.stdout
    state = torch.load(out, weights_only=True)
    original = load_models_module(files["models"].parent).build().state_dict()
    assert set(state) == set(original)
    # He et al. 2015: std = sqrt(2 / fan_in); fc1 has fan_in 12 and 192 weights, so the
    # sample std is within ~3 standard errors (1/sqrt(2*192) ~ 5%) of it.
    for name, fan_in in (("fc1.weight", 12), ("fc2.weight", 16)):
        assert math.isclose(float(state[name].std()), math.sqrt(2 / fan_in), rel_tol=0.2)
    # the written file audits as the --arch weights of the same model
    check = run("audit", out, "--arch", spec(files, "build"), "--format", "json")
    assert check.exit_code in (0, 1) and json.loads(check.stdout)["model"]["format"] == "state_dict"


def test_fix_writes_safetensors(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fixed.safetensors"
    assert run("fix", spec(files, "build"), "--scheme", "xavier", "--out", out).exit_code == 0
    from safetensors.torch import load_file

    weight = load_file(str(out))["fc1.weight"]
    assert math.isclose(float(weight.std()), math.sqrt(2 / (12 + 16)), rel_tol=0.2)  # Glorot & Bengio 2010


def test_fix_refuses_torchscript(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fixed.pt"
    assert_one_line_error(run("fix", files["torchscript"], "--out", out), "TorchScript program", "--trust-code")
    trusted = run("fix", files["torchscript"], "--trust-code", "--out", out)
    assert_one_line_error(trusted, "fix needs the Python model")
    assert not out.exists()


def test_demo_list_and_unknown_name() -> None:
    from gradscope.examples import EXAMPLES

    listing = run("demo", "--list")
    assert listing.exit_code == 0 and all(name in listing.stdout for name in EXAMPLES)
    assert_one_line_error(run("demo", "no-such-example"), "unknown example")


def test_demo_exit_code_is_the_examples_own() -> None:
    from gradscope.examples import run_demo

    result = run("demo", "vanishing", "--width", "100")
    assert result.exit_code == run_demo("vanishing", write=lambda *_: None)
    assert "vanishing" in result.stdout and result.stderr == ""
