"""Row updates of an optimizer's variables on TensorFlow.

Outside XLA the touched rows are gathered, updated and scattered back: the
work is proportional to the touched rows. A `tf.IndexedSlices` gradient
(the gradient of a gather, as a sampling head's kernel gets) names its rows;
a repeated row's slices are summed first. Under XLA, whose shapes are
static, the masked update of `keras_lsoftmax.backend.rows`.
"""

from typing import Any, Callable, Sequence

import keras
import tensorflow as tf

from keras_lsoftmax.backend.rows import update_masked_rows
from keras_lsoftmax.backend.tensorflow.compat import in_xla_context


def update_rows(
    optimizer: keras.optimizers.Optimizer,
    step: Callable[..., Sequence[Any]],
    gradient: Any,
    variables: Sequence[keras.Variable],
) -> None:
    """See `keras_lsoftmax.backend.rows.update_masked_rows`."""
    if in_xla_context() or len(variables[0].shape) == 0:
        gradient = tf.convert_to_tensor(gradient)
        return update_masked_rows(optimizer, step, gradient, variables)
    indices, rows = _touched_rows(gradient)
    rows = tf.cast(rows, variables[0].dtype)
    # Keras hands the update step a `tf.Variable` under a distribution
    # strategy's update, its own variables (the slots) elsewhere.
    variables = [
        v.value if isinstance(v, keras.Variable) else v for v in variables
    ]
    old = [tf.gather(v, indices) for v in variables]
    for variable, new in zip(variables, step(rows, *old)):
        variable.scatter_update(tf.IndexedSlices(new, indices))


def _touched_rows(gradient: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """The rows of `gradient` with a non-zero entry, and their gradient."""
    if isinstance(gradient, tf.IndexedSlices):
        indices, positions = tf.unique(gradient.indices)
        rows = tf.math.unsorted_segment_sum(
            gradient.values, positions, tf.shape(indices)[0]
        )
    else:
        rows = tf.convert_to_tensor(gradient)
        indices = tf.range(tf.shape(rows)[0])
    flat = tf.reshape(rows, [tf.shape(rows)[0], -1])
    kept = tf.reshape(tf.where(tf.reduce_any(flat != 0, axis=1)), [-1])
    return tf.gather(indices, kept), tf.gather(rows, kept)
