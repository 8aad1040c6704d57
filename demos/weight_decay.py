"""Weight decay on a 10-unit network: Adam(weight_decay) coupling and decayed biases, the AdamW
parameter-group fix, and SGD's (1 − ηλ) per step shrinking the weights (the lecture's "weight decay 0.02").

Run ``python demos/weight_decay.py`` (the same as ``gradscope demo weight-decay``); it exits 0 when
the example reached its expected outcome.  The example lives in gradscope/regularisation_examples.py.
"""

import shutil
import sys

from gradscope.examples import run_demo

if __name__ == "__main__":
    sys.exit(run_demo("weight-decay", width=min(120, shutil.get_terminal_size((100, 24)).columns)))
