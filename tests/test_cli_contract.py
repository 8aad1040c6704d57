"""The CLI contract at its edges (issue 10, item 3), where file descriptors matter.

Model code cannot reach stdout (fd 1 points at stderr while it runs), stdout
failures (EPIPE, ENOSPC, closed, an encoding without the report's characters)
are one line and exit 2, torch's logged tracebacks stay hidden unless --debug,
usage errors are one line, and strings from model code or a foreign report
reach no terminal with their escape sequences.  Library-level guards (empty
batch, memory estimate) are tested here too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from cli_edge_files import child_env, gradscope_process, make_edge_files, one_error_line
from click.testing import CliRunner
from torch import nn

from gradscope.cli import cli
from gradscope.errors import InputError
from gradscope.render.sanitize import clean_text, clean_tree, escape_json_controls


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_edge_files(tmp_path_factory.mktemp("contract_src"))


def spec(src: dict[str, Path], name: str) -> str:
    return f"{src['models']}:{name}"


# -- fd 1 belongs to the report ------------------------------------------------------------------


@pytest.mark.slow
def test_model_code_cannot_write_to_stdout(src: dict[str, Path]) -> None:
    done = gradscope_process("audit", spec(src, "writes_fd1"), "--input-shape", "4,12", "--format", "json")
    assert done.returncode in (0, 1), done.stderr
    report = json.loads(done.stdout)  # exactly one document: raises on anything else
    assert report["schema"] == 1
    for marker in ("FACTORY-PRINT", "FACTORY-FD1", "RAW-FD1", "DUNDER-STDOUT", "PRINTED", "CHILD-PROCESS"):
        assert marker in done.stderr, marker
        assert marker not in done.stdout


@pytest.mark.slow
def test_sys_exit_in_a_real_process_is_exit_2(src: dict[str, Path]) -> None:
    for name, called in (("exits", "sys.exit(3)"), ("exits_builtin", "sys.exit()")):
        done = gradscope_process("audit", spec(src, name), "--format", "json")
        assert done.returncode == 2 and done.stdout == ""
        assert called in one_error_line(done.stderr)


# -- stdout that cannot take the report ---------------------------------------------------------------


@pytest.mark.slow
def test_stdout_full_device(src: dict[str, Path]) -> None:
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "gradscope", "audit", spec(src, "build"), "--format", "json"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=180,
        )
    assert done.returncode == 2
    assert "No space left on device" in one_error_line(done.stderr)


@pytest.mark.slow
def test_stdout_closed(src: dict[str, Path]) -> None:
    done = subprocess.run(
        ["sh", "-c", 'exec "$0" -m gradscope audit "$1" --format json >&-', sys.executable, spec(src, "build")],
        stdout=None,
        stderr=subprocess.PIPE,
        text=True,
        timeout=180,
    )
    assert done.returncode == 2
    assert "stdout is closed" in one_error_line(done.stderr)


@pytest.mark.slow
def test_stdout_reader_gone(src: dict[str, Path], tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "gradscope", "audit", spec(src, "build"), "--format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # the reader is gone before a byte is written: EPIPE
    stderr = child.stderr.read()
    assert child.wait(timeout=180) == 2
    assert "broken pipe" in one_error_line(stderr)


@pytest.mark.slow
def test_stdout_encoding_without_the_reports_characters(src: dict[str, Path]) -> None:
    done = gradscope_process("audit", spec(src, "build"), env=child_env(PYTHONIOENCODING="ascii"))
    assert done.returncode == 2 and done.stdout == ""
    line = one_error_line(done.stderr)
    assert "'ascii'" in line and "PYTHONIOENCODING=utf-8" in line


@pytest.mark.slow
def test_c_locale_still_writes_the_report(src: dict[str, Path]) -> None:
    """Python's UTF-8 mode takes over in the C locale (PEP 538/540): the report is written, not lost."""
    env = child_env(LC_ALL="C", LANG="C")
    env.pop("PYTHONIOENCODING", None)
    done = gradscope_process("audit", spec(src, "build"), "--width", "100", env=env)
    assert done.returncode in (0, 1), done.stderr
    assert "∂ℓ/∂h" in done.stdout and done.stderr == ""


# -- torch's logging and usage errors ---------------------------------------------------------------


def _damaged_export(src: dict[str, Path], folder: Path) -> Path:
    """A .pt2 archive without its ``.data/version`` record: torch.export.load logs a traceback."""
    good = folder / "good.pt2"
    program = torch.export.export(nn.Sequential(nn.Linear(12, 5)), (torch.randn(4, 12),))
    torch.export.save(program, str(good))
    bad = folder / "bad.pt2"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for name in zin.namelist():
            if not name.endswith(".data/version"):
                zout.writestr(name, zin.read(name))
    return bad


@pytest.mark.slow
def test_torch_logging_is_captured_and_shown_with_debug(src: dict[str, Path], tmp_path: Path) -> None:
    quiet = gradscope_process("audit", spec(src, "logs_torch_traceback"), "--format", "json")
    assert quiet.returncode in (0, 1), quiet.stderr
    assert quiet.stderr == "" and json.loads(quiet.stdout)["schema"] == 1
    loud = gradscope_process("--debug", "audit", spec(src, "logs_torch_traceback"), "--format", "json")
    assert "Ran into the following error" in loud.stderr and "another torch log line" in loud.stderr
    damaged = gradscope_process("audit", _damaged_export(src, tmp_path), "--format", "json")
    assert damaged.returncode == 2 and damaged.stdout == ""
    assert "bad.pt2" in one_error_line(damaged.stderr)


@pytest.mark.slow
def test_usage_error_is_one_line_in_a_real_process() -> None:
    done = gradscope_process("audit", "--no-such-option")
    assert done.returncode == 2 and done.stdout == ""
    line = one_error_line(done.stderr)
    assert "--no-such-option" in line and "gradscope audit --help" in line


# -- control characters never reach a terminal ----------------------------------------------------------

HOSTILE = "fc\x1b[2J\x1b]0;pwned\x07\u202e\x9b31m\rX\x08"


def test_clean_text_removes_sequences_and_controls() -> None:
    assert clean_text(HOSTILE) == "fcX"
    assert clean_text("plain ∂ℓ/∂h text\twith tab\nand newline") == "plain ∂ℓ/∂h text\twith tab\nand newline"
    assert clean_text("\x1bc reset \x1bP dcs \x1b\\ end") == " reset  end"


def test_json_escape_is_lossless() -> None:
    document = json.dumps({"name": HOSTILE}, ensure_ascii=False)
    escaped = escape_json_controls(document)
    assert json.loads(escaped) == {"name": HOSTILE}
    assert all(ch not in escaped for ch in "\x1b\x07\u202e\x9b\r\x08")


def test_clean_tree_copies_only_what_changes() -> None:
    from gradscope.record import Record
    from gradscope.report import Finding, Report, Severity

    report = Report(Record(), model={"source": "x"}, findings=[Finding("c", Severity.ERROR, ["a\x1b[1mb"], "m")])
    cleaned = clean_tree(report)
    assert cleaned.findings[0].layers == ["ab"] and cleaned.findings[0].severity is Severity.ERROR
    assert report.findings[0].layers == ["a\x1b[1mb"]  # the original is not changed
    assert cleaned.model is report.model  # nothing to clean there: shared, not copied
    plain = Report(Record(), model={"source": "x"})
    assert clean_tree(plain) is plain


@pytest.mark.parametrize("fmt", ["table", "markdown", "json"])
def test_layer_names_from_model_code_are_rendered_safely(src: dict[str, Path], fmt: str) -> None:
    result = CliRunner().invoke(cli, ["audit", spec(src, "escapes"), "--input-shape", "4,12", "--format", fmt])
    assert result.exit_code in (0, 1), result.stderr
    for ch in "\x1b\x07\u202e":
        assert ch not in result.stdout
    if fmt == "json":  # the data itself is kept, escaped
        names = [layer["name"] for layer in json.loads(result.stdout)["layers"]]
        assert "fc\x1b[2J\x1b]0;pwned\x07\u202e" in names
    else:
        assert "fc" in result.stdout and "pwned" not in result.stdout


@pytest.mark.parametrize("fmt", ["table", "markdown", "json"])
def test_a_foreign_report_json_is_rendered_safely(src: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    made = CliRunner().invoke(cli, ["audit", spec(src, "build"), "--format", "json"])
    data = json.loads(made.stdout)
    data["model"]["source"] = "evil\x1b]52;c;aGk=\x07.pt"
    data["notes"] = ["note\x1b[31m red"]
    data["findings"] = [
        {
            "code": "vanishing-gradient\x1b[5m",
            "severity": "error",
            "layers": ["fc1\u202e"],
            "message": "msg\x9b2J",
            "evidence": {"k\x1b[1m": "v\x1b[0m"},
            "fix": {"summary": "fix\rX", "code": "x = 1\x1b[8m"},
        }
    ]
    (tmp_path / "foreign.json").write_text(json.dumps(data))
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "foreign.json"), "--format", fmt])
    assert result.exit_code == 1, result.stderr  # the error finding still counts
    for ch in "\x1b\x07\u202e\x9b\r":
        assert ch not in result.stdout
    if fmt != "json":  # the text around the sequences stays
        assert "evil.pt" in result.stdout and "note red" in result.stdout and "fixX" in result.stdout


def test_fix_summary_is_sanitised(src: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["fix", spec(src, "escapes"), "--input-shape", "4,12", "--scheme", "xavier",
                                      "--out", str(tmp_path / "o.pt")])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "\x1b" not in result.stdout and "\u202e" not in result.stdout and "fc" in result.stdout


# -- library guards -------------------------------------------------------------------------------------


def test_empty_batch_is_an_input_error_in_the_library() -> None:
    import gradscope

    model = nn.Sequential(nn.Linear(12, 5))
    for batch in (torch.zeros(0, 12), (torch.zeros(0, 12),), {"input": torch.zeros(0, 12)}):
        with pytest.raises(InputError, match="empty batch"):
            gradscope.audit(model, batch)


def test_input_memory_is_estimated_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradscope.inputs as inputs

    # float32: 4 bytes for the input + 4 for the working copy of its statistics
    assert inputs.input_bytes_lower_bound((32, 784)) == 32 * 784 * 8
    assert inputs.input_bytes_lower_bound((4, 16), "int64") == 4 * 16 * 12
    monkeypatch.setattr(inputs, "available_memory", lambda: 10 * 2**20)  # 10 MiB left
    inputs.check_input_memory((32, 784))  # 196 KiB: fine
    with pytest.raises(InputError, match=r"needs at least 16\.0 MiB .* 10\.0 MiB"):
        inputs.check_input_memory((2048, 1024))
    with pytest.raises(InputError, match="more than the"):
        import gradscope

        gradscope.audit(nn.Sequential(nn.Linear(1024, 2)), input_shape=(2048, 1024))


def test_available_memory_is_plausible() -> None:
    from gradscope.inputs import available_memory

    available = available_memory()
    assert available is not None and 2**20 < available < 2**50


def test_standard_stream_closed_at_start_gets_dev_null(src: dict[str, Path]) -> None:
    """With fd 1 closed at start, the first file opened would become "stdout"; /dev/null takes its place."""
    code = (
        "import os, sys\n"
        "from gradscope.cli.stdout import standard_streams_open\n"
        "standard_streams_open()\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        "os.write(2, str(fd).encode())\n"
    )
    done = subprocess.run(
        ["sh", "-c", 'exec "$0" -c "$1" "$2" >&-', sys.executable, code, str(src["weights"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stderr) > 2
    assert os.path.exists(src["weights"])


def test_help_and_version_to_a_stdout_that_cannot_take_them() -> None:
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "gradscope", "--help"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=60
        )
    assert done.returncode == 2 and "No space left on device" in one_error_line(done.stderr)
    closed = subprocess.run(
        ["sh", "-c", 'exec "$0" -m gradscope --version >&-', sys.executable],
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )
    assert closed.returncode == 2 and "stdout is closed" in one_error_line(closed.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], ["audit", "--help"], ["--version"]])
def test_help_and_version_to_a_reader_that_has_gone(args: list[str]) -> None:
    """click itself exits 1 in silence when --help meets EPIPE; gradscope keeps its contract."""
    child = subprocess.Popen(
        [sys.executable, "-m", "gradscope", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # the reader is gone before a byte is written: EPIPE
    stderr = child.stderr.read()
    assert child.wait(timeout=120) == 2
    assert "broken pipe" in one_error_line(stderr)
