"""`keras.models.clone_model` keeps the class of a margin-aware Sequential.

Keras clones every `keras.Sequential`, subclasses included, into a plain
`keras.Sequential` (functional and subclassed models keep their class). A
plain Sequential cannot train an `LSoftmaxDense`, so on import this package
wraps `keras.models.clone_model`: for a `keras_lsoftmax.Sequential` (or a
subclass of it) it returns the clone's layers in a model of the same class,
compiled as the clone is; every other model goes through Keras unchanged.
"""

import functools
from typing import Any

import keras

from keras_lsoftmax.models import Sequential

_KERAS_CLONE_MODEL = getattr(
    keras.models.clone_model, "__wrapped__", keras.models.clone_model
)


@functools.wraps(_KERAS_CLONE_MODEL)
def clone_model(model: Any, *args: Any, **kwargs: Any) -> Any:
    clone = _KERAS_CLONE_MODEL(model, *args, **kwargs)
    if isinstance(model, Sequential) and type(clone) is not type(model):
        clone = _recast(clone, type(model))
    return clone


def _recast(clone: keras.Sequential, cls: type) -> keras.Sequential:
    """The layers of the Sequential `clone` in a new model of class `cls`."""
    layers = list(clone.layers)
    if clone.built and clone.inputs:
        spec = clone.inputs[0]
        layers = [
            keras.Input(batch_shape=spec.shape, dtype=spec.dtype, name=spec.name)
        ] + layers
    model = cls(layers, name=clone.name, trainable=clone.trainable)
    if clone.compiled:
        model.compile_from_config(clone.get_compile_config())
    return model


keras.models.clone_model = clone_model
