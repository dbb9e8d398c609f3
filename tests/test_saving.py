"""Saving (`.keras`, `.weights.h5`) and SavedModel export of the models.

`.keras` and weight files work on every backend. `model.export` writes a
TensorFlow SavedModel from TensorFlow and from JAX (through jax2tf, with
TensorFlow installed); from PyTorch it needs `torch_xla`, which the test
environment does not have.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_lsoftmax
from keras_lsoftmax import LSoftmaxDense
from keras_lsoftmax import schedules
from tests import cross_backend_worker
from tests.datasets import random_classification

BACKEND = keras.backend.backend()
D, H, C = 20, 16, 5
LAMBDA = 3.5


def _data(n=32, seed=0):
    return random_classification(n, D, C, seed)


def _layers():
    return [
        keras.layers.Dense(H, activation="relu", name="hidden"),
        LSoftmaxDense(C, margin=3, initial_lambda=10.0, name="head"),
    ]


def _sequential():
    return keras_lsoftmax.Sequential([keras.Input((D,), name="features"), *_layers()])


def _functional():
    inputs = keras.Input((D,), name="features")
    hidden, head = _layers()
    return keras_lsoftmax.Model(inputs, head(hidden(inputs)))


BUILDERS = {"sequential": _sequential, "functional": _functional}


def _trained(kind, x, y):
    """A compiled model after 2 Adam steps, with λ set to 3.5."""
    keras.utils.set_random_seed(1)
    model = BUILDERS[kind]()
    model.get_layer("head").set_lambda(LAMBDA)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    return model


def _continue(model, x, y):
    history = model.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    return [v.numpy() for v in model.weights], history.history


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_keras_file_round_trip(kind, tmp_path):
    x, y = _data()
    model = _trained(kind, x, y)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects

    expected_class = {
        "sequential": keras_lsoftmax.Sequential,
        "functional": keras_lsoftmax.Model,
    }[kind]
    assert isinstance(loaded, expected_class)
    assert type(loaded) is type(model)
    head = loaded.get_layer("head")
    assert isinstance(head, LSoftmaxDense)
    assert float(head.lambda_) == LAMBDA
    assert head.margin == 3
    # set_lambda made λ the constant that the file keeps.
    assert head.lambda_schedule is None
    assert head.get_config()["lambda_schedule"] == LAMBDA
    assert int(loaded.optimizer.iterations) == 2
    assert isinstance(loaded.optimizer, keras.optimizers.Adam)
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )

    # The optimizer state came back too: training goes on identically.
    weights, logs = _continue(model, x, y)
    loaded_weights, loaded_logs = _continue(loaded, x, y)
    for a, b in zip(loaded_weights, weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert int(loaded.optimizer.iterations) == 4
    assert set(loaded_logs) == {
        "accuracy",
        "loss",
        "lsoftmax_lambda",
        "lsoftmax_theta",
    }
    np.testing.assert_allclose(
        loaded_logs["loss"], logs["loss"], rtol=1e-6, atol=1e-6
    )
    assert loaded_logs["lsoftmax_lambda"] == [LAMBDA]


def test_weights_file_keeps_lambda(tmp_path):
    # Seeded once: the second model draws on from the same stream, so its
    # initial weights differ from the first model's.
    keras.utils.set_random_seed(2)
    x, _ = _data()
    model = _sequential()
    model.get_layer("head").set_lambda(LAMBDA)
    path = tmp_path / "m.weights.h5"
    model.save_weights(path)
    other = _sequential()
    assert float(other.get_layer("head").lambda_) == 10.0
    # Plain logits, independent of λ: without load_weights they differ.
    assert not np.allclose(
        other.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )
    other.load_weights(path)
    assert float(other.get_layer("head").lambda_) == LAMBDA
    np.testing.assert_array_equal(
        other.predict(x, verbose=0), model.predict(x, verbose=0)
    )


@pytest.mark.tensorflow
@pytest.mark.jax
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_export_serves_plain_logits(kind, tmp_path):
    import tensorflow as tf

    x, y = _data()
    model = _trained(kind, x, y)
    path = str(tmp_path / "exported")
    model.export(path, verbose=False)
    expected = model.predict(x, verbose=0)

    reloaded = tf.saved_model.load(path)
    np.testing.assert_allclose(reloaded.serve(x).numpy(), expected, atol=1e-6)

    signature = reloaded.signatures["serving_default"]
    args, kwargs = signature.structured_input_signature
    assert args == ()
    assert list(kwargs) == ["features"]  # one input: no labels
    assert kwargs["features"].shape.as_list() == [None, D]
    outputs = signature(features=tf.constant(x))
    np.testing.assert_allclose(outputs["output_0"].numpy(), expected, atol=1e-6)

    if BACKEND == "tensorflow":  # TFSMLayer exists on TensorFlow only
        layer = keras.layers.TFSMLayer(path, call_endpoint="serve")
        np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-6)


def test_loading_without_the_import_names_the_package(tmp_path):
    # Keras finds custom classes only once their package is imported; its
    # error then names the class and shows the keras_lsoftmax module.
    path = tmp_path / "model.keras"
    keras_lsoftmax.Sequential([keras.Input((3,)), LSoftmaxDense(2)]).save(path)
    script = (
        "import keras\n"
        "try:\n"
        f"    keras.saving.load_model({str(path)!r})\n"
        "except TypeError as error:\n"
        "    print(error)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Could not locate class 'Sequential'" in proc.stdout
    assert "keras_lsoftmax.models" in proc.stdout
    assert "keras_lsoftmax>Sequential" in proc.stdout


def _installed_backends():
    import importlib.util

    return [
        name
        for name, module in (
            ("tensorflow", "tensorflow"),
            ("jax", "jax"),
            ("torch", "torch"),
        )
        if importlib.util.find_spec(module) is not None
    ]


def _worker(folder, backend):
    env = {**os.environ, "KERAS_BACKEND": backend}
    subprocess.run(
        [sys.executable, "-m", "tests.cross_backend_worker", str(folder)],
        check=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        timeout=300,
    )


# Every installed backend saves in a subprocess of its own and loads the
# files saved before it; this suite's backend saves first and loads every
# file last, so each run checks its backend against all the others.
def test_keras_file_moves_between_backends(tmp_path):
    backends = _installed_backends()
    if len(backends) < 2:
        pytest.skip(f"only {backends} installed")
    others = [backend for backend in backends if backend != BACKEND]
    for backend in [BACKEND, *others]:
        _worker(tmp_path, backend)
    cross_backend_worker.load(tmp_path)
    checked = 0
    for saved in backends:
        expected = np.load(tmp_path / f"{saved}.npy")
        for loaded in backends:
            path = tmp_path / f"{saved}-on-{loaded}.npy"
            if BACKEND in (saved, loaded):
                assert path.exists(), path.name
            if path.exists():
                actual = np.load(path)
                np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)
                checked += 1
    assert checked >= 2 * len(backends) - 1


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "rmsprop", "adamw"])
def test_compile_config_names_public_optimizer_classes(optimizer, tmp_path):
    # On PyTorch, Keras's optimizers are backend classes; a file naming them
    # would import PyTorch wherever it is loaded.
    model = keras_lsoftmax.Sequential([keras.Input((3,)), LSoftmaxDense(2)])
    model.compile(
        keras.optimizers.get(optimizer),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    config = model.get_compile_config()["optimizer"]
    assert config["module"] == "keras.optimizers"
    assert config["registered_name"] is None
    model.save(tmp_path / "model.keras")
    restored = keras.saving.load_model(tmp_path / "model.keras")
    assert type(restored.optimizer) is type(model.optimizer)


def test_compile_config_of_a_loss_scale_optimizer_names_public_classes():
    model = keras_lsoftmax.Sequential([keras.Input((3,)), LSoftmaxDense(2)])
    model.compile(
        keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    config = model.get_compile_config()["optimizer"]
    assert config["class_name"] == "LossScaleOptimizer"
    assert config["config"]["inner_optimizer"]["module"] == "keras.optimizers"


def test_keras_file_resumes_the_auto_lambda_schedule(tmp_path):
    x, y = _data()

    def model():
        keras.utils.set_random_seed(2)
        net = keras_lsoftmax.Sequential(
            [
                keras.Input((D,)),
                keras.layers.Dense(H, activation="relu"),
                LSoftmaxDense(C, margin=3, name="head"),
            ]
        )
        net.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return net

    def fit(net, **kwargs):
        return net.fit(x, y, batch_size=8, shuffle=False, verbose=0, epochs=10, **kwargs)

    uninterrupted = fit(model()).history["lsoftmax_lambda"]
    interrupted = model()
    stop = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: setattr(interrupted, "stop_training", True)
    )
    assert fit(interrupted, callbacks=[stop]).history["lsoftmax_lambda"] == (
        uninterrupted[:1]
    )
    path = tmp_path / "m.keras"
    interrupted.save(path)
    loaded = keras.models.load_model(path)
    schedule = loaded.get_layer("head").lambda_schedule
    # Fitted to the 10 epochs of 4 steps of the first fit, not restarted.
    assert schedule.get_config() == schedules.auto_schedule(40).get_config()
    resumed = fit(loaded, initial_epoch=1).history["lsoftmax_lambda"]
    assert resumed == pytest.approx(uninterrupted[1:], rel=1e-6)
    assert uninterrupted[0] > uninterrupted[1] > uninterrupted[-1] == 2.0
