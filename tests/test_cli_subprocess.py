"""The ``gradscope`` command as users and CI run it: a real process.

Exit codes, stdout purity with ``--format json``, the pickle refusal (the
canary file must not appear), ``python -m gradscope``, and no torch import on
the ``--help`` path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_models import canaries, make_model_files


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_model_files(tmp_path_factory.mktemp("cli_subprocess"))


def gradscope(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gradscope", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=180
    )


def test_json_stdout_is_one_document_even_when_the_model_prints(files: dict[str, Path]) -> None:
    done = gradscope("audit", f"{files['models']}:chatty", "--format", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # raises if anything else reached stdout
    assert report["schema"] == 1 and report["model"]["format"] == "factory"
    assert "chatty factory output" in done.stderr  # the model's print went to stderr
    assert "a user warning from the factory" in done.stderr


def test_exit_codes(files: dict[str, Path], tmp_path: Path) -> None:
    nan = gradscope("audit", f"{files['models']}:build_nan", "--format", "json", "--fail-on", "error")
    assert nan.returncode == 1 and "nonfinite" in {f["code"] for f in json.loads(nan.stdout)["findings"]}
    missing = gradscope("audit", tmp_path / "absent.pt", "--format", "json")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip() == f"gradscope: error: model file {str(tmp_path / 'absent.pt')!r} does not exist"
    usage = gradscope("audit", "--no-such-option")
    assert usage.returncode == 2


def test_pickle_refused_in_a_real_process(files: dict[str, Path]) -> None:
    done = gradscope("audit", files["evil_pickle"], "--format", "json", "--output", files["models"].parent / "o.json")
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--trust-code" in lines[0] and "Traceback" not in done.stderr
    assert not any(path.exists() for path in canaries(files["models"].parent))
    assert not (files["models"].parent / "o.json").exists()


def test_help_path_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from gradscope.cli import main\n"
        "for args in (['--help'], ['audit', '--help'], ['fix', '--help'], ['report', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, exc.code\n"
        "heavy = sorted(m for m in ('torch', 'rich', 'numpy') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "HEAVY []"
