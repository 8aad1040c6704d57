"""Xavier vs Kaiming vs PyTorch's default init at depth 30 with ReLU: gradient RMS across depth.

Run ``python demos/init.py`` (the same as ``gradscope demo init``); it exits 0 when
the example reached its expected outcome.  The example lives in gradscope/examples.py.
"""

import shutil
import sys

from gradscope.examples import run_demo

if __name__ == "__main__":
    sys.exit(run_demo("init", width=min(120, shutil.get_terminal_size((100, 24)).columns)))
