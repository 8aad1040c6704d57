"""Every class of bad input the CLI refuses (issue 10, items 2 and 3), one table.

Each case runs in-process (click's CliRunner) and asserts the documented exit
code, exactly one ``gradscope: error:`` line on stderr naming the user's input,
no traceback, nothing on stdout, and that neither the output folder nor the
input files changed (no file left behind, none destroyed).  Cases that need
real file descriptors (stdout failures) are in test_cli_contract.py.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_edge_files import make_edge_files, snapshot
from click.testing import CliRunner

from gradscope.cli import cli


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    files = make_edge_files(tmp_path_factory.mktemp("bad_inputs_src"))
    # a report to re-render, written once
    report = files["models"].parent / "report.json"
    result = CliRunner().invoke(cli, ["audit", f"{files['models']}:build", "-o", str(report), "--format", "json"])
    assert result.exit_code in (0, 1), result.output
    files["report"] = report
    data = json.loads(report.read_text())
    data["layers"][0]["name"] = 5  # valid JSON, parsed, but a layer name that is not text
    data["analysis"] = {"init": 5, "depth": "x"}
    files["report_bad_types"].write_text(json.dumps(data))
    return files


@dataclass
class Env:
    src: dict[str, Path]
    out: Path

    def spec(self, name: str) -> str:
        return f"{self.src['models']}:{name}"


@dataclass
class Case:
    id: str
    args: Callable[[Env], list[object]]
    words: tuple[str, ...]  # each must appear in the error line
    setup: Callable[[Env], None] | None = None
    code: int = 2
    needs: str | None = None  # "mknod" or "readonly": skipped where the system cannot provide it


def _mknod(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null twin


def _can_mknod(tmp: Path) -> bool:
    try:
        _mknod(tmp / "probe-node")
    except (PermissionError, OSError):
        return False
    (tmp / "probe-node").unlink()
    return True


def _readonly_dir() -> Path | None:
    """A directory nobody (root included) can create files in, e.g. sysfs's root."""
    for candidate in (Path("/sys"), Path("/proc")):
        try:
            fd = os.open(candidate / ".gradscope-probe", os.O_CREAT | os.O_WRONLY, 0o600)
        except OSError:
            if candidate.is_dir():
                return candidate
            continue
        os.close(fd)
        os.unlink(candidate / ".gradscope-probe")
    return None


READONLY = _readonly_dir()


def audit(env: Env, *extra: object) -> list[object]:
    return ["audit", env.spec("build"), *extra]


def weights_audit(env: Env, *extra: object) -> list[object]:
    return ["audit", env.src["weights"], "--arch", env.spec("build"), *extra]


def fix(env: Env, *extra: object) -> list[object]:
    return ["fix", env.src["checkpoint"], "--arch", env.spec("build"), *extra]


CASES: list[Case] = [
    # -- outputs that are inputs (compared by inode, not by spelling) --------------------
    Case("output-is-model-file", lambda e: weights_audit(e, "-o", e.src["weights"]), ("--output", "model file")),
    Case("output-is-arch-file", lambda e: weights_audit(e, "-o", e.src["models"]), ("--output", "--arch file")),
    Case(
        "output-is-inputs-file",
        lambda e: audit(e, "--inputs", e.src["inputs"], "-o", e.src["inputs"]),
        ("inputs file",),
    ),
    Case("output-is-factory-file", lambda e: audit(e, "--output", e.src["models"]), ("Python file",)),
    Case(
        "output-is-model-other-spelling",
        lambda e: weights_audit(e, "-o", f"{e.src['weights'].parent}/../{e.src['weights'].parent.name}/weights.pt"),
        ("model file",),
    ),
    Case(
        "output-hard-link-to-model",
        lambda e: weights_audit(e, "-o", e.out / "hard.pt"),
        ("model file",),
        setup=lambda e: os.link(e.src["weights"], e.out / "hard.pt"),
    ),
    # -- outputs that are not regular files ------------------------------------------------
    Case(
        "output-symlink-dangling",
        lambda e: audit(e, "-o", e.out / "link.json"),
        ("symbolic link",),
        setup=lambda e: os.symlink(e.out / "nowhere.json", e.out / "link.json"),
    ),
    Case(
        "output-symlink-to-file",
        lambda e: audit(e, "-o", e.out / "link.json"),
        ("symbolic link",),
        setup=lambda e: (
            (e.out / "real.json").write_text("keep me"),
            os.symlink(e.out / "real.json", e.out / "link.json"),
        ),
    ),
    Case(
        "output-symlink-to-model",
        lambda e: weights_audit(e, "-o", e.out / "link.pt"),
        ("symbolic link",),
        setup=lambda e: os.symlink(e.src["weights"], e.out / "link.pt"),
    ),
    Case("output-fifo", lambda e: audit(e, "-o", e.out / "p"), ("FIFO",), setup=lambda e: os.mkfifo(e.out / "p")),
    Case(
        "output-device",
        lambda e: audit(e, "-o", e.out / "null"),
        ("character device",),
        setup=lambda e: _mknod(e.out / "null"),
        needs="mknod",
    ),
    Case("output-dev-null", lambda e: audit(e, "-o", "/dev/null"), ("character device", "/dev/null")),
    Case("output-directory", lambda e: audit(e, "-o", e.out), ("directory",)),
    Case("output-trailing-slash", lambda e: audit(e, "-o", f"{e.out}/new/"), ("directory",)),
    Case("output-missing-folder", lambda e: audit(e, "-o", e.out / "no" / "r.json"), ("does not exist",)),
    Case("output-under-a-file", lambda e: audit(e, "-o", e.src["inputs"] / "r.json"), ("not a directory",)),
    Case(
        "output-readonly-folder",
        lambda e: audit(e, "-o", READONLY / "gradscope-report.json"),
        ("not writable", "--output"),
        needs="readonly",
    ),
    # -- TensorBoard run directories ------------------------------------------------------------
    Case(
        "tensorboard-is-a-file",
        lambda e: audit(e, "--tensorboard", e.out / "run"),
        ("--tensorboard", "a file", "directory"),
        setup=lambda e: (e.out / "run").write_text("not a run"),
    ),
    Case("tensorboard-is-model", lambda e: weights_audit(e, "--tensorboard", e.src["weights"]), ("model file",)),
    Case(
        "tensorboard-symlink",
        lambda e: audit(e, "--tensorboard", e.out / "link"),
        ("symbolic link",),
        setup=lambda e: ((e.out / "real").mkdir(), os.symlink(e.out / "real", e.out / "link")),
    ),
    Case(
        "tensorboard-existing-run",
        lambda e: audit(e, "--tensorboard", e.out / "run"),
        ("already holds files",),
        setup=lambda e: ((e.out / "run").mkdir(), (e.out / "run" / "events.out.tfevents.1").write_bytes(b"old")),
    ),
    Case(
        "tensorboard-fifo",
        lambda e: audit(e, "--tensorboard", e.out / "p"),
        ("FIFO",),
        setup=lambda e: os.mkfifo(e.out / "p"),
    ),
    Case(
        "tensorboard-under-a-file", lambda e: audit(e, "--tensorboard", e.src["inputs"] / "run"), ("not a directory",)
    ),
    Case(
        "tensorboard-same-as-output",
        lambda e: audit(e, "-o", e.out / "x", "--tensorboard", e.out / "x"),
        ("same path",),
    ),
    Case(
        "tensorboard-readonly-folder",
        lambda e: audit(e, "--tensorboard", READONLY / "gradscope-run"),
        ("not writable", "--tensorboard"),
        needs="readonly",
    ),
    # -- fix --out -------------------------------------------------------------------------------
    Case("fix-out-is-checkpoint", lambda e: fix(e, "--out", e.src["checkpoint"]), ("--out", "model file")),
    Case("fix-out-is-arch", lambda e: fix(e, "--out", e.src["models"]), ("--out", "--arch file")),
    Case(
        "fix-out-is-factory-file",
        lambda e: ["fix", e.spec("build"), "--out", e.src["models"]],
        ("--out", "Python file"),
    ),
    Case(
        "fix-out-symlink",
        lambda e: fix(e, "--out", e.out / "l.pt"),
        ("symbolic link",),
        setup=lambda e: os.symlink(e.src["checkpoint"], e.out / "l.pt"),
    ),
    Case("fix-out-fifo", lambda e: fix(e, "--out", e.out / "p"), ("FIFO",), setup=lambda e: os.mkfifo(e.out / "p")),
    Case("fix-out-directory", lambda e: fix(e, "--out", e.out), ("directory",)),
    Case(
        "fix-out-safetensors-would-drop-keys",
        lambda e: fix(e, "--out", e.out / "fixed.safetensors", "--scheme", "kaiming"),
        ("safetensors", "epoch", ".pt"),
    ),
    Case("fix-exits-in-factory", lambda e: ["fix", e.spec("exits"), "--out", e.out / "f.pt"], ("sys.exit(3)",)),
    # -- report ------------------------------------------------------------------------------------
    Case("report-output-is-input", lambda e: ["report", e.src["report"], "-o", e.src["report"]], ("report",)),
    Case(
        "report-output-symlink",
        lambda e: ["report", e.src["report"], "-o", e.out / "l.md"],
        ("symbolic link",),
        setup=lambda e: os.symlink(e.out / "x.md", e.out / "l.md"),
    ),
    Case("report-fifo", lambda e: ["report", e.src["fifo"], "-o", e.out / "r.md"], ("FIFO",)),
    Case("report-not-json", lambda e: ["report", e.src["not_json"], "-o", e.out / "r.md"], ("not valid JSON",)),
    Case("report-json-list", lambda e: ["report", e.src["json_list"], "-o", e.out / "r.md"], ("JSON object",)),
    Case("report-schema-2", lambda e: ["report", e.src["schema2"], "-o", e.out / "r.md"], ("schema",)),
    Case(
        "report-wrong-field-types",
        lambda e: ["report", e.src["report_bad_types"], "-o", e.out / "r.md"],
        ("bad_types.json", "wrong type"),
    ),
    Case("report-missing", lambda e: ["report", e.out / "absent.json"], ("does not exist",)),
    # -- inputs that are not regular files (refused without opening: no hang) -------------------
    Case("model-fifo", lambda e: ["audit", e.src["fifo"], "-o", e.out / "r.json"], ("model file", "FIFO")),
    Case("model-directory", lambda e: ["audit", e.out, "-o", e.out / "r.json"], ("directory",)),
    Case("model-device", lambda e: ["audit", "/dev/zero", "-o", e.out / "r.json"], ("/dev/zero", "character device")),
    Case(
        "factory-file-fifo",
        lambda e: ["audit", f"{e.src['fifo_py']}:build", "-o", e.out / "r.json"],
        ("Python file", "FIFO"),
    ),
    Case(
        "arch-file-fifo",
        lambda e: ["audit", e.src["weights"], "--arch", f"{e.src['fifo_py']}:build", "-o", e.out / "r.json"],
        ("--arch file", "FIFO"),
    ),
    Case("inputs-fifo", lambda e: audit(e, "--inputs", e.src["fifo"], "-o", e.out / "r.json"), ("inputs file", "FIFO")),
    Case("model-missing", lambda e: ["audit", e.out / "absent.pt", "-o", e.out / "r.json"], ("does not exist",)),
    Case(
        "arch-missing",
        lambda e: ["audit", e.src["weights"], "--arch", f"{e.out}/absent.py:build", "-o", e.out / "r.json"],
        ("--arch file", "does not exist"),
    ),
    # -- batches and shapes ----------------------------------------------------------------------
    Case(
        "inputs-empty-tensor",
        lambda e: audit(e, "--inputs", e.src["empty_tensor"], "-o", e.out / "r.json"),
        ("empty batch", "[0, 12]"),
    ),
    Case(
        "inputs-empty-dict",
        lambda e: audit(e, "--inputs", e.src["empty_dict"], "-o", e.out / "r.json"),
        ("empty batch", "'x'"),
    ),
    Case(
        "inputs-empty-tuple",
        lambda e: audit(e, "--inputs", e.src["empty_tuple"], "-o", e.out / "r.json"),
        ("empty batch",),
    ),
    Case(
        "shape-too-big-for-memory",
        lambda e: audit(e, "--input-shape", "100000,100000,1000", "-o", e.out / "r.json"),
        ("--input-shape 100000,100000,1000", "TiB", "available"),
    ),
    Case(
        "shape-too-big-int64",
        lambda e: [
            "audit",
            e.spec("build"),
            "--input-shape",
            "4000000,4000000",
            "--input-dtype",
            "int64",
            "--vocab",
            "5",
        ],
        ("int64", "TiB"),
    ),
    Case(
        "shape-beyond-tensor-limit",
        lambda e: audit(e, "--input-shape", "99999999999,99999999999,99999999999", "-o", e.out / "r.json"),
        ("more than a tensor can hold",),
    ),
    Case("shape-zero", lambda e: audit(e, "--input-shape", "0,12", "-o", e.out / "r.json"), ("0,12", "positive")),
    Case("shape-negative", lambda e: audit(e, "--input-shape", "4,-12", "-o", e.out / "r.json"), ("4,-12",)),
    Case("shape-not-numbers", lambda e: audit(e, "--input-shape", "4,abc", "-o", e.out / "r.json"), ("4,abc",)),
    Case(
        "shape-and-inputs",
        lambda e: audit(e, "--input-shape", "4,12", "--inputs", e.src["inputs"], "-o", e.out / "r.json"),
        ("either --inputs or --input-shape",),
    ),
    Case("unknown-format", lambda e: audit(e, "--formats", "fp13", "-o", e.out / "r.json"), ("fp13",)),
    # -- model code that calls sys.exit ---------------------------------------------------------------
    Case("factory-sys-exit", lambda e: ["audit", e.spec("exits"), "-o", e.out / "r.json"], ("sys.exit(3)", "exits")),
    Case("factory-exit-builtin", lambda e: ["audit", e.spec("exits_builtin"), "-o", e.out / "r.json"], ("sys.exit()",)),
    Case(
        "forward-sys-exit-0",
        lambda e: ["audit", e.spec("exits_in_forward"), "--input-shape", "4,12", "-o", e.out / "r.json"],
        ("sys.exit(0)",),
    ),
    Case(
        "forward-system-exit-message",
        lambda e: ["audit", e.spec("exit_message_in_forward"), "--input-shape", "4,12", "-o", e.out / "r.json"],
        ("bye from forward",),
    ),
    Case(
        "module-exits-on-import",
        lambda e: ["audit", f"{e.src['exits_on_import']}:build", "-o", e.out / "r.json"],
        ("exits_on_import.py", "SystemExit"),
    ),
    Case(
        "forward-error-with-escapes",
        lambda e: ["audit", e.spec("escaping_error"), "--input-shape", "4,12", "-o", e.out / "r.json"],
        ("bad red", "link"),
    ),
    # -- usage errors: one line, not click's three --------------------------------------------------------
    Case("usage-unknown-option", lambda e: audit(e, "--no-such-option"), ("--no-such-option", "audit --help")),
    Case("usage-missing-model", lambda e: ["audit"], ("MODEL",)),
    Case("usage-bad-choice", lambda e: audit(e, "--format", "yaml"), ("yaml",)),
    Case("usage-batches-zero", lambda e: audit(e, "--batches", "0"), ("--batches",)),
    Case("usage-width-too-small", lambda e: audit(e, "--width", "10"), ("--width",)),
    Case("usage-unknown-command", lambda e: ["audti"], ("audti",)),
    Case("usage-fix-without-out", lambda e: ["fix", e.spec("build")], ("--out",)),
    Case("usage-seed-not-int", lambda e: audit(e, "--seed", "x"), ("--seed",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(case: Case, src: dict[str, Path], tmp_path: Path) -> None:
    if case.needs == "mknod" and not _can_mknod(tmp_path):
        pytest.skip("creating a device node needs CAP_MKNOD")
    if case.needs == "readonly" and READONLY is None:
        pytest.skip("no read-only directory on this system")
    env = Env(src, tmp_path / "out")
    env.out.mkdir()
    if case.setup is not None:
        case.setup(env)
    before_out, before_src = snapshot(env.out), snapshot(src["models"].parent)
    result = CliRunner().invoke(cli, [str(a) for a in case.args(env)])
    assert result.exit_code == case.code, (result.exit_code, result.stderr, result.stdout)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradscope: error: "), result.stderr
    for word in case.words:
        assert word in lines[0], (word, lines[0])
    assert "internal error" not in lines[0]
    assert "\x1b" not in lines[0]
    assert result.stdout == ""
    assert snapshot(env.out) == before_out  # nothing left behind, nothing replaced
    assert snapshot(src["models"].parent) == before_src  # no input destroyed


def test_there_are_at_least_sixty_classes() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 60
