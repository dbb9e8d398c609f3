"""The backend split: one implementation per Keras backend, chosen at import."""

import importlib.util
import os
import subprocess
import sys

import keras
import pytest

import keras_lsoftmax
from keras_lsoftmax import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# fit, evaluate and predict of a margin model, with seeded initializers only
# (`keras.utils.set_random_seed` seeds TensorFlow too, and so imports it).
_TRAIN_WITHOUT_TENSORFLOW = """
import sys
import numpy as np
import keras
import keras_lsoftmax

init = keras.initializers.GlorotUniform(seed=1)
model = keras_lsoftmax.Sequential([
    keras.Input((6,)),
    keras.layers.Dense(8, activation="relu", kernel_initializer=init),
    keras_lsoftmax.LSoftmaxDense(3, kernel_initializer=init),
])
model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
rng = np.random.default_rng(0)
x = rng.normal(size=(32, 6)).astype("float32")
y = rng.integers(0, 3, size=32)
schedule = keras_lsoftmax.schedules.InverseDecay(100.0, 0.5, 1.0)
model.fit(x, y, batch_size=8, verbose=0,
          callbacks=[keras_lsoftmax.LambdaScheduler(schedule)])
model.evaluate(x, y, verbose=0)
model.predict(x, verbose=0)
print(keras.backend.backend(), "tensorflow" in sys.modules)
"""


def test_the_backend_of_keras_is_used():
    assert backend.BACKEND == keras.backend.backend()
    module = backend.ops.__name__
    assert module == f"keras_lsoftmax.backend.{keras.backend.backend()}.ops"


# In a subprocess: a user's process, where nothing blocks TensorFlow.
@pytest.mark.parametrize(
    "name",
    [
        pytest.param("jax", marks=pytest.mark.jax),
        pytest.param("torch", marks=pytest.mark.torch),
    ],
)
def test_training_on_jax_and_torch_does_not_import_tensorflow(name):
    result = subprocess.run(
        [sys.executable, "-c", _TRAIN_WITHOUT_TENSORFLOW],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "KERAS_BACKEND": name},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == [name, "False"]


@pytest.mark.skipif(
    importlib.util.find_spec("scipy") is None,
    reason="Keras's numpy backend needs scipy (the jax extra installs it)",
)
def test_an_unsupported_backend_is_named():
    result = subprocess.run(
        [sys.executable, "-c", "import keras_lsoftmax"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "KERAS_BACKEND": "numpy"},
    )
    assert result.returncode != 0
    assert "KERAS_BACKEND='numpy'" in result.stderr
    assert "'tensorflow', 'jax' and 'torch'" in result.stderr


def test_public_api_is_the_same_on_every_backend():
    assert sorted(keras_lsoftmax.__all__) == sorted(
        [
            "ArcFaceDense",
            "CosFaceDense",
            "LambdaScheduler",
            "LSoftmaxDense",
            "MarginDense",
            "MarginTrainingMixin",
            "Model",
            "Sequential",
            "SphereFaceDense",
            "__version__",
            "label_scope",
            "margins",
            "ops",
            "schedules",
        ]
    )
