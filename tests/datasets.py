"""Data for the tests: the real MNIST, and small random problems.

The development checkout and CI keep `shared/data/mnist.npz` beside the
repository; `KERAS_LSOFTMAX_MNIST` points elsewhere.
"""

import os
import pathlib

import numpy as np

_BESIDE_REPO = pathlib.Path(__file__).resolve().parents[2] / "shared"
MNIST_PATH = os.environ.get(
    "KERAS_LSOFTMAX_MNIST", str(_BESIDE_REPO / "data" / "mnist.npz")
)


def random_classification(n: int, features: int, classes: int, seed: int = 0):
    """`n` float32 feature rows and int32 labels in [0, classes)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = rng.integers(0, classes, size=n).astype("int32")
    return x, y
