"""Tests of the public op API `keras_lsoftmax.ops`, on every Keras backend.

Forward values are compared with the float64 NumPy reference of the paper's
formula (`tests/numpy_reference.py`, which takes θ by arccos), gradients with
float64 central finite differences and with each backend's own autodiff of
the same math written in `keras.ops`. What only one backend's implementation
has is tested in `tests/backend/<backend>/test_ops.py`.
"""

import re

import keras
import numpy as np
import pytest

from keras_lsoftmax import ops
from keras_lsoftmax.margins import ArcMargin
from keras_lsoftmax.margins import CosineMargin
from tests import numpy_reference as ref
from tests.backend_utils import BACKEND
from tests.backend_utils import differentiable_gradient
from tests.backend_utils import gradients

MARGINS = [1, 2, 3, 4, 8]
# The shape of most test data. One shape for all: JAX compiles the op once
# per margin, dtype and shape. 48 labels over 5 classes repeat, so the
# kernel gradient must add up every sample of a class.
BATCH, DIM, NUM_CLASSES = 48, 4, 5


@pytest.fixture
def x64():
    """Lets JAX compute in float64 for one test, then restores its setting.

    Without it JAX silently turns float64 inputs into float32; the other
    backends keep float64 anyway.
    """
    if BACKEND != "jax":
        yield
        return
    import jax

    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """The two dtypes the op computes in (float64 with `x64` on JAX)."""
    if request.param == "float64":
        request.getfixturevalue("x64")
    return request.param


def _numpy(tensor):
    return keras.ops.convert_to_numpy(tensor)


def _dtype_name(tensor):
    return keras.backend.standardize_dtype(tensor.dtype)


def _range_error():
    """What an eager label range check raises on this backend."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.errors.InvalidArgumentError
    return ValueError


def _spread_data(seed, dtype, batch=BATCH, dim=DIM, num_classes=NUM_CLASSES):
    """(x, w, labels) in `dtype` with target angles spread over [0, π]."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((num_classes, dim))
    labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
    theta = rng.permutation(np.linspace(0.005, np.pi - 0.005, batch))
    x = ref.features_at_angles(rng, w, labels, theta)
    return x.astype(dtype), w.astype(dtype), labels


def _gradient_data(seed, margin, dtype):
    """(x, w, labels, upstream) in `dtype`, target angles off ψ's breakpoints.

    Finite differences across a breakpoint would see the jump of ψ''.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, size=BATCH).astype(np.int32)
    x, w = ref.sample_away_from_breakpoints(rng, labels, DIM, NUM_CLASSES, margin)
    upstream = rng.standard_normal((BATCH, NUM_CLASSES))
    return x.astype(dtype), w.astype(dtype), labels, upstream.astype(dtype)


def _weighted(fn, upstream):
    """`fn` times a fixed upstream gradient, so that sum() weighs each logit."""
    return lambda *args: keras.ops.multiply(fn(*args), upstream)


def _lsoftmax(labels, margin, lam):
    """The op as a function of (x, w).

    The labels are bound here rather than passed to `gradients`, which on
    TensorFlow fails on an argument it does not differentiate.
    """
    return lambda x, w: ops.lsoftmax_logits(x, w, labels, margin, lam)


def _autodiff_logits(labels, margin, lam):
    """The L-Softmax logits in `keras.ops`, for each backend's autodiff.

    cos(mθ) is the Chebyshev polynomial T_m(cos θ) (stable in float32, unlike
    the derivative of arccos near θ = 0); the interval index k comes from
    arccos and floor, under `stop_gradient`.
    """
    k_ops = keras.ops

    def fn(x, w):
        w_y = k_ops.take(w, labels, axis=0)
        a = k_ops.norm(x, axis=1)
        b = k_ops.norm(w_y, axis=1)
        cos = k_ops.clip(k_ops.sum(x * w_y, axis=1) / (a * b), -1.0, 1.0)
        theta = k_ops.stop_gradient(k_ops.arccos(cos))
        k = k_ops.minimum(k_ops.floor(theta / (np.pi / margin)), margin - 1.0)
        t_prev, t = k_ops.ones_like(cos), cos
        for _ in range(margin - 1):
            t_prev, t = t, 2.0 * cos * t - t_prev
        psi = (1.0 - 2.0 * k_ops.mod(k, 2.0)) * t - 2.0 * k
        target = (lam * a * b * cos + a * b * psi) / (1.0 + lam)
        mask = k_ops.one_hot(labels, w.shape[0], dtype=_dtype_name(x))
        logits = k_ops.matmul(x, k_ops.transpose(w))
        return logits * (1.0 - mask) + mask * target[:, None]

    return fn


def _central_differences(fn, x, w, eps=1e-6):
    """∂sum(fn(x, w))/∂x and ∂sum(fn(x, w))/∂w by central differences.

    Row i of the output depends on x only through x[i], so one pair of calls
    per column of x gives that column of ∂/∂x for every row.
    """

    def row_sums(x, w):
        return np.sum(_numpy(fn(x, w)), axis=1)

    dx = np.zeros_like(x)
    for column in range(x.shape[1]):
        step = np.zeros_like(x)
        step[:, column] = eps
        dx[:, column] = row_sums(x + step, w) - row_sums(x - step, w)
    dw = np.zeros_like(w)
    for index in np.ndindex(w.shape):
        step = np.zeros_like(w)
        step[index] = eps
        dw[index] = np.sum(row_sums(x, w + step) - row_sums(x, w - step))
    return dx / (2 * eps), dw / (2 * eps)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("lam", [0.0, 0.5, 1000.0])
@pytest.mark.parametrize("margin", MARGINS)
def test_forward_matches_numpy_reference(margin, lam, dtype):
    x, w, labels = _spread_data(margin, dtype)
    # The reference sees the same (rounded) inputs, so only the op's own
    # rounding is measured.
    expected = ref.lsoftmax_ref(x, w, labels, margin, lam)
    got = ops.lsoftmax_logits(x, w, labels, margin, lam)
    assert _dtype_name(got) == dtype
    tol = {"float32": 1e-5, "float64": 1e-10}[dtype]
    np.testing.assert_allclose(
        _numpy(got), expected, rtol=0, atol=tol * np.max(np.abs(expected))
    )


@pytest.mark.parametrize("lam", [0.0, 1e12])
def test_margin_one_equals_plain_logits_exactly(lam, dtype):
    x, w, labels = _spread_data(1, dtype)
    got = ops.lsoftmax_logits(x, w, labels, 1, lam)
    np.testing.assert_array_equal(_numpy(got), _numpy(ops.plain_logits(x, w)))


@pytest.mark.parametrize("margin", [2, 4, 8])
def test_huge_lambda_tends_to_plain_logits(margin, dtype):
    x, w, labels = _spread_data(margin, dtype)
    got = ops.lsoftmax_logits(x, w, labels, margin, 1e12)
    expected = x.astype(np.float64) @ w.astype(np.float64).T
    tol = {"float32": 1e-6, "float64": 1e-10}[dtype]
    np.testing.assert_allclose(
        _numpy(got), expected, rtol=0, atol=tol * np.max(np.abs(expected))
    )


@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("margin", [2, 3, 4, 8])
def test_non_target_logits_are_exactly_plain(margin, lam):
    # A port once scaled the non-target logits by λ/(1+λ); at λ = 0 that
    # zeroes them, at λ = 0.5 it divides them by 3.
    x, w, labels = _spread_data(margin, "float32")
    got = _numpy(ops.lsoftmax_logits(x, w, labels, margin, lam))
    plain = _numpy(ops.plain_logits(x, w))
    non_target = np.ones_like(plain, dtype=bool)
    non_target[np.arange(len(labels)), labels] = False
    np.testing.assert_array_equal(got[non_target], plain[non_target])
    # ... while every target logit does change (no sample sits at θ = 0).
    assert np.all(got[~non_target] != plain[~non_target])


def test_margin_logits_extra_outputs(x64):
    x, w, labels = _spread_data(3, "float64")
    checked = ops.check_labels(labels, 5, x)
    logits, plain_target, cos = ops.margin_logits(x, w, checked, 3, 0.0)
    _, _, dot, expected_cos = ref.target_geometry(x, w, labels)
    np.testing.assert_allclose(_numpy(plain_target), dot, rtol=0, atol=1e-12)
    np.testing.assert_allclose(_numpy(cos), expected_cos, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(
        _numpy(logits), _numpy(ops.lsoftmax_logits(x, w, labels, 3, 0.0))
    )


def test_margin_logits_valid_mask():
    # Rows with valid = 0 keep the plain logits and the plain gradient.
    x, w, labels = _spread_data(3, "float32")
    valid = np.random.default_rng(3).integers(0, 2, BATCH).astype(np.float32)
    upstream = np.random.default_rng(4).standard_normal((BATCH, NUM_CLASSES))
    upstream = upstream.astype(np.float32)
    checked = ops.check_labels(labels, 5, x)

    def masked(x, w):
        return ops.margin_logits(x, w, checked, 3, 0.5, valid)[0]

    def full(x, w):
        return ops.margin_logits(x, w, checked, 3, 0.5)[0]

    out, (dx, _) = gradients(_weighted(masked, upstream), x, w)
    full_out, (full_dx, _) = gradients(_weighted(full, upstream), x, w)
    plain_out, (plain_dx, _) = gradients(_weighted(ops.plain_logits, upstream), x, w)
    keep = valid[:, None] == 1
    np.testing.assert_allclose(
        out, np.where(keep, full_out, plain_out), rtol=0, atol=1e-5
    )
    np.testing.assert_allclose(dx, np.where(keep, full_dx, plain_dx), rtol=0, atol=1e-5)


def test_plain_logits(dtype):
    x, w, _ = _spread_data(0, dtype)
    got = ops.plain_logits(x, w)
    assert _dtype_name(got) == dtype
    tol = {"float32": 1e-5, "float64": 1e-12}[dtype]
    np.testing.assert_allclose(_numpy(got), x @ w.T, rtol=0, atol=tol)


def test_with_plain_targets_restores_plain_logits():
    x, w, labels = _spread_data(4, "float32")
    checked = ops.check_labels(labels, 5, x)
    expected = _numpy(ops.plain_logits(x, w))
    logits, plain_target, _ = ops.margin_logits(x, w, checked, 4, 0.0)
    assert not np.allclose(_numpy(logits), expected, rtol=0, atol=1e-3)
    restored = ops.with_plain_targets(logits, checked, plain_target)
    np.testing.assert_allclose(_numpy(restored), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- ψ


def _psi(cos, margin):
    return tuple(_numpy(t) for t in ops.psi(cos, margin))


# One grid size for the ψ tests: JAX compiles each op once per input shape.
GRID = 4001


def _off_sign_zeros(c, margin):
    """Where Caffe's sign() is not 0 (it is exactly on a threshold)."""
    zeros = {2: [0.0], 3: [0.0, 0.5, -0.5], 4: [0.0, 0.5**0.5, -(0.5**0.5)]}
    keep = np.ones_like(c, dtype=bool)
    for z in zeros[margin]:
        keep &= np.abs(c - z) > 1e-9
    return keep


@pytest.mark.parametrize("margin", [2, 3, 4])
def test_psi_matches_caffe_closed_forms(x64, margin):
    c = np.linspace(-1.0, 1.0, GRID)
    keep = _off_sign_zeros(c, margin)
    p, _ = _psi(c, margin)
    np.testing.assert_allclose(
        p[keep], ref.caffe_psi(c[keep], margin), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("margin", [1, 2, 3, 4, 8])
def test_psi_and_derivative_match_paper_definition(x64, margin):
    theta = np.linspace(1e-3, np.pi - 1e-3, GRID)
    p, dp = _psi(np.cos(theta), margin)
    assert p.dtype == dp.dtype == np.float64
    np.testing.assert_allclose(p, ref.psi_ref(theta, margin), rtol=0, atol=1e-10)
    # dψ/dc = (dψ/dθ) / (dc/dθ) = (−1)^k m sin(mθ) / sin θ.
    k = np.clip(np.floor(theta / (np.pi / margin)), 0, margin - 1)
    expected_dp = (-1.0) ** k * margin * np.sin(margin * theta) / np.sin(theta)
    np.testing.assert_allclose(dp, expected_dp, rtol=0, atol=1e-8 * margin**2)


@pytest.mark.parametrize("margin", [1, 2, 3, 4, 5, 6, 8])
def test_psi_over_zero_to_pi(x64, margin):
    theta = np.linspace(0.0, np.pi, GRID)
    p, dp = _psi(np.cos(theta), margin)
    steps = np.diff(p)
    assert np.all(steps < 0)
    # |dψ/dθ| = m |sin mθ| ≤ m, so no step may exceed m·Δθ (a jump would).
    assert np.max(np.abs(steps)) <= margin * (theta[1] - theta[0]) * (1 + 1e-9)
    ends = [0, -1]
    np.testing.assert_allclose(p[ends], [1.0, 1.0 - 2.0 * margin], rtol=0, atol=1e-12)
    # dψ/dc = m² at both ends: (−1)^k m U_{m−1}(±1) with U_{m−1}(−1) and
    # (−1)^k (k = m − 1) of the same sign.
    np.testing.assert_allclose(dp[ends], [margin**2, margin**2], rtol=0, atol=1e-9)


@pytest.mark.parametrize("margin", [2, 3, 4, 8])
def test_psi_continuous_at_thresholds(x64, margin):
    # Seven thresholds for every margin (repeated where m − 1 < 7): one
    # input shape.
    j = np.resize(np.arange(1, margin), 7)
    c = np.cos(j * np.pi / margin)
    # At cos(jπ/m) both neighbouring pieces give ψ = 1 − 2j.
    probes = [c, np.nextafter(c, 2.0), np.nextafter(c, -2.0), c + 1e-9, c - 1e-9]
    p, _ = _psi(np.stack(probes), margin)
    expected = np.broadcast_to(1.0 - 2.0 * j, p.shape)
    np.testing.assert_allclose(p, expected, rtol=0, atol=1e-6)


def test_psi_clips_out_of_range_cosines(x64):
    p, _ = _psi(np.array([1.5, -1.5]), 4)
    np.testing.assert_allclose(p, [1.0, -7.0], rtol=0, atol=1e-12)


def test_psi_keeps_float32():
    p, dp = _psi(np.linspace(-1.0, 1.0, GRID, dtype=np.float32), 4)
    assert p.dtype == dp.dtype == np.float32


# -------------------------------------------------------------- gradients


@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("margin", MARGINS)
def test_gradient_matches_finite_differences(x64, margin, lam):
    x, w, labels, upstream = _gradient_data(margin, margin, "float64")
    fn = _weighted(_lsoftmax(labels, margin, lam), upstream)
    _, (dx, dw) = gradients(fn, x, w)
    assert dx.dtype == dw.dtype == np.float64
    for got, numeric in zip((dx, dw), _central_differences(fn, x, w)):
        # Absolute 1e-6, scaled up where the gradient itself exceeds 1.
        atol = 1e-6 * max(1.0, np.max(np.abs(numeric)))
        np.testing.assert_allclose(got, numeric, rtol=0, atol=atol)


@pytest.mark.parametrize("lam", [0.0, 0.5, 10.0])
@pytest.mark.parametrize("margin", MARGINS)
def test_gradient_matches_autodiff_float32(margin, lam):
    x, w, labels, upstream = _gradient_data(margin, margin, "float32")
    op = _lsoftmax(labels, margin, lam)
    out, grads = gradients(_weighted(op, upstream), x, w)
    expected_out, expected_grads = gradients(
        _weighted(_autodiff_logits(labels, margin, lam), upstream), x, w
    )
    np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        assert g.dtype == np.float32
        scale = np.max(np.abs(e))
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * scale)


# ------------------------------------------------- normalised class weights


def _unit_rows(w):
    """The rows of `w` over their norms, zero rows times 1e6, by autodiff."""
    w = keras.ops.convert_to_tensor(w)
    squares = keras.ops.sum(w * w, axis=1, keepdims=True)
    # Not clip: on PyTorch it rounds the bound to float32.
    zero = keras.ops.cast(squares == 0.0, squares.dtype)
    return w * keras.ops.rsqrt(squares + zero * 1e-12)


@pytest.mark.parametrize(
    "margin", [1, 4, CosineMargin(0.35), ArcMargin(0.5)], ids=str
)
@pytest.mark.parametrize(
    "labels",
    [np.arange(BATCH) % NUM_CLASSES, np.array([0, 3, 3, 7, 10, 0])],
    ids=["few_classes", "many_classes"],
)
def test_normalized_weights_equal_unit_rows(x64, margin, labels):
    """`normalize_weights=True` gives the values and gradients of the op on
    the unit rows of the kernel, normalised by autodiff-able ops; a zero
    row, labelled or not, stays finite and gets the same gradient."""
    rng = np.random.default_rng(11)
    batch, num_classes = len(labels), max(int(labels.max()) + 1, NUM_CLASSES)
    x = rng.standard_normal((batch, DIM))
    w = rng.standard_normal((num_classes, DIM)) * rng.uniform(
        0.5, 2.0, (num_classes, 1)
    )
    w[labels[-1]] = 0.0
    w[num_classes - 2] = 0.0
    upstream = rng.standard_normal((batch, num_classes))
    labels = labels.astype("int32")

    def folded(x, w):
        out = ops.margin_logits(
            x, w, labels, margin, 0.5, normalize_weights=True
        )[0]
        return keras.ops.multiply(out, upstream)

    def unit(x, w):
        out = ops.margin_logits(x, _unit_rows(w), labels, margin, 0.5)[0]
        return keras.ops.multiply(out, upstream)

    out, grads = gradients(folded, x, w)
    expected, expected_grads = gradients(unit, x, w)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == np.float64
        assert np.all(np.isfinite(got))
        # A zero row's gradient is 1e6 times a unit row's.
        atol = 1e-12 * max(1.0, np.max(np.abs(want)))
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    _, target, cos = ops.margin_logits(
        x, w, labels, margin, 0.5, normalize_weights=True
    )
    _, unit_target, unit_cos = ops.margin_logits(
        x, _unit_rows(w), labels, margin, 0.5
    )
    np.testing.assert_allclose(_numpy(target), _numpy(unit_target), atol=1e-12)
    np.testing.assert_allclose(_numpy(cos), _numpy(unit_cos), atol=1e-12)


@pytest.mark.parametrize(
    "margin, normalize_weights",
    [(4, False), (CosineMargin(0.35), True), (ArcMargin(0.5), True)],
    ids=["lsoftmax", "cosface", "arcface"],
)
def test_second_derivative(x64, margin, normalize_weights):
    """A gradient of the loss's gradient matches central differences on
    TensorFlow and JAX. PyTorch's backward pass is a first derivative only,
    so there it raises instead of leaving out the margin's terms."""
    rng = np.random.default_rng(5)
    labels = (np.arange(BATCH) % NUM_CLASSES).astype("int32")
    x, w = ref.sample_away_from_breakpoints(rng, labels, DIM, NUM_CLASSES, 4)

    def squared_input_gradient(x, w):
        def losses(x):
            logits = ops.margin_logits(
                x, w, labels, margin, 0.5, normalize_weights=normalize_weights
            )[0]
            return keras.ops.sparse_categorical_crossentropy(
                labels, logits, from_logits=True
            )

        return keras.ops.square(differentiable_gradient(losses, x))

    if BACKEND == "torch":
        with pytest.raises(RuntimeError, match="differentiate twice"):
            gradients(squared_input_gradient, x, w)
        return
    _, grads = gradients(squared_input_gradient, x, w)
    numeric = _central_differences(squared_input_gradient, x, w)
    for got, want in zip(grads, numeric):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_normalize_weights_must_be_a_bool(value):
    x, w, labels, _ = _gradient_data(4, 4, "float32")
    with pytest.raises(ValueError, match=f"normalize_weights={value!r}"):
        ops.margin_logits(x, w, labels, 4, 0.0, normalize_weights=value)


# --------------------------------------------------------------- numerics


def _finite_value_and_gradients(x, w, labels, margin, lam):
    out, (dx, dw) = gradients(_lsoftmax(labels, margin, lam), x, w)
    for value in (out, dx, dw):
        assert np.all(np.isfinite(value))
    return out


@pytest.mark.parametrize("margin", [2, 8])
def test_zero_feature_rows(margin, dtype):
    x, w, labels = _spread_data(margin, dtype)
    x[[1, 5]] = 0.0
    out = _finite_value_and_gradients(x, w, labels, margin, 0.0)
    np.testing.assert_array_equal(out[[1, 5]], 0.0)


@pytest.mark.parametrize("margin", [2, 8])
def test_zero_class_weights(margin, dtype):
    x, w, labels = _spread_data(margin, dtype)
    w[1] = 0.0
    labels[:3] = 1
    out = _finite_value_and_gradients(x, w, labels, margin, 0.0)
    np.testing.assert_array_equal(out[:, 1], 0.0)


@pytest.mark.parametrize("lam", [0.0, 0.5])
# Both parities of k = m − 1 at θ = π.
@pytest.mark.parametrize("margin", [2, 3, 8])
def test_parallel_and_antiparallel_features(margin, lam, dtype):
    rng = np.random.default_rng(margin)
    w = rng.standard_normal((NUM_CLASSES, DIM)).astype(dtype)
    rows = np.arange(BATCH)
    labels = (rows % NUM_CLASSES).astype(np.int32)
    # Every class on both sides, at norms from 0.5 to 3 times its weight's.
    sides = np.where(rows % 2 == 0, 1.0, -1.0) * rng.uniform(0.5, 3.0, BATCH)
    sides = sides.astype(dtype)
    x = sides[:, None] * w[labels]  # cos θ = ±1 exactly (up to rounding)
    upstream = np.zeros((BATCH, NUM_CLASSES), dtype)
    upstream[rows, labels] = 1.0
    # The upstream picks the target logits: the output holds them in place.
    out, (dx, _) = gradients(_weighted(_lsoftmax(labels, margin, lam), upstream), x, w)
    assert np.all(np.isfinite(dx))
    a = np.linalg.norm(x.astype(np.float64), axis=1)
    b = np.linalg.norm(w.astype(np.float64)[labels], axis=1)
    cos = np.sign(sides)
    # ψ(0) = 1 and ψ(π) = 1 − 2m; ψ'(θ) = 0 at both ends, so ∂t/∂x is radial.
    factor = (lam * cos + np.where(cos > 0, 1.0, 1.0 - 2.0 * margin)) / (1 + lam)
    tol = {"float32": 1e-4, "float64": 1e-9}[dtype]
    expected = a * b * factor
    # No target logit is near 0 (|factor| >= 1); the atol is only a floor.
    np.testing.assert_allclose(
        out[rows, labels],
        expected,
        rtol=tol,
        atol=1e-2 * tol * np.max(np.abs(expected)),
    )
    x_hat = x / a[:, None]
    # The gradient's scale is b·(2m − 1) at most; near-zero entries of x̂
    # need the absolute part.
    atol = tol * np.max(b) * 2 * margin
    np.testing.assert_allclose(dx, (b * factor)[:, None] * x_hat, rtol=tol, atol=atol)


@pytest.mark.parametrize("margin", [2, 8])
def test_large_norms_float32(margin):
    x, w, labels = _spread_data(margin, "float64")
    x = 1e4 * x / np.linalg.norm(x, axis=1, keepdims=True)
    w = 1e4 * w / np.linalg.norm(w, axis=1, keepdims=True)
    x, w = x.astype(np.float32), w.astype(np.float32)
    out = _finite_value_and_gradients(x, w, labels, margin, 0.0)
    expected = ref.lsoftmax_ref(x, w, labels, margin, 0.0)
    np.testing.assert_allclose(
        out, expected, rtol=0, atol=1e-5 * np.max(np.abs(expected))
    )


@pytest.mark.parametrize("half, tol", [("float16", 5e-3), ("bfloat16", 3e-2)])
def test_half_precision_inputs_compute_in_float32(half, tol):
    x, w, labels = _spread_data(4, "float32")
    x_half, w_half = keras.ops.cast(x, half), keras.ops.cast(w, half)
    out = ops.lsoftmax_logits(x_half, w_half, labels, 4, 0.0)
    assert _dtype_name(out) == "float32"
    assert _dtype_name(ops.plain_logits(x_half, w_half)) == "float32"
    # The half inputs are only upcast: identical to float32 on those values.
    upcast = ops.lsoftmax_logits(
        keras.ops.cast(x_half, "float32"),
        keras.ops.cast(w_half, "float32"),
        labels,
        4,
        0.0,
    )
    np.testing.assert_allclose(_numpy(out), _numpy(upcast), rtol=0, atol=1e-6)
    # Close to the float32 computation, up to the rounding of the inputs.
    full = _numpy(ops.lsoftmax_logits(x, w, labels, 4, 0.0))
    np.testing.assert_allclose(
        _numpy(out), full, rtol=0, atol=tol * np.max(np.abs(full))
    )


def test_float16_gradients_keep_the_input_dtype():
    x, w, labels = _spread_data(4, "float16")
    _, (dx, dw) = gradients(_lsoftmax(labels, 4, 0.0), x, w)
    assert dx.dtype == dw.dtype == np.float16
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dw))


# ------------------------------------------------------ checks and dtypes


@pytest.mark.parametrize("margin", [1, 4, 9])
def test_check_margin_returns_valid_margins(margin):
    assert ops.check_margin(margin) == margin


@pytest.mark.parametrize("margin", [0, -1, 2.5, 2.0, True, "4", None])
def test_invalid_margin(margin):
    x, w, labels = _spread_data(0, "float32", batch=4)
    with pytest.raises(ValueError, match=re.escape(f"margin={margin!r}")):
        ops.check_margin(margin)
    with pytest.raises(ValueError, match=re.escape(f"margin={margin!r}")):
        ops.lsoftmax_logits(x, w, labels, margin, 0.0)
    with pytest.raises(ValueError, match="`margin`"):
        ops.psi(np.array([0.5], np.float32), margin)


@pytest.mark.parametrize(
    "dtypes, expected",
    [
        (("float32",), "float32"),
        (("float16", "bfloat16"), "float32"),
        (("float16", "float64"), "float64"),
        (("float64", "float32"), "float64"),
    ],
)
def test_compute_dtype(dtypes, expected):
    assert ops.compute_dtype(*dtypes) == expected


def test_compute_dtype_takes_backend_dtypes():
    half = keras.ops.zeros((1,), "float16")
    single = keras.ops.zeros((1,), "float32")
    assert ops.compute_dtype(half.dtype, single.dtype) == "float32"
    assert ops.compute_dtype(np.float64, half.dtype) == "float64"


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8])
def test_check_labels_returns_int32(dtype):
    got = ops.check_labels(np.array([0, 4, 2], dtype), 5)
    assert _dtype_name(got) == "int32"
    np.testing.assert_array_equal(_numpy(got), [0, 4, 2])


@pytest.mark.parametrize("lam", [-0.5, -1, float("nan")])
def test_negative_python_lambda(lam):
    x, w, labels = _spread_data(0, "float32", batch=4)
    with pytest.raises(ValueError, match="`lam`"):
        ops.lsoftmax_logits(x, w, labels, 4, lam)


def test_non_scalar_lambda():
    x, w, labels = _spread_data(0, "float32", batch=4)
    with pytest.raises(ValueError, match="Expected `lam` to be a scalar"):
        ops.lsoftmax_logits(x, w, labels, 4, np.array([0.5, 0.5], np.float32))


def test_lambda_as_tensor_and_variable():
    x, w, labels = _spread_data(4, "float32")
    expected = _numpy(ops.lsoftmax_logits(x, w, labels, 4, 2.0))
    for lam in (keras.ops.convert_to_tensor(2.0), keras.Variable(2.0)):
        got = _numpy(ops.lsoftmax_logits(x, w, labels, 4, lam))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "x_shape, w_shape, match",
    [
        ((4,), (5, 3), "Expected `inputs` of shape"),
        ((4, 3, 1), (5, 3), "Expected `inputs` of shape"),
        ((4, 3), (5, 3, 1), "Expected `kernel` of shape"),
        ((4, 2), (5, 3), "The last dimension of `inputs`"),
    ],
)
def test_inputs_of_wrong_rank_or_size(x_shape, w_shape, match):
    with pytest.raises(ValueError, match=match):
        ops.lsoftmax_logits(
            np.ones(x_shape, np.float32),
            np.ones(w_shape, np.float32),
            np.zeros(4, np.int32),
            4,
            0.0,
        )


@pytest.mark.parametrize(
    "labels, match",
    [
        (np.zeros((6, 1), np.int32), r"shape \(batch_size,\)"),  # (B, 1)
        (np.zeros((6, 5), np.int32), r"shape \(batch_size,\)"),  # one-hot-like
        (np.array(0, np.int32), r"shape \(batch_size,\)"),  # scalar
        (np.zeros(7, np.int32), "one label per row"),  # one too many
        (np.zeros(1, np.int32), "one label per row"),  # would broadcast
        (np.zeros(6, np.float32), "integer class ids"),
    ],
    ids=["B1", "BC", "scalar", "B+1", "one", "float"],
)
def test_labels_of_wrong_shape_or_dtype(labels, match):
    x, w, _ = _spread_data(0, "float32", batch=6)
    with pytest.raises(ValueError, match=match):
        ops.check_labels(labels, 5, x)
    with pytest.raises(ValueError, match=match):
        ops.lsoftmax_logits(x, w, labels, 4, 0.0)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("bad", [-1, 5])
def test_labels_out_of_range(bad, dtype):
    x, w, _ = _spread_data(0, "float32", batch=4)
    labels = np.array([0, bad, 1, 2], dtype)
    match = r"`labels` in \[0, 5\)"
    with pytest.raises(_range_error(), match=match):
        ops.check_labels(labels, 5)
    with pytest.raises(_range_error(), match=match):
        ops.lsoftmax_logits(x, w, labels, 4, 0.0)
