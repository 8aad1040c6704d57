"""Files the CLI edge tests build (no tests here): small factories that misbehave
on purpose, a checkpoint with more than weights, inputs, a saved report, and
helpers that snapshot a folder to prove nothing was left behind.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

EDGE_MODELS = '''
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def build():
    torch.manual_seed(0)
    return MLP()


def exits():
    sys.exit(3)


def exits_builtin():
    exit()


class ExitsInForward(MLP):
    def forward(self, x):
        sys.exit(0)


def exits_in_forward():
    return ExitsInForward()


class ExitMessageInForward(MLP):
    def forward(self, x):
        raise SystemExit("bye from forward")


def exit_message_in_forward():
    return ExitMessageInForward()


class WritesFd1(MLP):
    def forward(self, x):
        os.write(1, b"RAW-FD1\\n")
        sys.__stdout__.write("DUNDER-STDOUT\\n")
        print("PRINTED")
        subprocess.run([sys.executable, "-c", "print('CHILD-PROCESS')"], check=True)
        return super().forward(x)


def writes_fd1():
    print("FACTORY-PRINT")
    os.write(1, b"FACTORY-FD1\\n")
    return WritesFd1()


def logs_torch_traceback():
    try:
        raise RuntimeError("deserialisation failed deep inside torch")
    except RuntimeError:
        logging.getLogger("torch.export").warning("Ran into the following error", exc_info=True)
    logging.getLogger("torch._dynamo.somewhere").error("another torch log line")
    return build()


class Escapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.add_module("fc\\x1b[2J\\x1b]0;pwned\\x07\\u202e", nn.Linear(12, 5))

    def forward(self, x):
        return next(iter(self.children()))(x)


def escapes():
    return Escapes()


class Escaping(MLP):
    def forward(self, x):
        raise ValueError("bad\\x1b[31m red \\x1b]8;;http://evil\\x07link")


def escaping_error():
    return Escaping()


class Sleeper(MLP):
    """Creates $GRADSCOPE_TEST_READY in its forward, then sleeps: a deterministic signal window."""

    def forward(self, x):
        Path(os.environ["GRADSCOPE_TEST_READY"]).touch()
        if os.environ.get("GRADSCOPE_TEST_SWALLOW"):
            try:
                time.sleep(60)
            except BaseException:
                pass  # model code that swallows the interruption
        else:
            time.sleep(60)
        return super().forward(x)


def sleeper():
    torch.manual_seed(0)
    return Sleeper()
'''

EXITS_ON_IMPORT = "import sys\nsys.exit(5)\n"


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def make_edge_files(folder: Path) -> dict[str, Path]:
    """Write the sources and data files into ``folder``; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"models": folder / "edge_models.py", "exits_on_import": folder / "exits_on_import.py"}
    files["models"].write_text(EDGE_MODELS)
    files["exits_on_import"].write_text(EXITS_ON_IMPORT)
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():  # a poor init (tiny weights) so that fix has something to change
        for layer in (model.fc1, model.fc2):
            layer.weight.mul_(0.01)
    files["weights"] = folder / "weights.pt"
    torch.save(model.state_dict(), files["weights"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 12)).sum().backward()
    optimizer.step()
    files["checkpoint"] = folder / "checkpoint.pt"
    torch.save(
        {"epoch": 7, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "note": "run 12"},
        files["checkpoint"],
    )
    files["inputs"] = folder / "inputs.pt"
    torch.save(torch.randn(6, 12, generator=torch.Generator().manual_seed(1)), files["inputs"])
    files["empty_tensor"] = folder / "empty_tensor.pt"
    torch.save(torch.zeros(0, 12), files["empty_tensor"])
    files["empty_dict"] = folder / "empty_dict.pt"
    torch.save({"x": torch.zeros(0, 12)}, files["empty_dict"])
    files["empty_tuple"] = folder / "empty_tuple.pt"
    torch.save((torch.zeros(0, 12),), files["empty_tuple"])
    files["fifo"] = folder / "pipe"
    os.mkfifo(files["fifo"])
    files["fifo_py"] = folder / "pipe.py"
    os.mkfifo(files["fifo_py"])
    files["not_json"] = folder / "broken.json"
    files["not_json"].write_text('{"schema": 1, ')
    files["json_list"] = folder / "list.json"
    files["json_list"].write_text("[1, 2]")
    files["schema2"] = folder / "schema2.json"
    files["schema2"].write_text('{"schema": 2}')
    files["report_bad_types"] = folder / "bad_types.json"
    return files


def snapshot(folder: Path) -> dict[str, tuple[str, str]]:
    """Every entry under ``folder`` (hidden ones too): relative path -> (kind, content digest)."""
    out: dict[str, tuple[str, str]] = {}
    if not folder.exists():
        return out
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(root) / name
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[str(path.relative_to(folder))] = ("file", digest)
            else:
                out[str(path.relative_to(folder))] = (oct(stat.S_IFMT(info.st_mode)), "")
    return out


def gradscope_process(
    *args: object, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 180, **popen: object
) -> subprocess.CompletedProcess[str]:
    """``python -m gradscope ARGS`` in a real process (text mode, stdout and stderr captured)."""
    return subprocess.run(
        [sys.executable, "-m", "gradscope", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        **popen,  # type: ignore[arg-type]
    )


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def one_error_line(stderr: str) -> str:
    """The single ``gradscope: error:`` line of ``stderr`` (fails on anything else)."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("gradscope: error: "), stderr
    return lines[0]
