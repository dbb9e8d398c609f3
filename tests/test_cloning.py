"""`keras.models.clone_model` keeps the margin-aware class (`cloning.py`)."""

import keras
import numpy as np
import pytest

import keras_lsoftmax
from keras_lsoftmax import LSoftmaxDense
from tests.datasets import random_classification

D, C = 6, 4


def _ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _sequential():
    return keras_lsoftmax.Sequential(
        [keras.Input((D,), name="features"), LSoftmaxDense(C, margin=2, name="head")],
        name="net",
    )


def _functional():
    inputs = keras.Input((D,), name="features")
    return keras_lsoftmax.Model(inputs, LSoftmaxDense(C, margin=2)(inputs))


@keras.saving.register_keras_serializable(package="tests")
class ClonableNet(keras_lsoftmax.Model):
    def __init__(self, units=C, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.head = LSoftmaxDense(units, margin=2)

    def call(self, inputs):
        return self.head(inputs)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class MySequential(keras_lsoftmax.Sequential):
    pass


@pytest.mark.parametrize(
    "build",
    [
        _sequential,
        _functional,
        ClonableNet,
        lambda: MySequential([keras.Input((D,)), LSoftmaxDense(C)]),
    ],
    ids=["sequential", "functional", "subclassed", "sequential_subclass"],
)
def test_clone_keeps_the_class_and_trains_with_the_margin(build):
    keras.utils.set_random_seed(0)
    x, y = random_classification(16, D, C, seed=0)
    model = build()
    model(x[:1])
    model.compile(keras.optimizers.SGD(0.1), _ce(), metrics=["accuracy"])
    clone = keras.models.clone_model(model)
    assert type(clone) is type(model)
    logs = clone.fit(x, y, verbose=0).history if clone.compiled else None
    if logs is None:
        clone.compile(keras.optimizers.SGD(0.1), _ce(), metrics=["accuracy"])
        logs = clone.fit(x, y, verbose=0).history
    assert 0 < logs["lsoftmax_theta"][0] < 180
    assert "accuracy" in logs


def test_sequential_clone_keeps_input_name_compile_and_new_weights():
    keras.utils.set_random_seed(1)
    model = _sequential()
    model.compile(keras.optimizers.SGD(0.1), _ce(), metrics=["accuracy"])
    clone = keras.models.clone_model(model)
    assert clone.name == "net"
    assert clone.inputs[0].name == "features"
    assert clone.compiled
    assert clone.get_compile_config() == model.get_compile_config()
    assert [layer.name for layer in clone.layers] == ["head"]
    # Cloning makes new weights, as for keras.Sequential.
    assert clone.layers[0].kernel is not model.layers[0].kernel


def test_clone_function_reusing_layers_is_honoured():
    model = _sequential()
    clone = keras.models.clone_model(model, clone_function=lambda layer: layer)
    assert type(clone) is keras_lsoftmax.Sequential
    assert clone.layers[0] is model.layers[0]


def test_plain_models_clone_as_before():
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(C)])
    assert type(keras.models.clone_model(model)) is keras.Sequential
    np.testing.assert_array_equal(
        keras.models.clone_model(model).layers[0].kernel.shape, (D, C)
    )
