"""Backend selection and isolation for the test suite.

The suite runs under the Keras backend of `KERAS_BACKEND` (TensorFlow by
default). A test marked `tensorflow`, `jax` or `torch` runs only under the
backends it is marked with; every other test runs under each backend.

One process, one framework: two of them in one process can crash it
(TensorFlow and the `triton` that CUDA builds of PyTorch bring segfault
together). So the test process cannot import the frameworks of the other
backends; a test that needs one runs it in a subprocess. The one exception
is TensorFlow under JAX: Keras's own JAX export goes through `jax2tf`, and
`keras.utils.set_random_seed` seeds TensorFlow whenever it is installed.

No test may change `KERAS_BACKEND` for the tests after it: a test that
leaves it changed fails, and the variable is put back.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys

import pytest

BACKENDS = ("tensorflow", "jax", "torch")

# Top-level packages the test process may not import, by suite backend.
_FOREIGN = {
    "tensorflow": ("jax", "jaxlib", "torch", "triton"),
    "jax": ("torch", "triton"),
    "torch": ("tensorflow", "jax", "jaxlib"),
}


def _configured_backend():
    """The backend Keras will choose, read before Keras is imported.

    Keras imports JAX whenever it is installed (for its Orbax callback), so
    the frameworks are blocked before Keras is imported.
    """
    if "KERAS_BACKEND" in os.environ:
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras"))
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


BACKEND = _configured_backend()


class _ForeignFrameworkBlocker(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes `import NAME` fail for the frameworks of the other backends.

    `find_spec` still finds an installed framework (PyTorch's compiler and
    some tests probe for packages that way); only loading it fails.
    """

    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] not in self.names:
            return None
        found = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if found is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=found.origin)

    def create_module(self, spec):
        raise ModuleNotFoundError(
            f"the test process runs KERAS_BACKEND={BACKEND} and does not "
            f"import {spec.name!r}: run that code in a subprocess",
            name=spec.name,
        )

    def exec_module(self, module):
        del module


def _block_foreign_frameworks():
    names = _FOREIGN.get(BACKEND, ())
    loaded = sorted(name for name in names if name in sys.modules)
    if loaded:
        raise RuntimeError(
            f"{loaded} imported before the tests under KERAS_BACKEND={BACKEND}"
        )
    sys.meta_path.insert(0, _ForeignFrameworkBlocker(names))


_block_foreign_frameworks()

import keras  # noqa: E402 (after the blocker)

if keras.backend.backend() != BACKEND:
    raise RuntimeError(
        f"Keras chose the backend {keras.backend.backend()!r}, the tests "
        f"expected {BACKEND!r}: set KERAS_BACKEND"
    )


def pytest_collection_modifyitems(config, items):
    del config
    for item in items:
        marked = [name for name in BACKENDS if item.get_closest_marker(name)]
        if marked and BACKEND not in marked:
            item.add_marker(
                pytest.mark.skip(
                    reason=f"runs on {', '.join(marked)}; backend is {BACKEND}"
                )
            )


@pytest.fixture(autouse=True)
def _keras_backend_variable_unchanged():
    before = os.environ.get("KERAS_BACKEND")
    yield
    after = os.environ.get("KERAS_BACKEND")
    if after == before:
        return
    if before is None:
        del os.environ["KERAS_BACKEND"]
    else:
        os.environ["KERAS_BACKEND"] = before
    pytest.fail(f"the test changed KERAS_BACKEND from {before!r} to {after!r}")
