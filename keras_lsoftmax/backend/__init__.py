"""The backend implementations of the op and the train step.

This is the one place that chooses a backend: `keras.backend.backend()`
picks one at import, as Keras and keras-rs do: `tensorflow/`, `jax/` or
`torch/`, each with an `ops` module (the margin op and its analytic
gradient, see `keras_lsoftmax.ops` for the math), a `replicas` module
(the labels of the whole batch, for the class sampling), a `rows` module
(the row updates of `keras_lsoftmax.optimizers`), a `tracing` module (a
model call traced for its structure only, for the label routing) and a
`trainer` module whose trainer class is named after the backend
(`TensorFlowMarginTrainer`, `JaxMarginTrainer`, `TorchMarginTrainer`); it is
exported here as `MarginTrainer`, the base of
`keras_lsoftmax.MarginTrainingMixin`. The private TensorFlow and Keras names
a backend uses live in its `compat` module. Only the chosen backend is
imported; any other raises an ImportError naming it.
"""

import keras

BACKEND = keras.backend.backend()

# `ops` and `tracing` first: the trainer's imports read them from here.
if BACKEND == "tensorflow":
    from keras_lsoftmax.backend.tensorflow import ops
    from keras_lsoftmax.backend.tensorflow import replicas
    from keras_lsoftmax.backend.tensorflow import rows
    from keras_lsoftmax.backend.tensorflow import tracing
    from keras_lsoftmax.backend.tensorflow.trainer import (
        TensorFlowMarginTrainer as MarginTrainer,
    )
elif BACKEND == "jax":
    from keras_lsoftmax.backend.jax import ops
    from keras_lsoftmax.backend.jax import replicas
    from keras_lsoftmax.backend.jax import rows
    from keras_lsoftmax.backend.jax import tracing
    from keras_lsoftmax.backend.jax.trainer import (
        JaxMarginTrainer as MarginTrainer,
    )
elif BACKEND == "torch":
    from keras_lsoftmax.backend.torch import ops
    from keras_lsoftmax.backend.torch import replicas
    from keras_lsoftmax.backend.torch import rows
    from keras_lsoftmax.backend.torch import tracing
    from keras_lsoftmax.backend.torch.trainer import (
        TorchMarginTrainer as MarginTrainer,
    )
else:
    raise ImportError(
        "keras_lsoftmax supports the Keras backends 'tensorflow', 'jax' and "
        f"'torch'. Received: KERAS_BACKEND={BACKEND!r}"
    )

__all__ = ["BACKEND", "MarginTrainer", "ops", "replicas", "rows", "tracing"]
