"""detector.tf_threads applies before TensorFlow starts, and says so when it can no longer."""

from __future__ import annotations

import subprocess
import sys

CODE = """
from pipeline.tf_threads import limit_tf_threads
import tensorflow as tf
print(limit_tf_threads(1), tf.config.threading.get_intra_op_parallelism_threads())
tf.constant(1.0) + 1.0  # the runtime starts
print(limit_tf_threads(1), limit_tf_threads(2), limit_tf_threads(0))
from pipeline.tf_threads import require_tf_threads
require_tf_threads(1)
try:
    require_tf_threads(2)
except RuntimeError as exc:
    print("refused:", exc)
"""


def test_threads_are_set_before_the_runtime_starts_and_refused_after() -> None:
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    before, after, refused = done.stdout.split("\n")[-4:-1]
    assert before == "True 1"
    assert after == "True False True"  # the same count holds; another cannot apply; 0 asks nothing
    assert refused == "refused: TensorFlow started before detector.tf_threads could apply"
