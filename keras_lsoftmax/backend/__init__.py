"""The backend implementations of the op and the train step.

`keras.backend.backend()` chooses one at import, as Keras and keras-rs do:
`tensorflow/`, `jax/` or `torch/`, each with an `ops` module (the margin op
and its analytic gradient, see `keras_lsoftmax.ops` for the math), a
`tracing` module (a model call traced for its structure only, for the label
routing) and a `trainer` module (the train and test steps that hand the
labels to the heads, imported by `keras_lsoftmax.models`). Only the chosen
backend is imported.
"""

import keras

BACKEND = keras.backend.backend()

if BACKEND == "tensorflow":
    from keras_lsoftmax.backend.tensorflow import ops
    from keras_lsoftmax.backend.tensorflow import tracing
elif BACKEND == "jax":
    from keras_lsoftmax.backend.jax import ops
    from keras_lsoftmax.backend.jax import tracing
elif BACKEND == "torch":
    from keras_lsoftmax.backend.torch import ops
    from keras_lsoftmax.backend.torch import tracing
else:
    raise ImportError(
        "keras_lsoftmax supports the Keras backends 'tensorflow', 'jax' and "
        f"'torch'. Received: KERAS_BACKEND={BACKEND!r}"
    )

__all__ = ["BACKEND", "ops", "tracing"]
