"""The private TensorFlow and Keras names the TensorFlow backend uses.

Each entry says what it is, why the package needs it, the versions it was
checked on and the upstream behaviour it works around. Every one falls back
to the package's plain path when the private name is missing, so that a
TensorFlow or Keras release that moves it costs speed, never correctness.

Checked on TensorFlow 2.21.0 and Keras 3.15.1.
"""

from typing import Any

import keras
import tensorflow as tf

# TensorFlow has no public test for "this graph is compiled by XLA"
# (`jit_compile=True`, TPU); `tf.function` and `tf.while_loop` use this
# private module (the only other way in, seen in tensorflow/tensorflow#63632,
# is the equally internal `tf.__internal__.get_enclosing_xla_context`).
try:
    from tensorflow.python.ops import control_flow_util as _control_flow_util
except ImportError:
    _control_flow_util = None

# TensorFlow has no public list of the registered kernels of an op, nor a
# public getter for `tf.config.experimental.enable_op_determinism`.
try:
    from tensorflow.python.framework import kernels as _kernels
    from tensorflow.python.framework.config import (
        is_op_determinism_enabled as _is_op_determinism_enabled,
    )
except ImportError:
    _kernels = _is_op_determinism_enabled = None


def in_xla_context() -> bool:
    """Whether the graph being traced (or one it is nested in) is XLA-compiled.

    The ops pick `tf.tensor_scatter_nd_add` under XLA, a faster raw op
    elsewhere, and compile their own forward pass only outside XLA. Uses
    `tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext`;
    without it, True: the path XLA accepts works everywhere.
    """
    if _control_flow_util is None:
        return True
    graph = tf.compat.v1.get_default_graph()
    return _control_flow_util.GraphOrParentsInXlaContext(graph)


def op_determinism_enabled() -> bool:
    """Whether `tf.config.experimental.enable_op_determinism()` is in force.

    The ops compile their forward pass with XLA only when it is off (XLA
    gives no determinism guarantee). Uses
    `tensorflow.python.framework.config.is_op_determinism_enabled`; without
    it (or without `kernel_device_types`), True: keep to plain kernels.
    """
    if _kernels is None or _is_op_determinism_enabled is None:
        return True
    return _is_op_determinism_enabled()


def kernel_device_types(op_name: str) -> set[str]:
    """The device types ("CPU", "GPU") with a kernel registered for `op_name`.

    The ops compile their forward pass only where TensorFlow has an
    `XlaLaunch` kernel for the CPU. Uses
    `tensorflow.python.framework.kernels.get_registered_kernels_for_op`;
    without it, the empty set.
    """
    if _kernels is None:
        return set()
    registered = _kernels.get_registered_kernels_for_op(op_name)
    return {kernel.device_type for kernel in registered.kernel}


def several_workers(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` is a `MultiWorkerMirroredStrategy` of 2+ workers.

    There Keras 3.15 reduces across workers in ways that fail: the first
    batch in `LocalBatchBuild` and the step's logs in the trainer.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    cluster = strategy.cluster_resolver.cluster_spec()
    return bool(cluster.jobs) and cluster.num_tasks("worker") > 1


class LocalBatchBuild:
    """Builds a model trained on several workers from one worker's batch.

    Overrides Keras's private `Trainer._maybe_symbolic_build` and calls its
    private `_symbolic_build` (Keras 3.15.1). Keras builds a distributed
    model from a first batch averaged over the replicas, a reduction that
    fails across workers (keras-team/keras#20585,
    tensorflow/tensorflow#72388); the build needs only shapes and dtypes,
    which one worker's batch has. Without `_symbolic_build`, Keras's own
    build runs.
    """

    def _maybe_symbolic_build(
        self, iterator: Any = None, data_batch: Any = None
    ) -> None:
        strategy = self.distribute_strategy
        build = getattr(self, "_symbolic_build", None)
        if iterator is None or build is None or not several_workers(strategy):
            return super()._maybe_symbolic_build(iterator, data_batch)
        for _, _, batches in iterator:
            data_batch = keras.tree.map_structure(
                lambda v: strategy.experimental_local_results(v)[0],
                next(batches),
            )
            break
        with strategy.scope():
            build(data_batch=data_batch)
