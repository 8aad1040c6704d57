"""Field defects of the command line and its model files, each tested as a class.

1. ``fix`` writes the weights back to the checkpoint entry the audit loaded
   (CHECKPOINT_KEYS order), never to another copy of the same weights.
2. ``fix --seed`` makes the written weights reproducible.
3. The format is read from the content: torch.load is given an open handle,
   never a name it would dispatch on (``*.safetensors``).
4. A file the restricted unpickler cannot parse and that imports nothing is
   "damaged or not a torch.save file", not code.
5. TensorBoard's writer thread does not print the traceback of an error the
   command already reports in one line.
6. ``dashboard`` failures (including TensorBoard's ``sys.exit``) are one line,
   exit 2; an empty LOGDIR gets a note.
7. ``report -`` reads a bounded amount; its MemoryError line fits the command.
8. Options that do not apply are usage errors, not silently ignored.
9. ``-o`` inside the ``--tensorboard`` run directory is refused before any work.

Most cases run in-process (click's CliRunner); each asserts the exit code and
the single ``gradscope: error:`` line the contract promises.
"""

from __future__ import annotations

import errno
import io
import json
import math
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_edge_files import gradscope_process, make_edge_files, one_error_line, snapshot
from click.testing import CliRunner, Result
from hostile_files import FileTensor, export_scaled, pickled_module, torch_save_bytes
from torch import nn

from gradscope.cli import cli

WIDE = (
    "from torch import nn\n\ndef build():\n"
    "    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))\n"
)
# ids inferred from the Embedding: (batch, 16) int64 (gradscope.inputs.infer_input)
EMBED = (
    "from torch import nn\n\ndef build():\n"
    "    return nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(128, 3))\n"
)


def run(*args: object, **kwargs: Any) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def error_line(result: Result) -> str:
    """The one error line of a failed command (exit 2, nothing on stdout)."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    return one_error_line(result.stderr)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    files = make_edge_files(tmp_path_factory.mktemp("field_src"))
    folder = files["models"].parent
    files["wide"] = folder / "wide.py"
    files["wide"].write_text(WIDE)
    files["embed"] = folder / "embed.py"
    files["embed"].write_text(EMBED)
    return files


@pytest.fixture(scope="module")
def with_pt2(src: dict[str, Path]) -> dict[str, Path]:
    """``src`` plus a torch.export archive with float32 example inputs (exporting takes seconds: made once)."""
    if "pt2" not in src:
        src["pt2"] = export_scaled(src["models"].parent / "scaled.pt2")
    return src


def wide_model(std: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        for layer in model[::2]:
            layer.weight.normal_(0, std)  # a poor init the fix changes
    return model


# -- 1. fix writes the entry the audit loaded --------------------------------------------


def _ema_and_model() -> tuple[dict[str, Any], tuple[str, ...]]:
    """{"ema", "model", "epoch"}: the loader takes "model" (CHECKPOINT_KEYS), the EMA copy comes first."""
    return {"ema": wide_model(0.05, 1).state_dict(), "model": wide_model(0.01, 0).state_dict(), "epoch": 3}, ("model",)


def _teacher_and_lightning() -> tuple[dict[str, Any], tuple[str, ...]]:
    """{"teacher", "state_dict": {"model.*"}}: Lightning's prefix, and a full copy under another name first."""
    student = {f"model.{k}": v for k, v in wide_model(0.01, 0).state_dict().items()}
    return {"teacher": wide_model(0.05, 1).state_dict(), "state_dict": student, "epoch": 3}, ("state_dict",)


def _two_known_keys() -> tuple[dict[str, Any], tuple[str, ...]]:
    """Both "model" and "model_state_dict": the loader's order (model_state_dict first) decides, not dict order."""
    first, second = wide_model(0.05, 1).state_dict(), wide_model(0.01, 0).state_dict()
    return {"model": first, "model_state_dict": second, "step": 10}, ("model_state_dict",)


@pytest.mark.parametrize("make", [_ema_and_model, _teacher_and_lightning, _two_known_keys])
def test_fix_writes_the_checkpoint_entry_the_audit_loaded(src: dict[str, Path], tmp_path: Path, make: Any) -> None:
    checkpoint, loaded_at = make()
    model_file, out = tmp_path / "ckpt.pt", tmp_path / "fixed.pt"
    torch.save(checkpoint, model_file)
    before = torch.load(model_file, weights_only=True)
    audit = run("audit", model_file, "--arch", f"{src['wide']}:build", "--input-shape", "8,64", "--format", "json")
    notes = " ".join(json.loads(audit.stdout)["notes"])
    assert f"weights read from checkpoint['{loaded_at[0]}']" in notes  # where the audit's weights came from
    args = ["fix", model_file, "--arch", f"{src['wide']}:build", "--input-shape", "8,64", "--scheme", "kaiming"]
    result = run(*args, "--out", out)
    assert result.exit_code == 0, result.stderr
    assert f"updated in ['{loaded_at[0]}']" in result.stdout
    after = torch.load(out, weights_only=True)
    key = loaded_at[0]
    prefix = "model." if key == "state_dict" else ""
    written = after[key][f"{prefix}0.weight"]
    # kaiming_normal_(relu) on Linear(64, 64): std sqrt(2 / 64) = 0.177 (He et al. 2015); 4,096
    # draws give the sample std within ~1.1% (1/sqrt(2n)), so 6% is over five standard errors.
    assert written.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.06)
    assert before[key][f"{prefix}0.weight"].std().item() == pytest.approx(0.01, rel=0.06)
    for other in before:
        if other == key:
            continue
        if isinstance(before[other], dict):  # every other copy of the weights: bit for bit as it was
            assert before[other].keys() == after[other].keys()
            for name, tensor in before[other].items():
                assert torch.equal(after[other][name], tensor) and after[other][name].dtype == tensor.dtype, (
                    other,
                    name,
                )
        else:
            assert after[other] == before[other]


# -- 2. fix --seed is reproducible ---------------------------------------------------------


@pytest.mark.parametrize("scheme", ["kaiming", "auto"])
def test_fix_with_the_same_seed_writes_the_same_weights(src: dict[str, Path], tmp_path: Path, scheme: str) -> None:
    weights = tmp_path / "bad.pt"
    torch.save(wide_model(0.01, 0).state_dict(), weights)  # auto flags std 0.01 as poor-init
    args = ["fix", weights, "--arch", f"{src['wide']}:build", "--input-shape", "8,64", "--scheme", scheme]
    outs, untouched = [], []
    for global_seed, seed, name in ((11, 0, "a.pt"), (22, 0, "b.pt"), (11, 1, "c.pt")):
        torch.manual_seed(global_seed)  # whatever the caller's generator holds, --seed decides
        state = torch.get_rng_state()
        result = run(*args, "--seed", seed, "--out", tmp_path / name)
        assert result.exit_code == 0, result.stderr
        untouched.append(torch.equal(torch.get_rng_state(), state))
        outs.append(torch.load(tmp_path / name, weights_only=True))
    original = torch.load(weights, weights_only=True)
    assert any(not torch.equal(outs[0][k], original[k]) for k in original)  # the fix changed something
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in original)  # same file, same seed: same bytes
    assert any(not torch.equal(outs[0][k], outs[2][k]) for k in original)  # another seed, other weights
    assert untouched == [True, True, True]  # the caller's generator is left as it was


# -- 3. the content decides the format, not the name ---------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_save_files_named_safetensors_load_by_content(src: dict[str, Path], tmp_path: Path, legacy: bool) -> None:
    state = wide_model(0.01, 0).state_dict()
    model_file = tmp_path / "weights.safetensors"
    torch.save(state, model_file, _use_new_zipfile_serialization=not legacy)
    inputs = tmp_path / "batch.safetensors"
    torch.save(torch.randn(8, 64), inputs, _use_new_zipfile_serialization=not legacy)
    arch = ["--arch", f"{src['wide']}:build"]
    for trust in ([], ["--trust-code"]):
        result = run("audit", model_file, *arch, "--inputs", inputs, "--format", "json", *trust)
        assert result.exit_code in (0, 1), result.stderr
        report = json.loads(result.stdout)
        assert report["model"]["format"] == "state_dict" and report["run"]["input_shape"] == [8, 64]
    # fix re-reads the same file to write the checkpoint back
    result = run("fix", model_file, *arch, "--input-shape", "8,64", "--scheme", "kaiming", "--out", tmp_path / "f.pt")
    assert result.exit_code == 0, result.stderr
    fixed = torch.load(tmp_path / "f.pt", weights_only=True)
    assert fixed.keys() == state.keys() and not torch.equal(fixed["0.weight"], state["0.weight"])


# -- 4. not code is not called code ----------------------------------------------------------


@pytest.fixture(scope="module")
def not_code(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import numpy as np

    folder = tmp_path_factory.mktemp("not_code")
    legacy = folder / "legacy.pt"
    torch.save(wide_model(0.01, 0).state_dict(), legacy, _use_new_zipfile_serialization=False)
    files = {"truncated_legacy": folder / "truncated.pt", "csv": folder / "x.csv", "npy": folder / "x.npy"}
    files["truncated_legacy"].write_bytes(legacy.read_bytes()[:200])
    files["csv"].write_text("1,2,3\n4,5,6\n")
    np.save(files["npy"], np.zeros((4, 64), dtype="float32"))
    files["bare_pickle"] = folder / "plain.pkl"  # a pickle of plain data, not a torch.save file
    files["bare_pickle"].write_bytes(__import__("pickle").dumps({"w": [1.0, 2.0]}, protocol=4))
    return files


@pytest.mark.parametrize("name", ["truncated_legacy", "csv", "npy", "bare_pickle"])
def test_files_holding_no_code_are_called_damaged_not_code(
    src: dict[str, Path], not_code: dict[str, Path], name: str
) -> None:
    arch = ["--arch", f"{src['wide']}:build"]
    lines = [error_line(run("audit", src["weights"], "--arch", f"{src['models']}:build", "--inputs", not_code[name]))]
    if name in ("truncated_legacy", "bare_pickle"):  # pickle streams reach the unpickler as MODEL too
        lines.append(error_line(run("audit", not_code[name], *arch, "--input-shape", "8,64")))
    for line in lines:
        assert "damaged or not a torch.save file" in line and str(not_code[name]) in line, line
        assert "pickled Python object" not in line and "--trust-code" not in line and "arbitrary code" not in line


def test_files_holding_code_are_still_called_code(src: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    inputs = tmp_path / "evil_inputs.pt"
    inputs.write_bytes(torch_save_bytes(FileTensor(marker, (6, 12))))
    line = error_line(run("audit", f"{src['models']}:build", "--inputs", inputs))
    assert "pickled Python object" in line and "from_file" in line
    line = error_line(run("audit", pickled_module(tmp_path / "module.pt", marker)))
    assert "pickled Python object" in line and "--trust-code" in line
    assert not marker.exists()


# -- 5. TensorBoard's writer thread ----------------------------------------------------------


def _disk_full(self: object, data: bytes) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_under_tensorboard_is_one_line(
    src: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorboard.summary.writer import record_writer

    # What a full disk does: every record the writer thread writes fails with ENOSPC.
    monkeypatch.setattr(record_writer.RecordWriter, "write", _disk_full)
    # Python's own hook, which prints "Exception in thread ..." to sys.stderr (pytest's
    # would collect it instead, hiding exactly what the user saw)
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    hook = threading.excepthook
    before = snapshot(tmp_path)
    result = run("audit", f"{src['models']}:build", "--tensorboard", tmp_path / "run")
    line = error_line(result)
    assert "No space left on device" in line and "run" in line
    assert "Exception in thread" not in result.stderr
    assert threading.excepthook is hook  # restored
    assert snapshot(tmp_path) == before  # the staged run is gone


def test_other_threads_still_reach_the_excepthook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gradscope.tensorboard import writer_thread_errors_to_caller

    seen: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(str(args.exc_value)))

    def fails() -> None:
        raise ValueError("a user thread's error")

    with writer_thread_errors_to_caller():
        thread = threading.Thread(target=fails)
        thread.start()
        thread.join()
    assert seen == ["a user thread's error"]


# -- 6. dashboard ---------------------------------------------------------------------------


def test_dashboard_bad_port_is_a_usage_error(tmp_path: Path) -> None:
    line = error_line(run("dashboard", tmp_path, "--port", "99999"))
    assert "--port" in line and "65535" in line


def test_dashboard_tensorboard_exit_is_one_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import gradscope.tensorboard

    def werkzeug_like(*args: object, **kwargs: object) -> None:
        # TensorBoard's advisory, then werkzeug on a failed bind: print the OS error, sys.exit(1)
        sys.stderr.write(
            '\nNOTE: Using experimental fast data loading logic. To disable, pass\n    "--load_fast=false"\n\n'
        )
        print("Cannot assign requested address", file=sys.stderr)
        sys.exit(1)

    monkeypatch.setattr(gradscope.tensorboard, "launch_dashboard", werkzeug_like)
    line = error_line(run("dashboard", tmp_path, "--host", "192.0.2.1"))
    assert "192.0.2.1" in line and "Cannot assign requested address" in line


def test_dashboard_port_in_use_real_tensorboard(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = gradscope_process("dashboard", tmp_path, "--port", port, timeout=60)
    assert done.returncode == 2, done.stderr
    line = one_error_line(done.stderr)  # no TensorBoard banner before it
    assert str(port) in line and "in use" in line


@pytest.mark.parametrize("with_run", [False, True])
def test_dashboard_notes_an_empty_logdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_run: bool) -> None:
    import gradscope.cli.dashboard
    import gradscope.tensorboard

    if with_run:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "events.out.tfevents.1.host").write_bytes(b"x")
    monkeypatch.setattr(gradscope.tensorboard, "launch_dashboard", lambda *a, **k: ("http://127.0.0.1:1/", None))

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(gradscope.cli.dashboard.time, "sleep", interrupted)
    result = run("dashboard", tmp_path)
    assert result.exit_code == 0 and result.stdout == "http://127.0.0.1:1/#custom_scalars\n"
    assert ("holds no TensorBoard run" in result.stderr) is not with_run, result.stderr


# -- 7. report - -----------------------------------------------------------------------------


class _Endless(io.RawIOBase):
    """An endless producer (``< /dev/zero``): sized reads give zeros, an unsized read would never end."""

    def __init__(self, fail: type[BaseException] | None = None) -> None:
        self.fail = fail
        self.given = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise MemoryError  # what reading it whole ends with
        if self.fail is not None and size:
            raise self.fail
        self.given += size
        return b" " * size

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def test_report_stdin_is_read_with_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradscope.cli.report

    monkeypatch.setattr(gradscope.cli.report, "MAX_REPORT_BYTES", 64 * 1024, raising=False)
    stream = _Endless()
    line = error_line(run("report", "-", input=stream))
    assert "larger than" in line and "standard input" in line and "--input-shape" not in line
    assert stream.given <= 64 * 1024 + 1 + 4096  # read up to the bound (plus a text buffer's chunk)


def test_report_file_is_read_with_a_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gradscope.cli.report

    monkeypatch.setattr(gradscope.cli.report, "MAX_REPORT_BYTES", 1024, raising=False)
    big = tmp_path / "big.json"
    big.write_text("{" + " " * 2048 + "}")
    line = error_line(run("report", big))
    assert "larger than" in line and str(big) in line


def test_report_out_of_memory_names_the_report_not_input_shape() -> None:
    line = error_line(run("report", "-", input=_Endless(fail=MemoryError)))
    assert "out of memory" in line and "report" in line and "--input-shape" not in line


# -- 8. options that do not apply ------------------------------------------------------------

IGNORED = {
    "arch-with-factory": (lambda s: [f"{s['models']}:build", "--arch", f"{s['models']}:build"], ("--arch", "factory")),
    "arch-with-pt2": (lambda s: [s["pt2"], "--arch", f"{s['models']}:build"], ("--arch", "torch.export")),
    "input-dtype-with-inputs": (
        lambda s: [s["weights"], "--arch", f"{s['models']}:build", "--inputs", s["inputs"], "--input-dtype", "int64"],
        ("--input-dtype", "--inputs"),
    ),
    "vocab-with-inputs": (
        lambda s: [s["weights"], "--arch", f"{s['models']}:build", "--inputs", s["inputs"], "--vocab", "7"],
        ("--vocab", "--inputs"),
    ),
    "vocab-with-float-shape": (
        lambda s: [f"{s['models']}:build", "--input-shape", "4,12", "--vocab", "100"],
        ("--vocab", "float32"),
    ),
    "vocab-with-inferred-float": (lambda s: [f"{s['models']}:build", "--vocab", "100"], ("--vocab", "fc1 (Linear)")),
    "input-dtype-with-inferred-float": (
        lambda s: [f"{s['models']}:build", "--input-dtype", "int64"],
        ("--input-dtype int64", "--input-shape"),
    ),
    "input-dtype-with-pt2-example": (lambda s: [s["pt2"], "--input-dtype", "int64"], ("--input-dtype", "saved")),
}


@pytest.mark.parametrize("case", list(IGNORED))
def test_options_that_do_not_apply_are_usage_errors(with_pt2: dict[str, Path], case: str) -> None:
    args, words = IGNORED[case]
    line = error_line(run("audit", *args(with_pt2), "--loss", "mean"))
    for word in words:
        assert word in line, (case, line)


def test_arch_with_a_pickled_module_is_refused_too(src: dict[str, Path], tmp_path: Path) -> None:
    module = tmp_path / "whole.pt"
    torch.save(wide_model(0.1, 0), module)
    line = error_line(run("audit", module, "--arch", f"{src['wide']}:build", "--trust-code"))
    assert "--arch" in line and "pickled module" in line


def test_options_that_apply_still_work(with_pt2: dict[str, Path]) -> None:
    src = with_pt2
    result = run("audit", f"{src['embed']}:build", "--vocab", "20", "--loss", "mean", "--format", "json")
    assert result.exit_code in (0, 1), result.stderr
    assert json.loads(result.stdout)["run"]["vocab"] == 20  # int64 ids inferred from the Embedding use it
    for args in (
        [f"{src['models']}:build", "--input-dtype", "float32"],  # given and equal to the inferred dtype
        [f"{src['models']}:build", "--input-shape", "4,12", "--input-dtype", "float32"],
        [src["pt2"], "--input-dtype", "float32"],  # the archive's example inputs are float32
    ):
        result = run("audit", *args, "--loss", "mean", "--format", "json")
        assert result.exit_code in (0, 1), (args, result.stderr)


# -- 9. an output inside the run directory ---------------------------------------------------


def test_output_inside_the_tensorboard_run_is_refused_up_front(src: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # a MODEL that cannot load: the refusal must come from the plan, before any model code
    args = ["audit", f"{src['models']}:no_such_factory", "-o", run_dir / "report.json", "--tensorboard", run_dir]
    line = error_line(run(*args))
    assert "inside" in line and "--tensorboard" in line and "--output" in line
    assert list(run_dir.iterdir()) == []
