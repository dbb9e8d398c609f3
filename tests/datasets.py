"""Where the tests find the real MNIST.

The development checkout and CI keep `shared/data/mnist.npz` beside the
repository; `KERAS_LSOFTMAX_MNIST` points elsewhere.
"""

import os
import pathlib

_BESIDE_REPO = pathlib.Path(__file__).resolve().parents[2] / "shared"
MNIST_PATH = os.environ.get(
    "KERAS_LSOFTMAX_MNIST", str(_BESIDE_REPO / "data" / "mnist.npz")
)
