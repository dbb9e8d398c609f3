"""Tests of `keras_lsoftmax.LSoftmaxDense`.

Covers constructor validation, the weights and their (units, input_dim)
layout, plain versus margin logits, label formats, λ handling (and, on
TensorFlow, under `tf.function`), serialization, normalized weights (with a
finite-difference check of the kernel gradient) and a unit-norm constraint,
mixed precision and labels handed over by `keras_lsoftmax.label_scope`.
Every test but the `tf.function` one runs on each Keras backend.
"""

import json
import re

import keras
import numpy as np
import pytest

import keras_lsoftmax
from keras_lsoftmax import LSoftmaxDense
from keras_lsoftmax import ops
from tests import numpy_reference as ref
from tests.backend_utils import gradients

B, D, UNITS = 6, 4, 3
# Repeated labels, every class present.
LABELS = np.array([0, 2, 1, 0, 2, 0])


def _inputs(seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((B, D)).astype(dtype)


def _layer(**kwargs):
    # Seeded, so that every run draws the same kernel.
    kwargs.setdefault("kernel_initializer", keras.initializers.GlorotUniform(seed=0))
    layer = LSoftmaxDense(UNITS, **kwargs)
    layer.build((None, D))
    return layer


def _np(tensor):
    # Also for PyTorch tensors that require grad, which NumPy cannot read.
    return keras.ops.convert_to_numpy(tensor)


def _kernel(layer):
    return _np(layer.kernel)


def _lam(layer):
    return _np(layer.lambda_)


def _training_logits(layer, x, kernel):
    """The layer's margin logits on `x` (labels LABELS) with `kernel`."""
    # Stateless, so the backend's autodiff sees the kernel as an input.
    out, _ = layer.stateless_call(
        [kernel], [layer.lambda_.value], x, labels=LABELS, training=True
    )
    return out


def _kernel_gradient(layer, x, loss, kernel=None):
    """`loss(margin logits)` and its gradient w.r.t. the kernel.

    Args:
        loss: a function of the logits; the gradient is that of the sum of
            its output.
        kernel: the kernel to use, by default the layer's own.
    """
    kernel = _kernel(layer) if kernel is None else kernel
    value, (grad,) = gradients(
        lambda kernel: loss(_training_logits(layer, x, kernel)), kernel
    )
    return value, grad


def _unit_rows(w):
    return w / np.linalg.norm(w, axis=1, keepdims=True)


# ------------------------------------------------------------ constructor


@pytest.mark.parametrize(
    "name, value",
    [
        ("units", 0),
        ("units", -2),
        ("units", 2.5),
        ("units", True),
        ("units", "3"),
        ("units", None),
        ("margin", 0),
        ("margin", -1),
        ("margin", 2.5),
        ("margin", True),
        ("margin", "4"),
        ("initial_lambda", -1.0),
        ("initial_lambda", float("nan")),
        ("initial_lambda", "1"),
        ("initial_lambda", True),
        ("lambda_schedule", "fast"),
        ("lambda_schedule", -1.0),
        ("lambda_schedule", float("inf")),
        ("lambda_schedule", True),
        ("lambda_schedule", None),
        ("normalize_weights", 1),
        ("normalize_weights", "yes"),
        ("normalize_weights", None),
        ("lambda_minimum", -1.0),
        ("lambda_minimum", float("nan")),
        ("lambda_minimum", "10"),
    ],
)
def test_constructor_rejects_invalid_arguments(name, value):
    kwargs = {"units": UNITS, name: value}
    # The message names the argument and repeats the value received.
    with pytest.raises(ValueError, match=re.escape(f"{name}={value!r}")):
        LSoftmaxDense(**kwargs)


def test_weights():
    layer = _layer(margin=2, initial_lambda=2.5)
    assert layer.trainable_weights == [layer.kernel]
    assert layer.non_trainable_weights == [layer.lambda_]
    assert len(layer.weights) == 2
    assert tuple(layer.kernel.shape) == (UNITS, D)
    assert layer.kernel.dtype == "float32"
    assert tuple(layer.lambda_.shape) == ()
    assert layer.lambda_.dtype == "float32"
    assert not layer.lambda_.trainable
    assert _lam(layer) == 2.5


def test_lambda_exists_before_build():
    # A scheduler may set λ before the first call builds the layer.
    layer = LSoftmaxDense(UNITS, initial_lambda=7.0)
    assert _lam(layer) == 7.0
    layer.set_lambda(3.0)
    assert _lam(layer) == 3.0


@pytest.mark.parametrize(
    "initializer", [keras.initializers.GlorotUniform, keras.initializers.HeNormal]
)
def test_seeded_initializer_gives_the_transposed_dense_kernel(initializer):
    # The initializer sees Dense's (input_dim, units), so its fan-in is
    # input_dim; D ≠ UNITS, so a mix-up of the two shapes would show.
    layer = _layer(kernel_initializer=initializer(seed=3))
    dense = keras.layers.Dense(
        UNITS, use_bias=False, kernel_initializer=initializer(seed=3)
    )
    dense.build((None, D))
    assert tuple(dense.kernel.shape) == (D, UNITS)
    np.testing.assert_array_equal(_kernel(layer), _np(dense.kernel).T)


# ------------------------------------------------------------------- call


def test_plain_logits_without_labels_or_outside_training():
    layer = _layer(margin=4)
    x = _inputs()
    plain = x @ _kernel(layer).T
    for out in (
        layer(x),
        layer(x, training=None),
        layer(x, labels=LABELS),
        layer(x, labels=LABELS, training=False),
    ):
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
        np.testing.assert_allclose(_np(out), plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("margin", [1, 2, 4])
def test_margin_logits_in_training(margin, lam):
    layer = _layer(margin=margin, initial_lambda=lam)
    x = _inputs(margin)
    out = _np(layer(x, labels=LABELS, training=True))
    expected = ops.lsoftmax_logits(x, _kernel(layer), LABELS, margin, lam)
    np.testing.assert_allclose(out, _np(expected), rtol=1e-6, atol=1e-6)
    # ... and the margin is really there (except for m = 1).
    reference = ref.lsoftmax_ref(x, _kernel(layer), LABELS, margin, lam)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    # Compared with a tolerance: the backend's and NumPy's float32 matmuls
    # need not agree to the last bit, even for m = 1.
    rows = np.arange(B)
    plain = (x @ _kernel(layer).T)[rows, LABELS]
    changed = np.abs(out[rows, LABELS] - plain) > 1e-5
    if margin > 1:
        assert changed.all()
    else:
        assert not changed.any()


@pytest.mark.parametrize(
    "labels",
    [
        LABELS.astype(np.int32),
        LABELS.astype(np.int64),
        LABELS.astype(np.int32)[:, None],
        LABELS.astype(np.int64)[:, None],
        np.eye(UNITS, dtype=np.float32)[LABELS],
        np.eye(UNITS, dtype=np.int32)[LABELS],
        keras.ops.convert_to_tensor(LABELS, "int64"),
    ],
    ids=[
        "B-int32",
        "B-int64",
        "B1-int32",
        "B1-int64",
        "onehot-f32",
        "onehot-int32",
        "tensor-int64",
    ],
)
def test_label_formats_give_identical_outputs(labels):
    layer = _layer(margin=3)
    x = _inputs()
    expected = _np(layer(x, labels=LABELS.astype(np.int32), training=True))
    np.testing.assert_array_equal(
        _np(layer(x, labels=labels, training=True)), expected
    )


@pytest.mark.parametrize(
    "shape",
    [(B, 2), (B, UNITS + 1), (B, 1, 1), (B, UNITS, 1), ()],
)
def test_labels_of_wrong_shape(shape):
    layer = _layer(margin=2)
    with pytest.raises(ValueError, match="labels"):
        layer(_inputs(), labels=np.zeros(shape, np.int32), training=True)


def test_training_without_labels_points_to_sequential():
    layer = _layer(margin=2)
    with pytest.raises(ValueError, match=r"keras_lsoftmax\.Sequential"):
        layer(_inputs(), training=True)


def test_compute_output_shape_and_time_distributed():
    layer = _layer()
    assert layer.compute_output_shape((None, D)) == (None, UNITS)
    assert layer.compute_output_shape((8, D)) == (8, UNITS)
    x = np.random.default_rng(4).normal(size=(2, 3, D)).astype("float32")
    wrapped = keras.layers.TimeDistributed(layer)
    outputs = wrapped(x)
    assert outputs.shape == (2, 3, UNITS)
    np.testing.assert_allclose(
        _np(outputs),
        x @ _kernel(layer).T,
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "steps", [UNITS, UNITS + 1], ids=["time==units", "time!=units"]
)
def test_time_distributed_refuses_the_labels_of_a_label_scope(steps):
    # Labels (batch, time) would read as one-hot when time == units: the
    # wrapper runs the head one time step at a time, on rows the labels do
    # not match.
    layer = _layer(margin=2, name="step_head")
    wrapped = keras.layers.TimeDistributed(layer)
    x = np.random.default_rng(5).normal(size=(2, steps, D)).astype("float32")
    labels = np.random.default_rng(6).integers(0, UNITS, (2, steps))
    with keras_lsoftmax.label_scope(labels):
        with pytest.raises(
            ValueError, match=r"'step_head' was run through its `call`"
        ):
            wrapped(x, training=True)
        plain = wrapped(x, training=False)
    np.testing.assert_allclose(
        _np(plain), x @ _kernel(layer).T, rtol=1e-5, atol=1e-6
    )


def test_rejects_inputs_of_wrong_rank():
    with pytest.raises(ValueError):
        LSoftmaxDense(UNITS)(np.zeros((2, 3, 4), np.float32))


# --------------------------------------------------------------------- λ


@pytest.mark.parametrize(
    "value",
    [
        0,
        0.25,
        3,
        1000.0,
        np.float32(2.0),
        np.array(2.5),
        np.array([1.5]),
        keras.ops.convert_to_tensor(4.0),
        keras.ops.convert_to_tensor(7, "int64"),
        keras.ops.convert_to_tensor(0.5),
    ],
)
def test_set_lambda(value):
    layer = _layer()
    layer.set_lambda(value)
    expected = np.float32(np.asarray(_np(value)).reshape(()))
    assert _lam(layer) == expected


def test_set_lambda_takes_a_schedule_output():
    layer = _layer()
    schedule = keras_lsoftmax.schedules.InverseDecay(
        base=1000.0, gamma=0.1, power=2.0
    )
    layer.set_lambda(schedule(10))
    np.testing.assert_allclose(
        _lam(layer), 1000.0 / 4.0, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(
    "value",
    [
        -1.0,
        -1e-9,
        float("nan"),
        float("inf"),
        "1",
        True,
        np.array([1.0, 2.0]),
        keras.ops.convert_to_tensor(-2.0),
        keras.ops.convert_to_tensor([1.0, 2.0]),
        None,
    ],
)
def test_set_lambda_rejects_invalid_values(value):
    layer = _layer(initial_lambda=0.5)
    with pytest.raises(ValueError, match=r">= 0"):
        layer.set_lambda(value)
    assert _lam(layer) == 0.5


@pytest.mark.tensorflow  # counts tf.function traces
def test_lambda_changes_do_not_retrace():
    import tensorflow as tf

    layer = _layer(margin=4)
    x, kernel = _inputs(), _kernel(layer)

    @tf.function
    def forward(x, labels):
        return layer(x, labels=labels, training=True)

    @tf.function
    def assign_and_forward(x, labels, lam):
        layer.lambda_.assign(lam)
        return layer(x, labels=labels, training=True)

    first = forward(x, LABELS)
    layer.set_lambda(5.0)
    second = forward(x, LABELS)
    assert forward.experimental_get_tracing_count() == 1
    # The new λ is read at run time, not frozen into the trace.
    assert not np.allclose(first, second, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        second, ops.lsoftmax_logits(x, kernel, LABELS, 4, 5.0), rtol=1e-6, atol=1e-6
    )
    for lam in (0.0, 2.0, 10.0):
        out = assign_and_forward(x, LABELS, tf.constant(lam))
        np.testing.assert_allclose(
            out, ops.lsoftmax_logits(x, kernel, LABELS, 4, lam), rtol=1e-6, atol=1e-6
        )
    assert assign_and_forward.experimental_get_tracing_count() == 1
    assert _lam(layer) == 10.0


# ---------------------------------------------------------- serialization


def _custom_layer():
    return _layer(
        margin=3,
        initial_lambda=2.5,
        normalize_weights=True,
        kernel_initializer=keras.initializers.HeNormal(seed=1),
        kernel_regularizer=keras.regularizers.L2(1e-3),
        kernel_constraint=keras.constraints.MaxNorm(3.0, axis=1),
        name="head",
    )


def test_config_round_trip():
    layer = _custom_layer()
    layer.set_lambda(0.75)
    config = json.loads(json.dumps(layer.get_config()))
    clone = LSoftmaxDense.from_config(config)
    for attr in ("units", "margin", "lambda_schedule", "normalize_weights", "name"):
        assert getattr(clone, attr) == getattr(layer, attr)
    assert isinstance(clone.kernel_initializer, keras.initializers.HeNormal)
    assert clone.kernel_regularizer.get_config() == {
        "l2": pytest.approx(1e-3, abs=1e-9)
    }
    assert isinstance(clone.kernel_constraint, keras.constraints.MaxNorm)
    assert clone.kernel_constraint.axis == 1
    clone.build((None, D))
    clone.set_weights(layer.get_weights())
    assert _lam(clone) == 0.75
    x = _inputs()
    np.testing.assert_array_equal(_np(clone(x)), _np(layer(x)))
    np.testing.assert_array_equal(
        _np(clone(x, labels=LABELS, training=True)),
        _np(layer(x, labels=LABELS, training=True)),
    )


@pytest.mark.parametrize(
    "lambda_schedule",
    ["auto", 2.5, keras_lsoftmax.schedules.InverseDecay(1000.0, 0.01, 35.0, 2.0)],
    ids=["auto", "constant", "schedule"],
)
def test_lambda_schedule_config_round_trip(lambda_schedule):
    layer = _layer(lambda_schedule=lambda_schedule)
    config = json.loads(json.dumps(layer.get_config()))
    clone = LSoftmaxDense.from_config(config)
    assert clone.get_config() == layer.get_config()
    if isinstance(lambda_schedule, float):
        assert clone.lambda_schedule is None
        assert _lam(clone) == lambda_schedule
    elif isinstance(lambda_schedule, str):
        assert clone.lambda_schedule == "auto"
        assert _lam(clone) == 0.0
    else:
        assert type(clone.lambda_schedule) is type(lambda_schedule)
        assert clone.lambda_schedule.get_config() == lambda_schedule.get_config()


def test_initial_lambda_is_a_constant_lambda_schedule():
    layer = _layer(initial_lambda=2.5, name="head")
    assert layer.lambda_schedule is None and _lam(layer) == 2.5
    assert layer.get_config()["lambda_schedule"] == 2.5
    same = _layer(initial_lambda=2.5, lambda_schedule=2.5, name="head")
    assert same.get_config() == layer.get_config()


@pytest.mark.parametrize(
    "lambda_schedule, message",
    [
        (1.0, "initial_lambda=2.5, lambda_schedule=1.0"),
        (keras_lsoftmax.schedules.Constant(2.5), "initial_lambda=2.5"),
    ],
    ids=["other-constant", "schedule"],
)
def test_initial_lambda_conflicts_with_lambda_schedule(lambda_schedule, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LSoftmaxDense(UNITS, initial_lambda=2.5, lambda_schedule=lambda_schedule)


@pytest.mark.parametrize(
    "kwargs",
    [{"lambda_schedule": 1.0}, {"initial_lambda": 1.0}],
    ids=["constant", "initial_lambda"],
)
def test_lambda_minimum_needs_the_auto_schedule(kwargs):
    with pytest.raises(ValueError, match=r"lambda_minimum=10.0 with"):
        LSoftmaxDense(UNITS, lambda_minimum=10.0, **kwargs)


@pytest.mark.parametrize(
    "cls, units, default",
    [
        (LSoftmaxDense, 10, 2.0),
        (LSoftmaxDense, 11, 10.0),
        (LSoftmaxDense, 2000, 10.0),
        (keras_lsoftmax.SphereFaceDense, 10, 5.0),
        (keras_lsoftmax.SphereFaceDense, 2000, 5.0),
    ],
)
def test_default_floor_of_the_auto_schedule(cls, units, default):
    layer = cls(units)
    assert layer.auto_lambda_minimum == layer.default_lambda_minimum()
    assert layer.resolve_auto_schedule(100).minimum == default
    assert cls(units, lambda_minimum=0.5).auto_lambda_minimum == 0.5


@pytest.mark.parametrize(
    "cls, default", [(LSoftmaxDense, 2.0), (keras_lsoftmax.SphereFaceDense, 5.0)]
)
def test_lambda_minimum_floors_the_auto_schedule(cls, default):
    assert cls(UNITS).resolve_auto_schedule(100).minimum == default
    layer = cls(UNITS, lambda_minimum=10)
    config = json.loads(json.dumps(layer.get_config()))
    assert config["lambda_minimum"] == 10.0
    clone = cls.from_config(config)
    schedule = clone.resolve_auto_schedule(100)
    assert schedule.get_config() == (
        keras_lsoftmax.schedules.auto_schedule(100, minimum=10.0).get_config()
    )
    assert float(schedule(100)) == 10.0
    # Resolved, the schedule holds the floor, and the config loads again.
    config = clone.get_config()
    assert config["lambda_minimum"] is None
    assert cls.from_config(config).lambda_schedule.minimum == 10.0


def test_lambda_schedule_needs_the_step_in_a_label_scope():
    schedule = keras_lsoftmax.schedules.InverseDecay(1000.0, 0.05, 1.0)
    layer = _layer(lambda_schedule=schedule)
    x = _inputs()
    with pytest.raises(ValueError, match=r"label_scope\(y, step=optimizer"):
        with keras_lsoftmax.label_scope(LABELS):
            layer(x, training=True)
    with keras_lsoftmax.label_scope(LABELS, step=41) as scope:
        out = layer(x, training=True)
    lam = float(schedule(42))
    assert _np(scope.records[0].lam) == np.float32(lam)
    np.testing.assert_allclose(
        _np(out),
        _np(ops.lsoftmax_logits(x, _kernel(layer), LABELS, 4, lam)),
        rtol=1e-6,
        atol=1e-6,
    )
    # "auto" with a step but no run to fit: the documented fixed gamma.
    layer = _layer()
    with keras_lsoftmax.label_scope(LABELS, step=0):
        layer(x, training=True)
    auto = keras_lsoftmax.schedules.auto_schedule(None)
    assert layer.lambda_schedule.get_config() == auto.get_config()
    assert _lam(layer) == np.float32(float(auto(1)))


def test_set_lambda_replaces_the_lambda_schedule():
    layer = _layer()
    layer.set_lambda(0.5)
    assert layer.lambda_schedule is None
    assert layer.get_config()["lambda_schedule"] == 0.5
    with keras_lsoftmax.label_scope(LABELS):
        out = layer(_inputs(), training=True)
    np.testing.assert_allclose(
        _np(out),
        _np(ops.lsoftmax_logits(_inputs(), _kernel(layer), LABELS, 4, 0.5)),
        rtol=1e-6,
        atol=1e-6,
    )


def test_keras_serialize_finds_registered_class():
    assert (
        keras.saving.get_registered_object("keras_lsoftmax>LSoftmaxDense")
        is LSoftmaxDense
    )
    layer = _custom_layer()
    serialized = json.loads(json.dumps(keras.layers.serialize(layer)))
    assert serialized["registered_name"] == "keras_lsoftmax>LSoftmaxDense"
    restored = keras.layers.deserialize(serialized)
    assert type(restored) is LSoftmaxDense
    assert restored.get_config() == layer.get_config()


# ------------------------------------------------------- normalized weights


def test_normalized_weights_forward():
    layer = _layer(margin=4, initial_lambda=0.5, normalize_weights=True)
    # Unequal row norms, so that normalising matters.
    scale = np.array([0.1, 1.0, 5.0], np.float32)[:, None]
    layer.kernel.assign(_kernel(layer) * scale)
    x = _inputs()
    w_hat = _unit_rows(_kernel(layer))
    np.testing.assert_allclose(_np(layer(x)), x @ w_hat.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        _np(layer(x, labels=LABELS, training=True)),
        _np(ops.lsoftmax_logits(x, w_hat, LABELS, 4, 0.5)),
        rtol=1e-5,
        atol=1e-6,
    )
    # The stored kernel is never normalised in place.
    assert not np.allclose(
        np.linalg.norm(_kernel(layer), axis=1), 1.0, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("margin", [2, 4])
def test_normalized_weights_kernel_gradient(margin):
    rng = np.random.default_rng(margin)
    x, w = ref.sample_away_from_breakpoints(rng, LABELS, D, UNITS, margin)
    w *= np.array([0.3, 1.0, 4.0])[:, None]
    upstream = rng.standard_normal((B, UNITS))
    layer = LSoftmaxDense(
        UNITS,
        margin=margin,
        initial_lambda=0.5,
        normalize_weights=True,
        dtype="float64",
    )
    layer.build((None, D))

    def weighted(out):
        return keras.ops.multiply(out, upstream)

    _, grad = _kernel_gradient(layer, x, weighted, w)
    # JAX computes in float32 unless its x64 mode is on.
    tol = 1e-10 if grad.dtype == np.float64 else 1e-5

    # Central differences, one kernel entry at a time, of the float64 NumPy
    # reference on the normalised kernel.
    def loss(kernel):
        w_hat = _unit_rows(kernel)
        return np.sum(ref.lsoftmax_ref(x, w_hat, LABELS, margin, 0.5) * upstream)

    delta = 1e-6
    numeric = np.zeros_like(w)
    for index in np.ndindex(*w.shape):
        step = np.zeros_like(w)
        step[index] = delta
        numeric[index] = (loss(w + step) - loss(w - step)) / (2 * delta)
    np.testing.assert_allclose(
        grad, numeric, rtol=0, atol=max(tol, 1e-6) * np.max(np.abs(numeric))
    )

    # The same as the chain rule through Ŵ = W/‖W‖ on the op's own gradient.
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    w_hat = w / norms
    _, (g_hat,) = gradients(
        lambda w_hat: weighted(
            ops.lsoftmax_logits(x, w_hat, LABELS, margin, 0.5)
        ),
        w_hat,
    )
    chain = (g_hat - w_hat * np.sum(w_hat * g_hat, axis=1, keepdims=True)) / norms
    np.testing.assert_allclose(grad, chain, rtol=tol, atol=tol * 1e-2)


def test_normalized_weights_zero_row_stays_finite():
    layer = _layer(margin=4, normalize_weights=True)
    kernel = _kernel(layer)
    kernel[1] = 0.0
    layer.kernel.assign(kernel)
    x = _inputs()
    out, grad = _kernel_gradient(layer, x, lambda out: out)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(grad))
    np.testing.assert_array_equal(out[:, 1], 0.0)


def test_unit_norm_constraint_keeps_class_rows_at_unit_norm():
    layer = _layer(margin=4, kernel_constraint=keras.constraints.UnitNorm(axis=1))
    before = _kernel(layer)
    x = _inputs()
    _, grad = _kernel_gradient(
        layer,
        x,
        lambda out: keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(
                LABELS, out, from_logits=True
            )
        ),
    )
    keras.optimizers.SGD(0.5).apply(
        [keras.ops.convert_to_tensor(grad)], [layer.kernel]
    )
    # The constraint projects the SGD step onto unit rows ...
    kernel = _kernel(layer)
    np.testing.assert_allclose(
        kernel, _unit_rows(before - 0.5 * grad), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        np.linalg.norm(kernel, axis=1), 1.0, rtol=1e-6, atol=1e-6
    )
    # ... not onto unit columns: UNITS unit rows cannot give D unit columns.
    assert not np.allclose(
        np.linalg.norm(kernel, axis=0), 1.0, rtol=1e-5, atol=1e-6
    )


# -------------------------------------------------------- mixed precision


@pytest.fixture(params=["mixed_float16", "mixed_bfloat16"])
def mixed_policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    try:
        yield request.param
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_precision_outputs_float32(mixed_policy):
    layer = LSoftmaxDense(
        UNITS, margin=4, kernel_initializer=keras.initializers.GlorotUniform(seed=0)
    )
    x = _inputs()
    plain = layer(x)
    out = layer(x, labels=LABELS, training=True)
    for tensor in (plain, out):
        assert keras.backend.standardize_dtype(tensor.dtype) == "float32"
    assert layer.kernel.dtype == "float32"
    assert layer.lambda_.dtype == "float32"
    plain, out, kernel = _np(plain), _np(out), _kernel(layer)
    # Only the features may be rounded to half precision on the way in.
    expected = _np(ops.lsoftmax_logits(x, kernel, LABELS, 4, 0.0))
    tol = 5e-3 if mixed_policy == "mixed_float16" else 3e-2
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(out, expected, rtol=0, atol=tol * scale)
    np.testing.assert_allclose(plain, x @ kernel.T, rtol=0, atol=tol * scale)
    _, grad = _kernel_gradient(layer, x, lambda out: out)
    assert grad.dtype == np.float32 and np.all(np.isfinite(grad))


# ------------------------------------------------------------- label_scope


def test_label_scope_hands_labels_to_the_layer():
    label_scope = keras_lsoftmax.label_scope
    layer = _layer(margin=4, initial_lambda=0.5)
    x = _inputs()
    with label_scope(LABELS) as scope:
        out = layer(x, training=True)
    np.testing.assert_array_equal(
        _np(out), _np(layer(x, labels=LABELS, training=True))
    )
    assert len(scope.records) == 1
    record = scope.records[0]
    assert record.layer is layer
    np.testing.assert_array_equal(_np(record.outputs), _np(out))
    np.testing.assert_array_equal(_np(record.labels), LABELS)
    _, _, dot, cos = ref.target_geometry(x, _kernel(layer), LABELS)
    plain = x @ _kernel(layer).T
    plain_target = _np(record.plain_target)
    np.testing.assert_allclose(
        plain_target, plain[np.arange(B), LABELS], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(plain_target, dot, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(record.cos_theta), cos, rtol=1e-5, atol=1e-6)


@pytest.mark.torch
def test_kernel_is_row_major_on_torch():
    # A transposed view would make every step read and update the kernel
    # column by column.
    layer = LSoftmaxDense(7)
    layer.build((None, 5))
    assert layer.kernel.value.is_contiguous()
    assert tuple(layer.kernel.value.stride()) == (5, 1)
