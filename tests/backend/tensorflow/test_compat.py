"""Tests of `keras_lsoftmax.backend.tensorflow.compat`, the private names.

Each wrapper gives TensorFlow's answer while the private name exists, and
the answer that keeps the ops on their plain path once it is gone.
"""

import pytest

tf = pytest.importorskip("tensorflow")

from keras_lsoftmax.backend.tensorflow import compat  # noqa: E402

pytestmark = pytest.mark.tensorflow


def _traced_in_xla_context(jit_compile: bool) -> bool:
    seen = []

    @tf.function(jit_compile=jit_compile)
    def fn(x):
        seen.append(compat.in_xla_context())
        return x

    fn(tf.constant(1.0))
    return seen[0]


def test_in_xla_context_tells_compiled_traces_apart():
    assert _traced_in_xla_context(jit_compile=True)
    assert not _traced_in_xla_context(jit_compile=False)


def test_in_xla_context_without_the_private_module(monkeypatch):
    monkeypatch.setattr(compat, "_control_flow_util", None)
    assert _traced_in_xla_context(jit_compile=False)


def test_kernels_and_determinism(monkeypatch):
    assert "CPU" in compat.kernel_device_types("XlaLaunch")
    assert not compat.op_determinism_enabled()
    monkeypatch.setattr(compat, "_is_op_determinism_enabled", lambda: True)
    assert compat.op_determinism_enabled()


def test_kernels_and_determinism_without_the_private_modules(monkeypatch):
    monkeypatch.setattr(compat, "_kernels", None)
    assert compat.kernel_device_types("XlaLaunch") == set()
    assert compat.op_determinism_enabled()


def test_one_worker_is_not_several():
    assert not compat.several_workers(tf.distribute.get_strategy())
    assert not compat.several_workers(tf.distribute.OneDeviceStrategy("/cpu:0"))
