"""A big network on 12 noisy points overfits: gradscope names the best step, and
watch(..., stop_on=("overfitting",)) stops there; the checkpoint kept at the best step is the best.

Run ``python demos/early_stopping.py`` (the same as ``gradscope demo early-stopping``); it exits 0 when
the example reached its expected outcome.  The example lives in gradscope/regularisation_examples.py.
"""

import shutil
import sys

from gradscope.examples import run_demo

if __name__ == "__main__":
    sys.exit(run_demo("early-stopping", width=min(120, shutil.get_terminal_size((100, 24)).columns)))
