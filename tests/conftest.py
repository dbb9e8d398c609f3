"""Backend selection for the test suite.

The suite runs under the Keras backend of `KERAS_BACKEND` (TensorFlow by
default). A test marked `tensorflow`, `jax` or `torch` runs only under the
backends it is marked with; every other test runs under each backend.
"""

import keras
import pytest

BACKENDS = ("tensorflow", "jax", "torch")


def pytest_collection_modifyitems(config, items):
    del config
    backend = keras.backend.backend()
    for item in items:
        marked = [name for name in BACKENDS if item.get_closest_marker(name)]
        if marked and backend not in marked:
            item.add_marker(
                pytest.mark.skip(
                    reason=f"runs on {', '.join(marked)}; backend is {backend}"
                )
            )
