"""How many threads TensorFlow gives one scoring call, set before its runtime starts.

The detector's call advances up to a few thousand streams by one step. Measured here on 2 cores,
one thread (against one per core) took 30-45 % less CPU per call at 1,000 streams and was as
fast or faster in wall time up to about 2,000; beyond that two threads finish sooner at the same
CPU. The CPU left is what the Kafka client's threads, the broker and other processes on the
machine get.
"""

from __future__ import annotations

import os


def limit_tf_threads(n: int) -> bool:
    """Use ``n`` threads inside each TensorFlow operation (0 = TensorFlow's default, one per
    core). Returns False when TensorFlow had already started in this process (e.g. a model was
    fitted here), where it can no longer change."""
    if n <= 0:
        return True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
    except RuntimeError:
        return tf.config.threading.get_intra_op_parallelism_threads() == n
    return True


def require_tf_threads(n: int) -> None:
    """:func:`limit_tf_threads`, for a process that times the detector's engine: measuring it
    with other threads than the detector runs with would be a wrong figure, so refuse."""
    if not limit_tf_threads(n):
        raise RuntimeError("TensorFlow started before detector.tf_threads could apply")
