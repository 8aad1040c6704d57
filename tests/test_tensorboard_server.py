"""End to end: a real TensorBoard server on loopback serves gradscope's tags and its
custom-scalars layout through its HTTP data API; ``gradscope dashboard`` prints a
URL that serves them too.  Every server is a subprocess, waited for with a bound
and always killed."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from torch import nn

from gradscope.watching import Scope

WAIT_SECONDS = 90


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read().decode())


def wait_for(url: str, proc: subprocess.Popen, ready) -> object:
    """Poll ``url`` until ``ready(data)`` or the deadline; fail if the server died."""
    deadline = time.monotonic() + WAIT_SECONDS
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with code {proc.returncode}")
        try:
            data = get_json(url)
            if ready(data):
                return data
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as exc:
            last_error = exc
        time.sleep(0.5)
    pytest.fail(f"no answer from {url} within {WAIT_SECONDS}s ({last_error})")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tb")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(8, 6), torch.randn(8, 3)
        with Scope(model, every=2, log_dir=str(path), raise_on=(), on_finding=lambda f: None) as scope:
            for _ in range(6):
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                scope.step(opt, loss=loss)
                opt.step()
    finally:
        torch.set_num_threads(old)
    return path


def check_served(base: str, proc: subprocess.Popen) -> None:
    from gradscope.dashboards import charts as ch

    tags = wait_for(
        f"{base}/data/plugin/scalars/tags",
        proc,
        lambda d: isinstance(d, dict) and ch.GRAD_NORM in d.get(ch.TRAINING_RUN, {}) and ch.CLIP_RUN in d,
    )
    for tag in (ch.GRAD_NORM, ch.LOSS):
        assert tag in tags[ch.TRAINING_RUN]
    assert ch.GRAD_NORM in tags[ch.CLIP_RUN]
    named = {tag for run in ch.SLOT_RUNS for tag in tags.get(run, {})}
    for chart in (ch.GRAD_RMS, ch.ACT_STD, ch.headroom_tag("fp16"), ch.UPDATE_RATIO):
        assert any(tag.startswith(chart + "/") for tag in named), chart
        assert f"{chart}/{ch.MEDIAN_SERIES}" in tags[ch.MEDIAN_RUN]
    layout = wait_for(f"{base}/data/plugin/custom_scalars/layout", proc, lambda d: bool(d))
    titles = [category["title"] for category in layout["category"]]
    assert titles == list(ch.layout(("fp16",)))
    first = [chart["title"] for chart in layout["category"][0]["chart"]]
    assert first == ["loss (training, validation)", "global gradient norm, log10, and the AutoClip clip threshold"]
    images = wait_for(f"{base}/data/plugin/images/tags", proc, lambda d: isinstance(d, dict) and "." in d)
    assert set(images["."]) == {ch.HEATMAP_GRADIENT, ch.HEATMAP_ACTIVATION}


def test_tensorboard_server_serves_tags_and_layout(logdir: Path) -> None:
    exe = shutil.which("tensorboard")
    command = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
    port = free_port()
    proc = subprocess.Popen(
        command + ["--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        check_served(f"http://127.0.0.1:{port}", proc)
    finally:
        stop(proc)


def test_dashboard_command_prints_a_working_url(logdir: Path) -> None:
    port = free_port()
    code = "import sys; from gradscope.cli.dashboard import dashboard; dashboard(sys.argv[1:])"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(logdir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], WAIT_SECONDS)
        assert ready, f"gradscope dashboard printed nothing within {WAIT_SECONDS}s"
        line = proc.stdout.readline().strip()
        assert line.startswith(f"http://127.0.0.1:{port}/"), line
        check_served(line.split("#")[0].rstrip("/"), proc)
    finally:
        stop(proc)


def test_dashboard_command_refuses_a_missing_directory(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from gradscope.cli.dashboard import dashboard

    result = CliRunner().invoke(dashboard, [str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "no such directory" in result.output
