"""The initializer of the row-per-class kernels of the margin heads."""

from typing import Any

import keras

from keras_lsoftmax.backend import ops as backend_ops


@keras.saving.register_keras_serializable(package="keras_lsoftmax")
class TransposedInitializer(keras.initializers.Initializer):
    """Calls `initializer` with the Dense shape and stores the transpose.

    A head stores its kernel (units, input_dim), one row per class; the
    wrapped initializer sees (input_dim, units), so its fan-in and fan-out
    mean what they mean for `keras.layers.Dense`. An `Initializer` object
    (not a bound method) is what Keras's JAX backend needs to compile the
    initialization of a variable sharded by a `keras.distribution` layout.

    Args:
        initializer: a `keras.initializers.Initializer` (or anything
            `keras.initializers.get` accepts).
    """

    def __init__(self, initializer: Any):
        self.initializer = keras.initializers.get(initializer)

    def __call__(self, shape: tuple, dtype: Any = None) -> Any:
        units, input_dim = shape
        dense_kernel = self.initializer((input_dim, units), dtype=dtype)
        return backend_ops.row_major(keras.ops.transpose(dense_kernel))

    def get_config(self) -> dict[str, Any]:
        return {
            "initializer": keras.initializers.serialize(self.initializer)
        }
