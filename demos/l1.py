"""L1 by subgradient (the penalty in the loss) never makes weights exactly zero (l1-not-sparse);
the soft-threshold step S_ηλ after optimizer.step() does.

Run ``python demos/l1.py`` (the same as ``gradscope demo l1``); it exits 0 when
the example reached its expected outcome.  The example lives in gradscope/regularisation_examples.py.
"""

import shutil
import sys

from gradscope.examples import run_demo

if __name__ == "__main__":
    sys.exit(run_demo("l1", width=min(120, shutil.get_terminal_size((100, 24)).columns)))
