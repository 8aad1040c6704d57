"""Vanishing gradients: a deep sigmoid stack with N(0, 0.01) weights, then the fix (ReLU + Kaiming).

Run ``python demos/vanishing.py`` (the same as ``gradscope demo vanishing``); it exits 0 when
the example reached its expected outcome.  The example lives in gradscope/examples.py.
"""

import shutil
import sys

from gradscope.examples import run_demo

if __name__ == "__main__":
    sys.exit(run_demo("vanishing", width=min(120, shutil.get_terminal_size((100, 24)).columns)))
