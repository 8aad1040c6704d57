"""A training run whose learning rate is too high: gradscope.watch sees the
gradient spike, stops at the first NaN, and recommends a clip threshold; the
rerun with that clipping stays finite.

    python demos/training_nan.py [LOGDIR]     # then: gradscope dashboard LOGDIR
"""

import sys

from gradscope.training_demo import run_training_demo

if __name__ == "__main__":
    first, second = run_training_demo(sys.argv[1] if len(sys.argv) > 1 else None)
    sys.exit(0 if first.stopped is not None and second.finite else 1)
