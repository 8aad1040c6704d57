"""Dropout keeps E[x'] = x in training (within the binomial sampling error) and is the identity at
inference; validating under torch.no_grad() without model.eval() is train-mode-inference.

Run ``python demos/dropout.py`` (the same as ``gradscope demo dropout``); it exits 0 when
the example reached its expected outcome.  The example lives in gradscope/regularisation_examples.py.
"""

import shutil
import sys

from gradscope.examples import run_demo

if __name__ == "__main__":
    sys.exit(run_demo("dropout", width=min(120, shutil.get_terminal_size((100, 24)).columns)))
