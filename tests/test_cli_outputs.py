"""Outputs never destroy data (issue 10, item 2).

Outputs appear only once everything succeeded (staged under hidden names,
moved into place at the end), ``fix --out`` keeps every checkpoint entry it
did not change, and SIGINT/SIGTERM sent to a real process while the
TensorBoard run or the fixed checkpoint is being written (or while model code
runs) leave nothing behind and exit 130/143.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_edge_files import child_env, make_edge_files, one_error_line, snapshot
from click.testing import CliRunner, Result

from gradscope.cli import cli
from gradscope.cli.staging import STAGING_MARK


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_edge_files(tmp_path_factory.mktemp("outputs_src"))


def run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def spec(src: dict[str, Path], name: str) -> str:
    return f"{src['models']}:{name}"


def leftovers(folder: Path) -> list[str]:
    return [name for name in snapshot(folder) if STAGING_MARK in name]


# -- outputs appear whole, at the end ------------------------------------------------------------


def test_report_and_run_appear_together_and_parents_are_created(src: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "deep" / "audit-1"
    result = run("audit", spec(src, "build"), "-o", tmp_path / "r.json", "--format", "json", "--tensorboard", run_dir)
    assert result.exit_code in (0, 1), result.stderr
    assert (tmp_path / "r.json").read_text().startswith("{")
    events = [p.name for p in run_dir.iterdir() if p.is_file()]
    assert len(events) == 1 and events[0].startswith("events.out.tfevents"), events
    # beside it, one sub-directory per TensorBoard run of the dashboards (gradscope.dashboards.charts)
    from gradscope.dashboards.charts import RUN_ORDER

    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == sorted(RUN_ORDER)
    assert leftovers(tmp_path) == []
    assert oct((tmp_path / "r.json").stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_existing_empty_run_directory_is_used(src: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "empty-run"
    run_dir.mkdir()
    result = run("audit", spec(src, "build"), "--tensorboard", run_dir, "--format", "json")
    assert result.exit_code in (0, 1), result.stderr
    assert [p.name for p in run_dir.iterdir() if p.is_file()][0].startswith("events.out.tfevents")
    assert leftovers(tmp_path) == []


def test_a_failing_report_write_leaves_no_tensorboard_run(
    src: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run is written first; when the report then fails (a full disk), neither appears."""

    def disk_full(fd: int) -> None:  # what a full disk (or NFS quota) reports when data is flushed
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    (tmp_path / "r.json").write_text("the previous report")
    result = run("audit", spec(src, "build"), "-o", tmp_path / "r.json", "--tensorboard", tmp_path / "run")
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert line == f"gradscope: error: cannot write {str(tmp_path / 'r.json')!r}: No space left on device"
    assert not (tmp_path / "run").exists()
    assert (tmp_path / "r.json").read_text() == "the previous report"
    assert leftovers(tmp_path) == []


def test_failing_model_leaves_old_output_untouched(src: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text("the previous report")
    result = run(
        "audit", spec(src, "escaping_error"), "--input-shape", "4,12", "-o", tmp_path / "r.json",
        "--tensorboard", tmp_path / "run",
    )  # fmt: skip
    assert result.exit_code == 2
    one_error_line(result.stderr)
    assert (tmp_path / "r.json").read_text() == "the previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_existing_output_is_replaced_keeping_its_mode(src: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "r.md"
    target.write_text("old")
    target.chmod(0o640)
    result = run("audit", spec(src, "build"), "-o", target, "--format", "markdown")
    assert result.exit_code in (0, 1), result.stderr
    assert target.read_text().startswith("## gradscope")
    assert target.stat().st_mode & 0o777 == 0o640
    assert leftovers(tmp_path) == []


# -- fix --out keeps what it did not change ----------------------------------------------------------


def _fix(src: dict[str, Path], model: Path | str, out: Path, *extra: object) -> Result:
    result = run("fix", model, "--arch", spec(src, "build"), "--scheme", "kaiming", "--out", out, *extra)
    assert result.exit_code == 0, result.stderr
    return result


def test_fix_keeps_every_checkpoint_entry(src: dict[str, Path], tmp_path: Path) -> None:
    original = torch.load(src["checkpoint"], weights_only=True)
    result = _fix(src, src["checkpoint"], tmp_path / "fixed.pt")
    fixed = torch.load(tmp_path / "fixed.pt", weights_only=True)
    assert set(fixed) == {"epoch", "model", "optimizer", "note"}
    assert fixed["epoch"] == 7 and fixed["note"] == "run 12"
    # optimizer state (momentum buffers, param groups) exactly as it was
    assert fixed["optimizer"]["param_groups"] == original["optimizer"]["param_groups"]
    for key, state in original["optimizer"]["state"].items():
        assert torch.equal(fixed["optimizer"]["state"][key]["momentum_buffer"], state["momentum_buffer"])
    assert list(fixed["model"]) == list(original["model"])  # same names, same order
    # Kaiming (He et al. 2015) gives std sqrt(2 / fan_in): 0.41 for fc1's 12 inputs, was ~0.003
    assert abs(fixed["model"]["fc1.weight"].std().item() - (2 / 12) ** 0.5) < 0.15
    assert original["model"]["fc1.weight"].std().item() < 0.01
    assert torch.equal(fixed["model"]["fc2.bias"], torch.zeros(5))  # biases zeroed by the scheme
    assert "kept epoch, optimizer, note" in result.stdout
    assert torch.load(src["checkpoint"], weights_only=True)["epoch"] == 7  # the input is untouched


def test_fix_keeps_prefix_dtype_and_untouched_tensors(src: dict[str, Path], tmp_path: Path) -> None:
    base = torch.load(src["weights"], weights_only=True)
    checkpoint = {
        "state_dict": {f"module.{k}": v.half() for k, v in base.items()},
        "extra_buffer": torch.arange(3),
        "hparams": {"lr": 0.1},
    }
    torch.save(checkpoint, tmp_path / "half.pt")
    run_ = run(
        "fix", tmp_path / "half.pt", "--arch", spec(src, "build"), "--scheme", "kaiming", "--out", tmp_path / "o.pt"
    )
    assert run_.exit_code == 0, run_.stderr
    fixed = torch.load(tmp_path / "o.pt", weights_only=True)
    assert list(fixed["state_dict"]) == list(checkpoint["state_dict"])  # "module." names kept
    assert all(v.dtype == torch.float16 for v in fixed["state_dict"].values())
    assert torch.equal(fixed["extra_buffer"], torch.arange(3)) and fixed["hparams"] == {"lr": 0.1}
    changed = [k for k, v in fixed["state_dict"].items() if not torch.equal(v, checkpoint["state_dict"][k])]
    assert changed and all(k.endswith(("weight", "bias")) for k in changed)


def test_fix_trusted_checkpoint_keeps_python_objects(src: dict[str, Path], tmp_path: Path) -> None:
    """With consent for code, a checkpoint holding Python objects (argparse's Namespace) keeps them too."""
    import argparse

    base = torch.load(src["weights"], weights_only=True)
    torch.save({"model": base, "args": argparse.Namespace(lr=0.25)}, tmp_path / "ckpt.pt")
    _fix(src, tmp_path / "ckpt.pt", tmp_path / "o.pt", "--trust-pickle")
    fixed = torch.load(tmp_path / "o.pt", weights_only=False)
    assert fixed["args"].lr == 0.25 and set(fixed["model"]) == set(base)


def test_fix_safetensors_keeps_names_and_metadata(src: dict[str, Path], tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    base = torch.load(src["weights"], weights_only=True)
    save_file({f"model.{k}": v for k, v in base.items()}, str(tmp_path / "w.safetensors"), metadata={"who": "me"})
    _fix(src, tmp_path / "w.safetensors", tmp_path / "o.safetensors")
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as handle:
        assert handle.metadata() == {"who": "me"}
        assert sorted(handle.keys()) == sorted(f"model.{k}" for k in base)


def test_fix_factory_writes_its_state_dict(src: dict[str, Path], tmp_path: Path) -> None:
    result = run("fix", spec(src, "build"), "--scheme", "xavier", "--out", tmp_path / "o.pt")
    assert result.exit_code == 0, result.stderr
    assert sorted(torch.load(tmp_path / "o.pt", weights_only=True)) == sorted(
        ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    )
    assert leftovers(tmp_path) == []


# -- signals in a real process ----------------------------------------------------------------------------

# Runs the CLI with one write slowed down: after the TensorBoard events (or the fixed
# checkpoint) are in the staging area, it creates $GRADSCOPE_TEST_READY and sleeps, so
# the test signals at a known point instead of sleeping blindly.
WINDOW_WRAPPER = """
import os, sys, time
from pathlib import Path

ready = Path(os.environ["GRADSCOPE_TEST_READY"])
window = os.environ["GRADSCOPE_TEST_WINDOW"]
if window == "tensorboard":
    import gradscope.tensorboard as tb

    original = tb.DashboardWriter.write_report

    def write_report(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._writer.flush()  # the event file now holds data, under its staging name
        ready.touch()
        time.sleep(60)

    tb.DashboardWriter.write_report = write_report
elif window == "save":
    import torch

    original_save = torch.save

    def save(obj, f, *args, **kwargs):
        original_save(obj, f, *args, **kwargs)
        ready.touch()
        time.sleep(60)

    torch.save = save

from gradscope.cli import main

main(sys.argv[1:])
"""


def _interrupt(args: list[object], window: str, signum: int, tmp_path: Path, **env: str) -> tuple[int, str, list[str]]:
    ready = tmp_path / "ready"
    out = tmp_path / "out"
    command = [sys.executable, "-c", WINDOW_WRAPPER, *map(str, args)]
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(GRADSCOPE_TEST_READY=str(ready), GRADSCOPE_TEST_WINDOW=window, **env),
    )
    try:
        deadline = time.monotonic() + 150
        while not ready.exists():
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the write window never opened"
            time.sleep(0.05)
        staged = leftovers(out)
        child.send_signal(signum)
        stdout, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert stdout == ""
    line = one_error_line(stderr)
    assert signal.Signals(signum).name in line
    return child.returncode, line, staged


SIGNALS = [pytest.param(signal.SIGINT, 130, id="SIGINT"), pytest.param(signal.SIGTERM, 143, id="SIGTERM")]


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_signal_during_tensorboard_write(src: dict[str, Path], tmp_path: Path, signum: int, code: int) -> None:
    out = tmp_path / "out"
    out.mkdir()
    args = ["audit", spec(src, "build"), "--tensorboard", out / "run", "-o", out / "r.json"]
    returncode, _line, staged = _interrupt(args, "tensorboard", signum, tmp_path)
    assert staged, "the run was not being staged when the signal arrived"
    assert returncode == code
    assert snapshot(out) == {}  # no run, no report, no hidden staging


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_signal_during_fix_out(src: dict[str, Path], tmp_path: Path, signum: int, code: int) -> None:
    out = tmp_path / "out"
    out.mkdir()
    args = ["fix", src["checkpoint"], "--arch", spec(src, "build"), "--scheme", "kaiming", "--out", out / "f.pt"]
    returncode, _line, staged = _interrupt(args, "save", signum, tmp_path)
    assert staged and all(name.endswith(".tmp") for name in staged)
    assert returncode == code
    assert snapshot(out) == {}


@pytest.mark.slow
@pytest.mark.parametrize("swallow", ["", "1"], ids=["raises", "model-swallows-it"])
def test_sigterm_during_forward(src: dict[str, Path], tmp_path: Path, swallow: str) -> None:
    """Even when model code catches the interruption, the command stops (143) and writes nothing."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["audit", spec(src, "sleeper"), "--input-shape", "4,12", "-o", out / "r.json", "--tensorboard", out / "run"]
    returncode, _line, _staged = _interrupt(args, "forward", signal.SIGTERM, tmp_path, GRADSCOPE_TEST_SWALLOW=swallow)
    assert returncode == 143
    assert snapshot(out) == {}
