"""The README runs, for a newcomer: every ```python block executes as written
(each in a fresh process, in an empty directory), every name it uses resolves
right after ``import gradscope`` (which does not import torch), and every file
and link it names is inside this repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_the_readme_has_python_blocks() -> None:
    assert len(python_blocks()) >= 2  # the audit and the watch examples


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index: int, tmp_path: Path) -> None:
    block = python_blocks()[index]
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(block, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"README python block {index} failed:\n{block}\n--- stderr:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr
    if "gradscope.render.render(" in block:
        assert "gradscope report" in done.stdout  # the rendered table was printed
    if 'log_dir="runs/gradscope"' in block:
        assert list((tmp_path / "runs" / "gradscope").glob("**/events.out.tfevents.*"))


def _names_used() -> list[str]:
    """Dotted names ``gradscope.x.y`` the README uses (not paths, not CLI commands)."""
    text = README.read_text(encoding="utf-8")
    names = set(re.findall(r"(?<![\w/.-])gradscope(?:\.[A-Za-z_]\w*)+", text))
    return sorted(names)


def test_import_gradscope_is_light_and_every_readme_name_resolves() -> None:
    names = [n for n in _names_used() if not n.startswith("gradscope.integrations.")]
    assert {"gradscope.render.render", "gradscope.fix.apply_init", "gradscope.audit", "gradscope.watch"} <= set(names)
    probe = (
        "import sys, gradscope\n"
        "assert 'torch' not in sys.modules, 'import gradscope imported torch'\n"
        "import functools\n"
        f"for name in {names!r}:\n"
        "    functools.reduce(getattr, name.split('.')[1:], gradscope)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize(
    ("module", "attribute", "framework"),
    [
        ("gradscope.integrations.lightning", "GradscopeCallback", "lightning"),
        ("gradscope.integrations.huggingface", "GradscopeTrainerCallback", "transformers"),
    ],
)
def test_readme_integration_names_resolve(module: str, attribute: str, framework: str) -> None:
    assert f"{module}.{attribute}" in _names_used()
    pytest.importorskip(framework)
    import importlib

    assert callable(getattr(importlib.import_module(module), attribute))


def test_every_file_and_link_the_readme_names_is_in_the_repository() -> None:
    text = README.read_text(encoding="utf-8")
    assert "../" not in text  # nothing outside the repository
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for target in links:
        assert not re.match(r"^[a-z]+://", target), f"link leaves the repository: {target}"
        assert (ROOT / target.split("#")[0]).exists(), f"broken link: {target}"
    top = "gradscope|tests|docs|benchmarks|demos"
    paths = set(re.findall(rf"(?<![\w/.-])((?:{top})/[\w./-]*\.(?:py|md|toml|txt))", text))
    paths = {p for p in paths if not re.search(r"/[A-Z]+\.", p)}  # `demos/NAME.py` is a placeholder
    assert "docs/report-schema.md" in paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"the README names files that do not exist: {missing}"


def _table_codes(text: str, heading: str) -> set[str]:
    """The finding codes in the first column of the table under ``heading``."""
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    codes: set[str] = set()
    for first_cell in re.findall(r"^\| ([^|]+) \|", section, flags=re.M):
        codes |= {c for c in re.findall(r"`([a-z0-9-]+)`", first_cell)}
    return codes - {"code"}


def test_report_schema_doc_lists_every_finding_code_and_the_inconclusive_verdict() -> None:
    schema = (ROOT / "docs" / "report-schema.md").read_text(encoding="utf-8")
    assert '"healthy"' in schema and "`null`" in schema and "inconclusive" in schema
    documented = _table_codes(schema, "### Finding codes")
    readme_codes = _table_codes(README.read_text(encoding="utf-8"), "## Findings")
    assert {"nonfinite", "gradient-spike", "vanishing-gradient"} <= readme_codes
    assert readme_codes <= documented, readme_codes - documented
    # the codes schema 1 gained this turn
    new = {"exploding-through-time", "vanishing-through-time", "zero-init", "weight-decay", "l1-not-sparse"}
    assert new | {"train-mode-inference", "overfitting"} <= documented
