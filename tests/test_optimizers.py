"""Tests of `keras_lsoftmax.optimizers`: `LazyAdam` and `LazySGD`.

Covers Adam's and SGD's updates where the gradient touches every row (with
and without AMSGrad; without momentum, with it, and Nesterov's), the rows a
gradient leaves at zero kept with their slots against NumPy references, a
`tf.IndexedSlices` gradient with a repeated row, `fit` of a sampling head
(only the kept rows move, op by op and compiled), the arguments'
validation, the configs and a `.keras` round trip. Every test runs on each
Keras backend unless marked.
"""

import keras
import numpy as np
import pytest

import keras_lsoftmax
from keras_lsoftmax.optimizers import LazyAdam
from keras_lsoftmax.optimizers import LazySGD

SPARSE_CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _initial_and_gradients(steps, masks=None):
    rng = np.random.default_rng(0)
    initial = rng.normal(size=(6, 3)).astype("float32")
    grads = [rng.normal(size=(6, 3)).astype("float32") for _ in range(steps)]
    if masks is not None:
        grads = [g * np.asarray(m, "float32")[:, None] for g, m in zip(grads, masks)]
    return initial, grads


def _applied(optimizer, initial, grads):
    variable = keras.Variable(initial)
    optimizer.build([variable])
    for grad in grads:
        optimizer.apply([keras.ops.convert_to_tensor(grad)], [variable])
    return keras.ops.convert_to_numpy(variable)


def _lazy_adam_reference(initial, grads, lr, amsgrad=False):
    """NumPy float64 Lazy Adam, Keras's Adam arithmetic row by row."""
    value = initial.astype("float64")
    m, v, v_hat = (np.zeros_like(value) for _ in range(3))
    for step, grad in enumerate(grads, 1):
        rows = np.any(grad != 0, axis=1)
        new_m = m + (grad - m) * 0.1
        new_v = v + (grad * grad - v) * 0.001
        new_v_hat = np.maximum(v_hat, new_v)
        alpha = lr * np.sqrt(1 - 0.999**step) / (1 - 0.9**step)
        root = np.sqrt(new_v_hat if amsgrad else new_v)
        new_value = value - new_m * alpha / (root + 1e-7)
        for old, new in ((m, new_m), (v, new_v), (v_hat, new_v_hat)):
            old[rows] = new[rows]
        value[rows] = new_value[rows]
    return value


def _lazy_sgd_reference(initial, grads, lr, nesterov):
    """NumPy float64 lazy SGD with momentum 0.9, Keras's SGD row by row."""
    value = initial.astype("float64")
    m = np.zeros_like(value)
    for grad in grads:
        rows = np.any(grad != 0, axis=1)
        new_m = m * 0.9 - grad * lr
        step = new_m * 0.9 - grad * lr if nesterov else new_m
        m[rows] = new_m[rows]
        value[rows] += step[rows]
    return value


@pytest.mark.parametrize("amsgrad", [False, True])
def test_a_gradient_on_every_row_gives_adams_update(amsgrad):
    initial, grads = _initial_and_gradients(steps=3)
    lazy = _applied(LazyAdam(0.1, amsgrad=amsgrad), initial, grads)
    adam = _applied(keras.optimizers.Adam(0.1, amsgrad=amsgrad), initial, grads)
    np.testing.assert_allclose(lazy, adam, rtol=0, atol=1e-6)
    assert np.abs(lazy - initial).min() > 1e-3


@pytest.mark.parametrize("amsgrad", [False, True])
def test_rows_with_a_zero_gradient_keep_their_values_and_moments(amsgrad):
    masks = [[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1]]
    initial, grads = _initial_and_gradients(steps=3, masks=masks)
    lazy = _applied(LazyAdam(0.1, amsgrad=amsgrad), initial, grads)
    np.testing.assert_array_equal(lazy[[3, 4]], initial[[3, 4]])
    # Keras's Adam moves a row by its momentum when its gradient is zero;
    # with the moments of row 2 decayed in step 3 the result would differ.
    expected = _lazy_adam_reference(initial, grads, 0.1, amsgrad)
    np.testing.assert_allclose(lazy, expected, rtol=0, atol=1e-5)
    adam = _applied(keras.optimizers.Adam(0.1), initial, grads)
    assert np.abs(adam[2] - lazy[2]).max() > 1e-3


@pytest.mark.parametrize(
    "kwargs", [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}]
)
def test_lazy_sgd_with_a_gradient_on_every_row_is_sgd(kwargs):
    initial, grads = _initial_and_gradients(steps=3)
    lazy = _applied(LazySGD(0.1, **kwargs), initial, grads)
    sgd = _applied(keras.optimizers.SGD(0.1, **kwargs), initial, grads)
    np.testing.assert_allclose(lazy, sgd, rtol=0, atol=1e-6)
    assert np.abs(lazy - initial).min() > 1e-3


@pytest.mark.parametrize("nesterov", [False, True])
def test_lazy_sgd_rows_with_a_zero_gradient_keep_value_and_momentum(nesterov):
    masks = [[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1]]
    initial, grads = _initial_and_gradients(steps=3, masks=masks)
    optimizer = LazySGD(0.1, momentum=0.9, nesterov=nesterov)
    lazy = _applied(optimizer, initial, grads)
    np.testing.assert_array_equal(lazy[[3, 4]], initial[[3, 4]])
    # Row 0 skips step 2: its momentum must not decay there.
    expected = _lazy_sgd_reference(initial, grads, 0.1, nesterov)
    np.testing.assert_allclose(lazy, expected, rtol=0, atol=1e-6)
    sgd = _applied(
        keras.optimizers.SGD(0.1, momentum=0.9, nesterov=nesterov),
        initial, grads,
    )  # fmt: skip
    assert np.abs(sgd[2] - lazy[2]).max() > 1e-3
    assert np.abs(sgd[0] - lazy[0]).max() > 1e-3


@pytest.mark.tensorflow
def test_indexed_slices_with_a_repeated_row_are_summed():
    import tensorflow as tf

    initial, grads = _initial_and_gradients(steps=1)
    values = grads[0][:3]
    slices = tf.IndexedSlices(
        tf.constant(values), tf.constant([4, 1, 4]), tf.constant([6, 3])
    )
    dense = np.zeros_like(initial)
    np.add.at(dense, [4, 1, 4], values)
    variable = keras.Variable(initial)
    optimizer = LazyAdam(0.1)
    optimizer.build([variable])
    optimizer.apply([slices], [variable])
    expected = _lazy_adam_reference(initial, [dense], 0.1)
    np.testing.assert_allclose(variable.numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(variable.numpy()[[0, 2, 3, 5]], initial[[0, 2, 3, 5]])


def _rows_moved_by_second_fit(optimizer, jit_compile):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.integers(0, 100, 16)
    head = keras_lsoftmax.CosFaceDense(100, sample_rate=0.1)
    model = keras_lsoftmax.Sequential([keras.Input((6,)), head])
    model.compile(optimizer=optimizer, loss=SPARSE_CE, jit_compile=jit_compile)
    model.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)
    before = keras.ops.convert_to_numpy(head.kernel)
    model.fit(x[8:], y[8:], batch_size=8, epochs=1, verbose=0)
    after = keras.ops.convert_to_numpy(head.kernel)
    return np.any(after != before, axis=1), y[8:]


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_of_a_sampling_head_moves_only_the_kept_rows(jit_compile):
    moved, labels = _rows_moved_by_second_fit(LazyAdam(0.01), jit_compile)
    # S = max(int(0.1 · 100), 8) = 10 kept rows, the labelled ones among
    # them; a kept row whose gradient underflows to 0 stays too.
    assert 8 <= moved.sum() <= 10
    assert np.all(moved[labels])
    # Keras's Adam also moves the rows kept by the first step only.
    adam_moved, _ = _rows_moved_by_second_fit(
        keras.optimizers.Adam(0.01), jit_compile
    )
    assert adam_moved.sum() > 15


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_with_lazy_sgd_moves_only_the_kept_rows(jit_compile):
    lazy = LazySGD(0.1, momentum=0.9)
    moved, labels = _rows_moved_by_second_fit(lazy, jit_compile)
    assert 8 <= moved.sum() <= 10
    assert np.all(moved[labels])
    sgd_moved, _ = _rows_moved_by_second_fit(
        keras.optimizers.SGD(0.1, momentum=0.9), jit_compile
    )
    assert sgd_moved.sum() > 15


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weight_decay": 0.01}, r"weight_decay=0\.01"),
        ({"beta_1": 1.0}, r"`beta_1`.*beta_1=1\.0"),
        ({"beta_2": -0.1}, r"`beta_2`.*beta_2=-0\.1"),
        ({"epsilon": "tiny"}, r"`epsilon`.*epsilon='tiny'"),
        ({"amsgrad": 1}, r"`amsgrad`.*amsgrad=1"),
    ],
)
def test_invalid_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LazyAdam(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weight_decay": 0.01}, r"LazySGD .*weight_decay=0\.01"),
        ({"momentum": 1.0}, r"`momentum`.*momentum=1\.0"),
        ({"momentum": -0.1}, r"`momentum`.*momentum=-0\.1"),
        ({"momentum": "0.9"}, r"`momentum`.*momentum='0\.9'"),
        ({"nesterov": 1}, r"`nesterov`.*nesterov=1"),
    ],
)
def test_lazy_sgd_invalid_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LazySGD(**kwargs)


@pytest.mark.parametrize(
    "optimizer, name",
    [
        (lambda: LazyAdam(0.02, beta_1=0.8, amsgrad=True), "lazy_adam"),
        (lambda: LazySGD(0.05, momentum=0.9, nesterov=True), "lazy_sgd"),
    ],
)
def test_config_round_trip_and_saved_model_keep_the_optimizer(
    tmp_path, optimizer, name
):
    optimizer = optimizer()
    config = optimizer.get_config()
    assert config["name"] == name
    restored = type(optimizer).from_config(config)
    assert isinstance(restored, type(optimizer))
    assert restored.get_config() == config

    keras.utils.set_random_seed(0)
    model = keras_lsoftmax.Sequential(
        [keras.Input((4,)), keras_lsoftmax.LSoftmaxDense(5, margin=2)]
    )
    model.compile(optimizer=optimizer, loss=SPARSE_CE)
    x = np.random.default_rng(1).normal(size=(8, 4)).astype("float32")
    y = np.arange(8) % 5
    model.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, type(optimizer))
    assert loaded.optimizer.get_config() == config
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
