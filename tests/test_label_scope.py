"""Tests of `keras_lsoftmax.label_scope`: which labels a layer call sees."""

import threading

import keras
import numpy as np
import pytest

import keras_lsoftmax
from keras_lsoftmax import LSoftmaxDense
from keras_lsoftmax import ops
from keras_lsoftmax import schedules
from keras_lsoftmax.label_scope import current_label_scope

label_scope = keras_lsoftmax.label_scope

B, D, UNITS = 4, 3, 3
LABELS = np.array([0, 1, 2, 0])
OTHER = np.array([2, 2, 1, 1])


def _np(tensor):
    # Also for PyTorch tensors that require grad, which NumPy cannot read.
    return keras.ops.convert_to_numpy(tensor)


@pytest.fixture
def layer():
    # A constant λ: these scopes give no optimizer step for a schedule.
    layer = LSoftmaxDense(
        UNITS,
        margin=4,
        lambda_schedule=0.0,
        kernel_initializer=keras.initializers.GlorotUniform(seed=0),
    )
    layer.build((None, D))
    return layer


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((B, D)).astype(np.float32)


def test_scope_is_open_only_inside_the_block():
    assert current_label_scope() is None
    with label_scope(LABELS) as scope:
        assert current_label_scope() is scope
    assert current_label_scope() is None


def test_scope_closes_on_error():
    with pytest.raises(RuntimeError):
        with label_scope(LABELS):
            raise RuntimeError("boom")
    assert current_label_scope() is None


def test_none_labels_rejected():
    with pytest.raises(ValueError, match="labels"):
        label_scope(None)


def test_innermost_scope_wins(layer, x):
    with label_scope(OTHER) as outer:
        with label_scope(LABELS) as inner:
            out = layer(x, training=True)
        assert current_label_scope() is outer
    np.testing.assert_array_equal(
        _np(out), _np(layer(x, labels=LABELS, training=True))
    )
    assert len(inner.records) == 1 and outer.records == []


def test_explicit_labels_take_precedence(layer, x):
    with label_scope(OTHER) as scope:
        out = layer(x, labels=LABELS, training=True)
    np.testing.assert_array_equal(
        _np(out), _np(layer(x, labels=LABELS, training=True))
    )
    np.testing.assert_array_equal(_np(scope.records[0].labels), LABELS)


@pytest.mark.parametrize("training", [False, None])
def test_inference_inside_scope_ignores_its_labels(layer, x, training):
    with label_scope(LABELS) as scope:
        out = layer(x, training=training)
    np.testing.assert_allclose(
        _np(out), x @ _np(layer.kernel).T, rtol=1e-6, atol=1e-6
    )
    assert scope.records == []


def test_inference_inside_scope_on_a_batch_of_another_size(layer, x):
    # The scope holds labels for B rows; inference on 2 rows needs none.
    model = keras_lsoftmax.Sequential([keras.Input((D,)), layer])
    plain = x[:2] @ _np(layer.kernel).T
    with label_scope(LABELS):
        called = model(x[:2], training=False)
        predicted = model.predict(x[:2], verbose=0)
        margin = model(x, training=True)
    np.testing.assert_allclose(_np(called), plain, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(predicted, plain, rtol=1e-6, atol=1e-6)
    # Training calls inside the same scope still take its labels.
    np.testing.assert_array_equal(
        _np(margin), _np(layer(x, labels=LABELS, training=True))
    )


def test_one_record_per_call(layer, x):
    with label_scope(LABELS) as scope:
        layer(x, training=True)
        layer(x, training=True)
    assert len(scope.records) == 2


def test_step_drives_an_attached_schedule(layer, x):
    schedule = schedules.InverseDecay(1000.0, 0.05, 1.0)
    iterations = keras.Variable(0, dtype="int32", trainable=False)
    layer.attach_lambda_schedule(schedule, iterations)
    # λ = schedule(step + 1), the step given to the scope ...
    with label_scope(LABELS, step=41) as scope:
        out = layer(x, training=True)
    lam = float(schedule(42))
    assert _np(layer.lambda_) == np.float32(lam)
    assert _np(scope.records[0].lam) == np.float32(lam)
    np.testing.assert_allclose(
        _np(out),
        _np(ops.lsoftmax_logits(x, _np(layer.kernel), LABELS, 4, lam)),
        rtol=1e-6,
        atol=1e-6,
    )
    # ... or, without one, the counter attached with the schedule.
    iterations.assign(9)
    with label_scope(LABELS):
        layer(x, training=True)
    assert _np(layer.lambda_) == np.float32(float(schedule(10)))


def test_scope_is_thread_local(layer, x):
    seen = {}

    def worker():
        seen["scope"] = current_label_scope()

    with label_scope(LABELS):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    assert seen["scope"] is None
