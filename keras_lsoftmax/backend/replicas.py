"""The labels of the whole batch, for a head that samples classes.

Partial FC keeps every class labelled in the global batch, so that each
data-parallel replica computes its softmax over the same classes. On JAX
and PyTorch a Keras `fit` step sees the whole batch (JAX's `DataParallel`
shards one global computation), so a replica's labels are the batch's.
TensorFlow's strategies run one step per replica, each on its part of the
batch: `keras_lsoftmax.backend.tensorflow.replicas` gathers them.
"""

from typing import Any


def global_labels(labels: Any) -> Any:
    """`labels`, int (B,): the step already sees the whole batch."""
    return labels
