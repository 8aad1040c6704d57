"""The regularisation demos (``gradscope demo weight-decay|l1|dropout|early-stopping``): each finds its
lesson, the fix works, and the numbers they print agree with the closed forms."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from gradscope.examples import run_example
from gradscope.regularisation_examples import REGULARISATION_EXAMPLES

WIDTH = 80
pytestmark = pytest.mark.slow  # four short training runs: ~15 s together on a loaded 2-core machine


@pytest.fixture(scope="module")
def outcomes() -> dict:
    results = {}
    for name in REGULARISATION_EXAMPLES:
        lines: list[str] = []
        results[name] = (run_example(name, write=lines.append, width=WIDTH), "\n".join(lines).splitlines())
    return results


@pytest.mark.parametrize("name", list(REGULARISATION_EXAMPLES))
def test_demo_reaches_its_outcome(name: str, outcomes: dict) -> None:
    outcome, lines = outcomes[name]
    assert outcome.ok, outcome.problems
    for report in outcome.before.values():
        assert outcome.expected <= report.codes()
    for report in outcome.after.values():
        assert not (outcome.expected & report.codes())
    assert any(line.startswith("Outcome: as expected") for line in lines)
    assert max(len(line) for line in lines) <= WIDTH


def test_weight_decay_demo_shrinks_the_weights(outcomes: dict) -> None:
    outcome, lines = outcomes["weight-decay"]
    (none_first, none_last), (decay_first, decay_last) = outcome.extra["norms"][0.0], outcome.extra["norms"][0.02]
    assert none_first == decay_first  # same initial weights
    assert decay_last < none_last
    assert any("1−ηλ=0.99" in line for line in lines)


def test_early_stopping_demo_stops_at_the_finding(outcomes: dict) -> None:
    outcome, _ = outcomes["early-stopping"]
    stopped = outcome.extra["stopped_report"]
    assert stopped.analysis["regularisation"]["stopped_at_step"] < 300
    assert "overfitting" in stopped.codes()


def test_demo_files_run_the_examples(capsys: pytest.CaptureFixture[str]) -> None:
    demos = Path(__file__).parent.parent / "demos"
    for name in REGULARISATION_EXAMPLES:
        path = demos / f"{name.replace('-', '_')}.py"
        assert path.is_file(), path
        assert f'run_demo("{name}"' in path.read_text()
    with pytest.raises(SystemExit) as exit_info:  # the file as a script, in this process (no torch re-import)
        runpy.run_path(str(demos / "dropout.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert "train-mode-inference" in capsys.readouterr().out
