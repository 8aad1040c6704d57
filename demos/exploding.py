"""Exploding gradients: a deep ReLU stack with N(0, 1) weights, then the fix (Kaiming init).

Run ``python demos/exploding.py`` (the same as ``gradscope demo exploding``); it exits 0 when
the example reached its expected outcome.  The example lives in gradscope/examples.py.
"""

import shutil
import sys

from gradscope.examples import run_demo

if __name__ == "__main__":
    sys.exit(run_demo("exploding", width=min(120, shutil.get_terminal_size((100, 24)).columns)))
