"""fp16 overflow and underflow, with the fixes: a block kept in fp32 (or bf16), and the loss scale.

Run ``python demos/fp16.py`` (the same as ``gradscope demo fp16``); it exits 0 when
the example reached its expected outcome.  The example lives in gradscope/examples.py.
"""

import shutil
import sys

from gradscope.examples import run_demo

if __name__ == "__main__":
    sys.exit(run_demo("fp16", width=min(120, shutil.get_terminal_size((100, 24)).columns)))
