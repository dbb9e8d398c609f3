"""The labels of the whole batch under a `tf.distribute` strategy.

A strategy runs the step once per replica, each on its part of the global
batch. A sampling head must keep the classes labelled anywhere in the
global batch, and the same random negatives on every replica (the replicas
read one seed state), so that the replicas' softmaxes cover the same classes
and their summed gradients are those of one device's step on the whole
batch. The replicas' labels are gathered as Partial FC gathers them
across devices. Parts of different sizes (an uneven last batch) are fine.

Under XLA (`jit_compile=True`) with several replicas the random draw cannot
run: TensorFlow 2.21 compiles each replica's step where it cannot read that
replica's copy of the seed state, and Keras's own seeded layers (`Dropout`
with a `seed`) fail there with "Trying to access resource ... located in
device CPU:1 from device CPU:0". The gather raises a clear error first.
"""

from typing import Any

import tensorflow as tf

from keras_lsoftmax.backend.tensorflow.compat import in_xla_context


def global_labels(labels: Any) -> Any:
    """The labels of every replica, int (B_global,), replica by replica."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return labels
    if in_xla_context():
        raise ValueError(
            "A head with sample_rate < 1 cannot train under XLA on "
            f"{context.num_replicas_in_sync} tf.distribute replicas: "
            "TensorFlow cannot read the replicas' seed state in an "
            "XLA-compiled step (Keras's seeded Dropout fails there too). "
            "Compile the model with jit_compile=False. Received: "
            "jit_compile=True"
        )
    return context.all_gather(labels, axis=0)
