"""Tests of the JAX op `keras_lsoftmax.backend.jax.ops`.

Forward values are compared with the float64 NumPy reference of the paper's
formula (`tests/numpy_reference.py`), gradients with plain JAX autodiff of
the same math (interval k by arccos, under `stop_gradient`) and with float64
central finite differences.
"""

import keras
import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from keras_lsoftmax import ops as public_ops  # noqa: E402
from keras_lsoftmax.backend.jax import ops  # noqa: E402
from keras_lsoftmax.margins import ArcMargin  # noqa: E402
from keras_lsoftmax.margins import CosineMargin  # noqa: E402
from keras_lsoftmax.margins import as_target_margin  # noqa: E402
from tests import numpy_reference as ref  # noqa: E402
from tests.backend_utils import gradients  # noqa: E402

pytestmark = [
    pytest.mark.jax,
    pytest.mark.skipif(
        keras.backend.backend() != "jax", reason="needs KERAS_BACKEND=jax"
    ),
]

MARGINS = [1, 2, 3, 4]
# Repeated labels: the kernel gradient must add up every sample of a class.
LABELS = np.array([0, 2, 0, 1, 4, 2], dtype=np.int32)
NUM_CLASSES = 5


@pytest.fixture
def x64():
    """Enables float64 in JAX for one test, then restores the setting."""
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _spread_data(seed, batch=48, dim=4, num_classes=5):
    """(x, w, labels) in float64 with target angles spread over [0, π]."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((num_classes, dim))
    labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
    theta = rng.permutation(np.linspace(0.005, np.pi - 0.005, batch))
    return ref.features_at_angles(rng, w, labels, theta), w, labels


def _gradient_data(seed, margin):
    """Float64 (x, w, upstream) with target angles off the breakpoints of ψ."""
    rng = np.random.default_rng(seed)
    x, w = ref.sample_away_from_breakpoints(rng, LABELS, 3, NUM_CLASSES, margin)
    upstream = rng.standard_normal((len(LABELS), NUM_CLASSES))
    return x, w, upstream


def _logits(margin, lam, valid=None):
    """The op's margin logits as a function of (x, w, labels)."""

    def fn(x, w, labels):
        return ops.margin_logits(x, w, labels, margin, lam, valid)[0]

    return fn


def _autodiff_logits(x, w, labels, margin, lam):
    """The L-Softmax logits in plain jnp, for differentiation by JAX."""
    rows = jnp.arange(labels.shape[0])
    w_y = w[labels]
    a = jnp.linalg.norm(x, axis=1)
    b = jnp.linalg.norm(w_y, axis=1)
    cos = jnp.clip(jnp.sum(x * w_y, axis=1) / (a * b), -1.0, 1.0)
    theta = jax.lax.stop_gradient(jnp.arccos(cos))
    k = jnp.minimum(jnp.floor(theta / (jnp.pi / margin)), margin - 1.0)
    t_prev, t = jnp.ones_like(cos), cos
    for _ in range(margin - 1):
        t_prev, t = t, 2.0 * cos * t - t_prev
    psi = (1.0 - 2.0 * jnp.mod(k, 2.0)) * t - 2.0 * k
    target = (lam * a * b * cos + a * b * psi) / (1.0 + lam)
    return (x @ w.T).at[rows, labels].set(target)


def _weighted(fn, upstream):
    """`fn` times a fixed upstream gradient, so that sum() weighs each logit."""
    return lambda *args: fn(*args) * upstream


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("lam", [0.0, 0.5, 1000.0])
@pytest.mark.parametrize("margin", MARGINS)
def test_forward_matches_numpy_reference_float64(x64, margin, lam):
    x, w, labels = _spread_data(margin)
    got = ops.margin_logits(x, w, labels, margin, lam)[0]
    assert got.dtype == jnp.float64
    expected = ref.lsoftmax_ref(x, w, labels, margin, lam)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1000.0])
@pytest.mark.parametrize("margin", MARGINS)
def test_forward_matches_numpy_reference_float32(margin, lam):
    x, w, labels = _spread_data(margin)
    x, w = x.astype(np.float32), w.astype(np.float32)
    got = ops.margin_logits(x, w, labels, margin, lam)[0]
    assert got.dtype == jnp.float32
    # The reference sees the same rounded inputs: only the op's rounding.
    expected = ref.lsoftmax_ref(x, w, labels, margin, lam)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)


def test_margin_logits_extra_outputs(x64):
    x, w, labels = _spread_data(3)
    _, plain_target, cos = ops.margin_logits(x, w, labels, 3, 0.0)
    _, _, dot, expected_cos = ref.target_geometry(x, w, labels)
    np.testing.assert_allclose(plain_target, dot, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cos, expected_cos, rtol=0, atol=1e-12)


@pytest.mark.parametrize("margin", [1, 2, 3, 4, 6])
def test_psi_matches_paper_definition(x64, margin):
    theta = np.linspace(1e-3, np.pi - 1e-3, 2001)
    p, dp = public_ops.psi(np.cos(theta), margin)
    np.testing.assert_allclose(p, ref.psi_ref(theta, margin), atol=1e-10)
    # dψ/dc = (dψ/dθ) / (dc/dθ) = (−1)^k m sin(mθ) / sin θ.
    k = np.clip(np.floor(theta / (np.pi / margin)), 0, margin - 1)
    expected_dp = (-1.0) ** k * margin * np.sin(margin * theta) / np.sin(theta)
    np.testing.assert_allclose(dp, expected_dp, atol=1e-8 * margin**2)


def test_psi_clips_out_of_range_cosines(x64):
    p, _ = public_ops.psi(np.array([1.5, -1.5]), 4)
    np.testing.assert_allclose(p, [1.0, -7.0], atol=1e-12)


def test_plain_logits():
    x, w, _ = _spread_data(0)
    x, w = x.astype(np.float32), w.astype(np.float32)
    np.testing.assert_allclose(ops.plain_logits(x, w), x @ w.T, atol=1e-5)


# -------------------------------------------------------------- gradients


@pytest.mark.parametrize("lam", [0.0, 0.5, 10.0])
@pytest.mark.parametrize("margin", MARGINS)
def test_gradient_matches_autodiff_float64(x64, margin, lam):
    x, w, upstream = _gradient_data(10 * margin + int(lam), margin)
    _, got = gradients(_weighted(_logits(margin, lam), upstream), x, w, LABELS)

    def reference(x, w, labels):
        return _autodiff_logits(x, w, labels, margin, lam)

    _, expected = gradients(_weighted(reference, upstream), x, w, LABELS)
    for g, e in zip(got[:2], expected[:2]):
        assert g.dtype == np.float64
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-10)


def _central_differences(loss, args, eps=1e-6):
    """∂loss/∂args[j] for each j, by central differences of `loss(*args)`."""
    result = []
    for j, arg in enumerate(args):
        numeric = np.zeros_like(arg)
        for index in np.ndindex(arg.shape):
            shifted = [list(args), list(args)]
            for sign, row in zip((1.0, -1.0), shifted):
                step = np.zeros_like(arg)
                step[index] = sign * eps
                row[j] = arg + step
            plus, minus = (float(loss(*row)) for row in shifted)
            numeric[index] = (plus - minus) / (2 * eps)
        result.append(numeric)
    return result


@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("margin", MARGINS)
def test_gradient_matches_finite_differences(x64, margin, lam):
    x, w, upstream = _gradient_data(margin, margin)
    fn = _weighted(_logits(margin, lam), upstream)
    _, (dx, dw, _) = gradients(fn, x, w, LABELS)
    labels = jnp.asarray(LABELS)
    loss = jax.jit(lambda x, w: jnp.sum(fn(x, w, labels)))
    numeric_dx, numeric_dw = _central_differences(loss, (x, w))
    np.testing.assert_allclose(dx, numeric_dx, rtol=0, atol=1e-6)
    np.testing.assert_allclose(dw, numeric_dw, rtol=0, atol=1e-6)


@pytest.mark.parametrize("margin", MARGINS)
def test_masked_rows_get_plain_logits_and_gradient(margin):
    x, w, upstream = _gradient_data(margin, margin)
    x, w = x.astype(np.float32), w.astype(np.float32)
    valid = np.array([1, 0, 1, 0, 0, 1], dtype=np.float32)
    dense = _weighted(lambda x, w, labels: x @ w.T, upstream)
    plain_out, (plain_dx, plain_dw, _) = gradients(dense, x, w, LABELS)
    margin_out, (margin_dx, _, _) = gradients(
        _weighted(_logits(margin, 0.5), upstream), x, w, LABELS
    )
    masked = _weighted(_logits(margin, 0.5, valid), upstream)
    out, (dx, dw, _) = gradients(masked, x, w, LABELS)
    keep = valid[:, None] == 1
    np.testing.assert_allclose(
        out, np.where(keep, margin_out, plain_out), atol=1e-6
    )
    np.testing.assert_allclose(
        dx, np.where(keep, margin_dx, plain_dx), atol=1e-5
    )
    # ∂L/∂W is linear in the upstream: the margin rows' part plus the rest.
    _, (_, margin_part, _) = gradients(
        _weighted(_logits(margin, 0.5), upstream * valid[:, None]), x, w, LABELS
    )
    _, (_, plain_part, _) = gradients(
        _weighted(dense, 1 - valid[:, None]), x, w, LABELS
    )
    np.testing.assert_allclose(dw, margin_part + plain_part, atol=1e-5)


def test_margin_one_is_plain_dense():
    x, w, upstream = _gradient_data(1, 1)
    x, w = x.astype(np.float32), w.astype(np.float32)
    dense = _weighted(lambda x, w, labels: x @ w.T, upstream)
    expected_out, expected = gradients(dense, x, w, LABELS)
    out, got = gradients(_weighted(_logits(1, 0.5), upstream), x, w, LABELS)
    np.testing.assert_allclose(out, expected_out, atol=1e-6)
    for g, e in zip(got[:2], expected[:2]):
        np.testing.assert_allclose(g, e, atol=1e-6)


@pytest.mark.parametrize("margin", [2, 4])
def test_zero_feature_row_and_zero_class_weight_give_finite_gradients(margin):
    x, w, upstream = _gradient_data(margin, margin)
    x, w = x.astype(np.float32), w.astype(np.float32)
    x[0] = 0.0
    w[LABELS[1]] = 0.0
    out, (dx, dw, _) = gradients(
        _weighted(_logits(margin, 0.0), upstream), x, w, LABELS
    )
    for value in (out, dx, dw):
        assert np.all(np.isfinite(value))


@pytest.mark.parametrize("margin", [1, 3])
def test_jit_matches_eager(margin):
    x, w, upstream = _gradient_data(margin, margin)
    x, w = x.astype(np.float32), w.astype(np.float32)
    labels = jnp.asarray(LABELS)

    def loss(x, w):
        return jnp.sum(_logits(margin, 0.5)(x, w, labels) * upstream)

    eager = jax.value_and_grad(loss, argnums=(0, 1))(x, w)
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)
    for e, c in zip(jax.tree.leaves(eager), jax.tree.leaves(compiled)):
        np.testing.assert_allclose(e, c, rtol=0, atol=1e-5)


@pytest.mark.parametrize("margin", [4, CosineMargin(0.35)], ids=str)
def test_normalized_weights_jit_matches_eager(x64, margin):
    x, w, labels = _spread_data(3)
    w = w * np.random.default_rng(4).uniform(0.5, 2.0, (NUM_CLASSES, 1))
    upstream = np.random.default_rng(5).standard_normal((len(labels), NUM_CLASSES))

    def loss(x, w):
        out = ops.margin_logits(
            x, w, labels, margin, 0.5, normalize_weights=True
        )[0]
        return jnp.sum(out * upstream)

    eager = jax.value_and_grad(loss, argnums=(0, 1))(x, w)
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)
    for e, c in zip(jax.tree.leaves(eager), jax.tree.leaves(compiled)):
        assert e.dtype == np.float64
        np.testing.assert_allclose(e, c, rtol=0, atol=1e-12 * np.abs(c).max())


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize(
    "margin", [4, CosineMargin(0.35), ArcMargin(0.5)], ids=str
)
def test_forward_updates_the_logits_in_place(margin, normalize):
    """The compiled forward pass writes the B target logits into the (B, C)
    product: XLA allocates no second (B, C) buffer, whatever the margin."""
    batch, classes, dim = 64, 2000, 16
    args = (
        jnp.ones((batch, dim)),
        jnp.ones((classes, dim)),
        jnp.zeros((batch,), jnp.int32),
        jnp.asarray(0.0),
        None,
    )
    compiled = ops._forward.lower(
        *args, margin=as_target_margin(margin), normalize_weights=normalize
    ).compile()
    memory = compiled.memory_analysis()
    if memory is None:
        pytest.skip("no buffer assignment on this platform")
    logits_bytes = batch * classes * 4
    assert memory.output_size_in_bytes >= logits_bytes
    assert memory.temp_size_in_bytes < logits_bytes / 2


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("margin", [1, 4, CosineMargin(0.35)], ids=str)
def test_autodiff_keeps_the_operands_themselves(margin, normalize):
    """Outside `jit` the backward pass keeps the caller's kernel and
    features, not copies of them."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 13)), "float32")
    w = jnp.asarray(np.random.default_rng(1).standard_normal((37, 13)), "float32")
    labels = jnp.asarray(LABELS)

    def count():
        return sum(a.shape in (x.shape, w.shape) for a in jax.live_arrays())

    before = count()
    out, vjp = jax.vjp(
        lambda x, w: ops.margin_logits(
            x, w, labels, margin, 0.5, normalize_weights=normalize
        )[0],
        x,
        w,
    )
    assert count() == before
    assert vjp(jnp.ones_like(out))[1].shape == w.shape


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_inputs_compute_in_float32(dtype):
    x, w, upstream = _gradient_data(4, 4)
    x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    labels = jnp.asarray(LABELS)
    logits, target, cos = ops.margin_logits(x, w, labels, 4, 0.5)
    assert logits.dtype == target.dtype == cos.dtype == jnp.float32

    def loss(x, w):
        return jnp.sum(_logits(4, 0.5)(x, w, labels) * upstream)

    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    assert dx.dtype == dw.dtype == dtype
    expected = ref.lsoftmax_ref(
        np.asarray(x, np.float64), np.asarray(w, np.float64), LABELS, 4, 0.5
    )
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


def test_float64_with_float32_computes_in_float64(x64):
    x, w, labels = _spread_data(2)
    logits = ops.margin_logits(x, w.astype(np.float32), labels, 2, 0.5)[0]
    assert logits.dtype == jnp.float64
    expected = ref.lsoftmax_ref(x, w.astype(np.float32), labels, 2, 0.5)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-10)


# --------------------------------------------------------------- arguments


def test_lambda_as_array_and_variable_in_stateless_scope():
    x, w, labels = _spread_data(4)
    x, w = x.astype(np.float32), w.astype(np.float32)
    expected = ops.margin_logits(x, w, labels, 4, 2.0)[0]
    as_array = jax.jit(lambda lam: ops.margin_logits(x, w, labels, 4, lam)[0])
    np.testing.assert_allclose(as_array(jnp.float32(2.0)), expected, atol=1e-5)
    lam = keras.Variable(0.5, trainable=False)
    with keras.StatelessScope(state_mapping=[(lam, jnp.float32(2.0))]):
        scoped = ops.margin_logits(x, w, labels, 4, lam)[0]
    np.testing.assert_allclose(scoped, expected, atol=1e-5)


def test_with_plain_targets_restores_plain_logits():
    x, w, labels = _spread_data(4)
    x, w = x.astype(np.float32), w.astype(np.float32)
    logits, plain_target, _ = ops.margin_logits(x, w, labels, 4, 0.0)
    expected = ops.plain_logits(x, w)
    restore = jax.jit(ops.with_plain_targets)
    for fn in (ops.with_plain_targets, restore):
        np.testing.assert_array_equal(
            fn(logits, jnp.asarray(labels), plain_target), expected
        )


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8])
def test_check_labels_returns_int32(dtype):
    labels = ops.check_labels(LABELS.astype(dtype), NUM_CLASSES)
    assert labels.dtype == jnp.int32
    np.testing.assert_array_equal(labels, LABELS)


@pytest.mark.parametrize(
    "labels, match",
    [
        (np.array([0.0, 1.0]), "integer class ids"),
        (np.array([[0, 1]]), r"shape \(batch_size,\)"),
        (np.array([0, 1, 2]), "one label per row"),
        (np.array([0, 5]), r"in \[0, 5\). Received labels from 0 to 5"),
        (np.array([-1, 3]), r"in \[0, 5\). Received labels from -1 to 3"),
        # Not narrowed to int32 (and wrapped into range) before the check.
        (np.array([0, 2**32 + 1]), "from 0 to 4294967297"),
    ],
)
def test_check_labels_errors(labels, match):
    with pytest.raises(ValueError, match=match):
        ops.check_labels(labels, NUM_CLASSES, np.zeros((2, 3), np.float32))


def test_out_of_range_labels_pass_unchecked_under_jit():
    x, w, _ = _spread_data(0, batch=2)
    x, w = x.astype(np.float32), w.astype(np.float32)

    @jax.jit
    def fn(x, w, labels):
        labels = ops.check_labels(labels, NUM_CLASSES, x)
        return ops.margin_logits(x, w, labels, 4, 0.0)[0]

    logits = fn(x, w, jnp.array([0, NUM_CLASSES + 3]))
    # The label is clamped to the last class.
    clamped = ops.margin_logits(x, w, np.array([0, NUM_CLASSES - 1]), 4, 0.0)
    np.testing.assert_allclose(logits, clamped[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "x_shape, w_shape, match",
    [
        ((2, 3, 1), (5, 3), "shape \\(batch_size, input_dim\\)"),
        ((2, 3), (5,), "shape \\(batch_size, input_dim\\)"),
        ((2, 3), (5, 4), "last dimension"),
    ],
)
def test_margin_logits_shape_errors(x_shape, w_shape, match):
    with pytest.raises(ValueError, match=match):
        ops.margin_logits(
            np.zeros(x_shape, np.float32),
            np.zeros(w_shape, np.float32),
            np.zeros(2, np.int32),
            2,
            0.0,
        )


@pytest.mark.parametrize(
    "margin, lam, match",
    [
        (2, -1.0, "expected a float >= 0"),
        (1, -1.0, "expected a float >= 0"),
        (2, np.zeros(2, np.float32), "Expected `lam` to be a scalar"),
        (0, 0.0, "positive integer"),
        (2.0, 0.0, "positive integer"),
    ],
)
def test_margin_logits_argument_errors(margin, lam, match):
    x, w, labels = _spread_data(0, batch=2)
    with pytest.raises(ValueError, match=match):
        ops.margin_logits(x, w, labels, margin, lam)
