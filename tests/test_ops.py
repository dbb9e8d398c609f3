"""Tests of `keras_lsoftmax.ops`: values, gradients, compilation, errors.

Forward values are compared with the float64 NumPy reference of the paper's
formula (`tests/numpy_reference.py`, which takes θ by arccos), gradients with
float64 finite differences and with plain autodiff of the same math.
"""

import re

import numpy as np
import pytest
import tensorflow as tf

from keras_lsoftmax import ops
from tests import numpy_reference as ref

MARGINS = [1, 2, 3, 4, 5, 6]
# Repeated labels: the kernel gradient must add up every sample of a class.
LABELS = np.array([0, 2, 0, 1])
NUM_CLASSES = 3


def _rel_err(got, expected) -> float:
    got = np.asarray(got, dtype=np.float64)
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


def _spread_data(seed, batch=48, dim=4, num_classes=5):
    """(x, w, labels) in float64 with target angles spread over [0, π]."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((num_classes, dim))
    labels = rng.integers(0, num_classes, size=batch)
    theta = rng.permutation(np.linspace(0.005, np.pi - 0.005, batch))
    return ref.features_at_angles(rng, w, labels, theta), w, labels


def _grads(x, w, labels, margin, lam, upstream, fn=ops.lsoftmax_logits):
    """Output and gradients of sum(fn(...) * upstream) w.r.t. (x, w)."""
    x, w = tf.convert_to_tensor(x), tf.convert_to_tensor(w)
    with tf.GradientTape() as tape:
        tape.watch([x, w])
        out = fn(x, w, labels, margin, lam)
        loss = tf.reduce_sum(out * tf.cast(upstream, out.dtype))
    return out, tape.gradient(loss, [x, w])


@pytest.fixture(params=["full_pass", "row_scatter"])
def radial_path(request, monkeypatch):
    """Runs a test through both ways the op adds the kernel's radial term."""
    full_pass = request.param == "full_pass"
    monkeypatch.setattr(ops, "_full_pass", lambda x, w: full_pass)
    return request.param


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-10)])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1000.0])
@pytest.mark.parametrize("margin", MARGINS)
def test_forward_matches_numpy_reference(margin, lam, dtype, tol):
    x, w, labels = _spread_data(margin)
    x, w = x.astype(dtype), w.astype(dtype)
    # The reference sees the same (rounded) inputs, so only the op's own
    # rounding is measured.
    expected = ref.lsoftmax_ref(x, w, labels, margin, lam)
    got = ops.lsoftmax_logits(x, w, labels, margin, lam)
    assert got.dtype == dtype
    assert _rel_err(got, expected) <= tol


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1e12])
def test_margin_one_equals_plain_logits_exactly(lam, dtype):
    x, w, labels = _spread_data(1)
    x, w = x.astype(dtype), w.astype(dtype)
    got = ops.lsoftmax_logits(x, w, labels, 1, lam)
    np.testing.assert_array_equal(got, ops.plain_logits(x, w))


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-6), (np.float64, 1e-10)])
@pytest.mark.parametrize("margin", [2, 4, 6])
def test_huge_lambda_tends_to_plain_logits(margin, dtype, tol):
    x, w, labels = _spread_data(margin)
    x, w = x.astype(dtype), w.astype(dtype)
    got = ops.lsoftmax_logits(x, w, labels, margin, 1e12)
    assert _rel_err(got, x.astype(np.float64) @ w.astype(np.float64).T) <= tol


@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("margin", [2, 3, 4, 5, 6])
def test_non_target_logits_are_exactly_plain(margin, lam):
    # A port once scaled the non-target logits by λ/(1+λ); at λ = 0 that
    # zeroes them, at λ = 0.5 it divides them by 3.
    x, w, labels = _spread_data(margin)
    got = ops.lsoftmax_logits(x, w, labels, margin, lam).numpy()
    plain = ops.plain_logits(x, w).numpy()
    non_target = np.ones_like(plain, dtype=bool)
    non_target[np.arange(len(labels)), labels] = False
    np.testing.assert_array_equal(got[non_target], plain[non_target])
    # ... while every target logit does change (no sample sits at θ = 0).
    assert np.all(got[~non_target] != plain[~non_target])


def test_margin_logits_extra_outputs():
    x, w, labels = _spread_data(3)
    logits, plain_target, cos = ops.margin_logits(x, w, labels, 3, 0.0)
    _, _, dot, expected_cos = ref.target_geometry(x, w, labels)
    np.testing.assert_allclose(plain_target, dot, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cos, expected_cos, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(logits, ops.lsoftmax_logits(x, w, labels, 3, 0.0))


# ---------------------------------------------------------------------- ψ


def _off_sign_zeros(c, margin):
    # Caffe's sign() is 0 exactly on a threshold; compare elsewhere.
    zeros = {2: [0.0], 3: [0.0, 0.5, -0.5], 4: [0.0, 0.5**0.5, -(0.5**0.5)]}
    keep = np.ones_like(c, dtype=bool)
    for z in zeros[margin]:
        keep &= np.abs(c - z) > 1e-9
    return c[keep]


@pytest.mark.parametrize("margin", [2, 3, 4])
def test_psi_matches_caffe_closed_forms(margin):
    c = _off_sign_zeros(np.linspace(-1.0, 1.0, 4001), margin)
    p, _ = ops.psi(c, margin)
    np.testing.assert_allclose(p, ref.caffe_psi(c, margin), rtol=0, atol=1e-12)


@pytest.mark.parametrize("margin", [1, 2, 3, 4, 5, 6, 8])
def test_psi_and_derivative_match_paper_definition(margin):
    theta = np.linspace(1e-3, np.pi - 1e-3, 3001)
    p, dp = ops.psi(np.cos(theta), margin)
    np.testing.assert_allclose(p, ref.psi_ref(theta, margin), atol=1e-10)
    # dψ/dc = (dψ/dθ) / (dc/dθ) = (−1)^k m sin(mθ) / sin θ.
    k = np.clip(np.floor(theta / (np.pi / margin)), 0, margin - 1)
    expected_dp = (-1.0) ** k * margin * np.sin(margin * theta) / np.sin(theta)
    np.testing.assert_allclose(dp, expected_dp, atol=1e-8 * margin**2)


@pytest.mark.parametrize("margin", [1, 2, 3, 4, 5, 6, 8])
def test_psi_endpoints(margin):
    p, dp = ops.psi(np.array([1.0, -1.0]), margin)
    np.testing.assert_allclose(p, [1.0, 1.0 - 2.0 * margin], atol=1e-12)
    # dψ/dc = m² at both ends: (−1)^k m U_{m−1}(±1) with U_{m−1}(−1) and
    # (−1)^k (k = m − 1) of the same sign.
    np.testing.assert_allclose(dp, [margin**2, margin**2], atol=1e-9)


@pytest.mark.parametrize("margin", [1, 2, 3, 4, 5, 6, 8])
def test_psi_decreasing_and_continuous_in_theta(margin):
    theta = np.linspace(0.0, np.pi, 20001)
    p, _ = ops.psi(np.cos(theta), margin)
    steps = np.diff(p.numpy())
    assert np.all(steps < 0)
    # |dψ/dθ| = m |sin mθ| ≤ m, so no step may exceed m·Δθ (a jump would).
    assert np.max(np.abs(steps)) <= margin * (theta[1] - theta[0]) * (1 + 1e-9)


@pytest.mark.parametrize("margin", [2, 3, 4, 5, 6, 8])
def test_psi_continuous_at_thresholds(margin):
    j = np.arange(1, margin)
    c = np.cos(j * np.pi / margin)
    # At cos(jπ/m) both neighbouring pieces give ψ = 1 − 2j.
    for probe in (c, np.nextafter(c, 2.0), np.nextafter(c, -2.0), c + 1e-9, c - 1e-9):
        p, _ = ops.psi(probe, margin)
        np.testing.assert_allclose(p, 1.0 - 2.0 * j, atol=1e-6)


def test_psi_clips_out_of_range_cosines():
    p, _ = ops.psi(np.array([1.5, -1.5]), 4)
    np.testing.assert_allclose(p, [1.0, -7.0], atol=1e-12)


# -------------------------------------------------------------- gradients


@pytest.mark.parametrize("lam", [0.0, 0.5, 10.0])
@pytest.mark.parametrize("margin", MARGINS)
def test_gradient_matches_finite_differences(margin, lam, radial_path):
    rng = np.random.default_rng(10 * margin + int(lam))
    x, w = ref.sample_away_from_breakpoints(rng, LABELS, 3, NUM_CLASSES, margin)

    def f(x, w):
        return ops.lsoftmax_logits(x, w, LABELS, margin, lam)

    theoretical, numerical = tf.test.compute_gradient(f, [x, w], delta=1e-6)
    for t, n in zip(theoretical, numerical):
        # Absolute 1e-6, scaled up where the Jacobian itself exceeds 1.
        assert np.max(np.abs(t - n)) <= 1e-6 * max(1.0, np.max(np.abs(n)))


@pytest.mark.parametrize("lam", [0.0, 0.5, 10.0])
@pytest.mark.parametrize("margin", MARGINS)
def test_gradient_matches_autodiff_float32(margin, lam, radial_path):
    rng = np.random.default_rng(margin)
    labels = rng.integers(0, 4, size=16)
    x, w = ref.sample_away_from_breakpoints(rng, labels, 8, 4, margin)
    x, w = x.astype(np.float32), w.astype(np.float32)
    upstream = rng.standard_normal((16, 4))
    out, grads = _grads(x, w, labels, margin, lam, upstream)
    ref_out, ref_grads = _grads(
        x, w, labels, margin, lam, upstream, fn=ref.lsoftmax_autodiff
    )
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == tf.float32
        scale = np.max(np.abs(r))
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * scale)


def test_no_gradient_reaches_lambda():
    # λ is a schedule, not a parameter: the op reports no gradient for it.
    x, w, labels = _spread_data(0)
    lam = tf.constant(0.5, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(lam)
        out = ops.lsoftmax_logits(x, w, labels, 4, lam)
    assert tape.gradient(out, lam) is None


# ------------------------------------------------------------ compilation


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("margin", [1, 4])
def test_tf_function_and_xla_match_eager(margin, jit_compile, radial_path):
    x, w, labels = _spread_data(margin, batch=16)
    x, w = x.astype(np.float32), w.astype(np.float32)
    upstream = np.random.default_rng(0).standard_normal((16, 5))
    lam = tf.Variable(0.5)

    def step(x, w, labels):
        return _grads(x, w, labels, margin, lam, upstream)

    eager_out, eager_grads = step(x, w, labels)
    compiled = tf.function(step, jit_compile=jit_compile)
    out, grads = compiled(x, w, tf.constant(labels, tf.int32))
    np.testing.assert_allclose(out, eager_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * np.max(np.abs(e)))
    # λ is read at run time, not frozen at trace time.
    lam.assign(0.0)
    np.testing.assert_allclose(
        compiled(x, w, tf.constant(labels, tf.int32))[0],
        ops.lsoftmax_logits(x, w, labels, margin, 0.0),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("static_batch", [True, False])
@pytest.mark.parametrize("batch, num_classes", [(24, 5), (4, 300)])
def test_paths_chosen_by_batch_and_class_count(batch, num_classes, static_batch):
    # Outside XLA, with more classes than samples, the logits are (w·xᵀ)ᵀ
    # rather than x·wᵀ and the kernel gradient's radial term goes to the B
    # labelled rows rather than through the whole kernel. An unknown batch
    # size counts as 256 (more than 5 classes, fewer than 300).
    x, w, labels = _spread_data(2, batch=batch, num_classes=num_classes)
    x, w = x.astype(np.float32), w.astype(np.float32)
    upstream = np.random.default_rng(3).standard_normal((batch, num_classes))
    rows = batch if static_batch else None
    step = tf.function(
        lambda x, w: _grads(x, w, labels, 4, 0.5, upstream),
        input_signature=[
            tf.TensorSpec((rows, x.shape[1])),
            tf.TensorSpec(w.shape),
        ],
    )
    out, grads = step(x, w)
    ref_out, ref_grads = _grads(
        x, w, labels, 4, 0.5, upstream, fn=ref.lsoftmax_autodiff
    )
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * np.max(np.abs(r)))
    plain = tf.function(ops.plain_logits, input_signature=step.input_signature)
    np.testing.assert_allclose(plain(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    many_classes = num_classes > (rows or 256)
    types = [op.type for op in plain.get_concrete_function().graph.get_operations()]
    assert ("Transpose" in types) == many_classes
    graph = step.get_concrete_function().graph
    types = [op.type for op in graph.get_operations()]
    # With many logits the margin forward pass is one XLA computation, whose
    # in-place update of the labelled logits is not in this graph.
    compiled = bool(_must_compile_calls(graph))
    assert compiled == (
        many_classes
        and (rows or 256) >= ops._COMPILE_MIN_ROWS
        and (rows or 256) * num_classes >= ops._COMPILE_MIN_LOGITS
    )
    in_place = 3 if many_classes and not compiled else 2
    assert types.count("ScatterNdNonAliasingAdd") == in_place


@pytest.mark.parametrize("jit_compile", [False, True])
def test_graph_updates_labelled_entries_without_copying(jit_compile, radial_path):
    # TensorScatterAdd copies its whole (B, C) or (D, C) input outside XLA;
    # ScatterNdNonAliasingAdd reuses it but cannot be compiled by XLA.
    x, w, labels = _spread_data(4, batch=16)
    upstream = np.ones((16, 5))
    step = tf.function(
        lambda x, w: _grads(x, w, labels, 4, 0.5, upstream),
        jit_compile=jit_compile,
    )
    graph = step.get_concrete_function(x, w).graph
    types = [op.type for op in graph.get_operations()]
    in_place, copying = "ScatterNdNonAliasingAdd", "TensorScatterAdd"
    if jit_compile:
        in_place, copying = copying, in_place
    # Logits and upstream gradient, plus the labelled rows of the kernel
    # gradient unless a pass over the whole kernel adds its radial term.
    expected = 3 if radial_path == "row_scatter" else 2
    assert types.count(in_place) == expected
    assert copying not in types
    assert "TensorScatterUpdate" not in types


@pytest.mark.parametrize("in_function", [False, True])
def test_gradient_leaves_caller_tensors_unchanged(in_function, radial_path):
    # The in-place updates must never write into a buffer the caller holds.
    x, w, labels = _spread_data(4, batch=16)
    x, w = tf.constant(x), tf.constant(w)
    upstream = tf.constant(np.random.default_rng(1).standard_normal((16, 5)))
    saved = [t.numpy().copy() for t in (x, w, upstream)]

    def step(x, w, upstream):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            out = ops.lsoftmax_logits(x, w, labels, 4, 0.5)
        return out, tape.gradient(out, [x, w], output_gradients=upstream)

    if in_function:
        step = tf.function(step)
    out, grads = step(x, w, upstream)
    for tensor, before in zip((x, w, upstream), saved):
        np.testing.assert_array_equal(tensor, before)
    expected_out, expected_grads = _grads(
        x, w, labels, 4, 0.5, upstream, fn=ref.lsoftmax_autodiff
    )
    np.testing.assert_allclose(out, expected_out, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12)


# ------------------------------------------------- compiled forward pass


def _must_compile_calls(graph):
    """The function calls in `graph` that XLA must compile."""
    return [
        op
        for op in graph.get_operations()
        if op.type in ("PartitionedCall", "StatefulPartitionedCall")
        and op.node_def.attr["_XlaMustCompile"].b
    ]


# 128 samples, B·C = 128 000 logits, more classes than samples: the forward
# pass is compiled in a graph on a CPU-only machine (`ops._compile_forward`).
_MANY = dict(batch=128, dim=8, num_classes=1000)


def _many_classes_step(margin, lam, upstream, with_valid, watch_x):
    """A tf.function: margin logits and gradients (kernel only unless
    `watch_x`), on the inputs of `_MANY`."""

    @tf.function
    def step(x, w, labels, valid):
        with tf.GradientTape() as tape:
            tape.watch(w)
            if watch_x:
                tape.watch(x)
            checked = ops.check_labels(labels, w.shape[0], x)
            out = ops.margin_logits(
                x, w, checked, margin, lam, valid if with_valid else None
            )[0]
            loss = tf.reduce_sum(out * tf.cast(upstream, out.dtype))
        sources = [x, w] if watch_x else [w]
        return out, tape.gradient(loss, sources)

    return step


@pytest.mark.parametrize("watch_x", [True, False], ids=["trained", "frozen"])
@pytest.mark.parametrize("with_valid", [False, True], ids=["all", "valid"])
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("margin", [2, 4])
def test_compiled_forward_matches_plain_kernels(
    margin, dtype, tol, with_valid, watch_x, monkeypatch
):
    x, w, labels = _spread_data(margin, **_MANY)
    x, w = tf.constant(x.astype(dtype)), tf.constant(w.astype(dtype))
    labels = tf.constant(labels, tf.int32)
    rng = np.random.default_rng(margin)
    upstream = rng.standard_normal((_MANY["batch"], _MANY["num_classes"]))
    valid = tf.constant(rng.integers(0, 2, _MANY["batch"]), dtype)
    saved = [t.numpy().copy() for t in (x, w)]
    args = (x, w, labels, valid)

    step = _many_classes_step(margin, 0.5, upstream, with_valid, watch_x)
    graph = step.get_concrete_function(*args).graph
    assert len(_must_compile_calls(graph)) == 1
    # The labels reach the compiled computation (which clamps, rather than
    # rejects, labels out of range) only through the range assertions.
    (call,) = _must_compile_calls(graph)
    assert any("assert" in op.name.lower() for op in _ancestors(call))
    out, grads = step(*args)

    monkeypatch.setattr(ops, "_compile_forward", lambda x, w: False)
    plain_step = _many_classes_step(margin, 0.5, upstream, with_valid, watch_x)
    assert not _must_compile_calls(plain_step.get_concrete_function(*args).graph)
    ref_out, ref_grads = plain_step(*args)

    assert out.dtype == dtype
    np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
    assert len(grads) == len(ref_grads) == (2 if watch_x else 1)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        scale = np.max(np.abs(r))
        np.testing.assert_allclose(g, r, rtol=10 * tol, atol=10 * tol * scale)
    for tensor, before in zip((x, w), saved):
        np.testing.assert_array_equal(tensor, before)


def test_compiled_forward_matches_autodiff_reference():
    margin, lam = 4, 0.5
    x, w, labels = _spread_data(margin, **_MANY)
    upstream = np.random.default_rng(7).standard_normal(
        (_MANY["batch"], _MANY["num_classes"])
    )
    step = tf.function(lambda x, w: _grads(x, w, labels, margin, lam, upstream))
    assert _must_compile_calls(step.get_concrete_function(x, w).graph)
    out, grads = step(x, w)
    ref_out, ref_grads = _grads(
        x, w, labels, margin, lam, upstream, fn=ref.lsoftmax_autodiff
    )
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12)


def test_compiled_forward_rejects_labels_out_of_range():
    x, w, labels = _spread_data(4, **_MANY)
    fn = tf.function(lambda x, w, y: ops.lsoftmax_logits(x, w, y, 4, 0.0))
    labels[5] = _MANY["num_classes"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="`labels`"):
        fn(x, w, tf.constant(labels, tf.int32))


def test_compiled_forward_only_where_it_pays(monkeypatch):
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, (128, 8))
        w = tf.compat.v1.placeholder(tf.float32, (1000, 8))
        assert ops._compile_forward(x, w)
        # Fewer classes than samples, too few samples or too few logits.
        assert not ops._compile_forward(w, x)
        few_rows = tf.compat.v1.placeholder(tf.float32, (64, 8))
        many_classes = tf.compat.v1.placeholder(tf.float32, (100000, 8))
        assert not ops._compile_forward(few_rows, many_classes)
        few_classes = tf.compat.v1.placeholder(tf.float32, (500, 8))
        assert not ops._compile_forward(x, few_classes)
        # An unknown batch size counts as 256.
        unknown = tf.compat.v1.placeholder(tf.float32, (None, 8))
        assert ops._compile_forward(unknown, w)
        with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
            assert not ops._compile_forward(x, w)
        monkeypatch.setattr(ops, "_is_op_determinism_enabled", lambda: True)
        assert not ops._compile_forward(x, w)
    # Eager mode runs the plain kernels; so does a graph XLA compiles anyway.
    assert not ops._compile_forward(tf.zeros((128, 8)), tf.zeros((1000, 8)))
    jit = tf.function(
        lambda x, w: tf.constant(ops._compile_forward(x, w)), jit_compile=True
    )
    assert not jit(tf.zeros((128, 8)), tf.zeros((1000, 8)))


def test_margin_one_is_never_compiled():
    x, w, labels = _spread_data(1, **_MANY)
    fn = tf.function(lambda x, w: ops.lsoftmax_logits(x, w, labels, 1, 0.0))
    assert not _must_compile_calls(fn.get_concrete_function(x, w).graph)
    np.testing.assert_array_equal(fn(x, w), ops.plain_logits(x, w))


# --------------------------------------------------------------- numerics


def _assert_finite_with_grads(x, w, labels, margin, lam):
    upstream = np.ones((len(labels), w.shape[0]))
    out, grads = _grads(x, w, labels, margin, lam, upstream)
    assert np.all(np.isfinite(out))
    for g in grads:
        assert np.all(np.isfinite(g))
    return out.numpy(), [g.numpy() for g in grads]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("margin", [2, 4, 8])
def test_zero_feature_rows(margin, dtype):
    x, w, labels = _spread_data(margin, batch=8)
    x, w = x.astype(dtype), w.astype(dtype)
    x[[1, 5]] = 0.0
    out, _ = _assert_finite_with_grads(x, w, labels, margin, 0.0)
    np.testing.assert_array_equal(out[[1, 5]], 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("margin", [2, 4, 8])
def test_zero_class_weights(margin, dtype, radial_path):
    x, w, labels = _spread_data(margin, batch=8)
    x, w = x.astype(dtype), w.astype(dtype)
    w[1] = 0.0
    labels[:3] = 1
    out, _ = _assert_finite_with_grads(x, w, labels, margin, 0.0)
    np.testing.assert_array_equal(out[:, 1], 0.0)


@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("margin", [1, 2, 4, 8])
def test_parallel_and_antiparallel_features(margin, dtype, lam):
    rng = np.random.default_rng(margin)
    w = rng.standard_normal((3, 4)).astype(dtype)
    labels = np.array([0, 1, 2, 0])
    sides = np.array([1.0, -1.0, 2.0, -3.0], dtype=dtype)
    x = sides[:, None] * w[labels]  # cos θ = ±1 exactly (up to rounding)
    rows = np.arange(4)
    upstream = np.zeros((4, 3))
    upstream[rows, labels] = 1.0
    out, (dx, _) = _grads(x, w, labels, margin, lam, upstream)
    assert np.all(np.isfinite(dx))
    a = np.linalg.norm(x.astype(np.float64), axis=1)
    b = np.linalg.norm(w.astype(np.float64)[labels], axis=1)
    cos = np.sign(sides)
    # ψ(0) = 1 and ψ(π) = 1 − 2m; ψ'(θ) = 0 at both ends, so ∂t/∂x is radial.
    factor = (lam * cos + np.where(cos > 0, 1.0, 1.0 - 2.0 * margin)) / (1 + lam)
    tol = 1e-4 if dtype == np.float32 else 1e-9
    expected = a * b * factor
    # No target logit is near 0 (|factor| >= 1); the atol is only a floor.
    np.testing.assert_allclose(
        out.numpy()[rows, labels],
        expected,
        rtol=tol,
        atol=1e-2 * tol * np.max(np.abs(expected)),
    )
    x_hat = x / a[:, None]
    # The gradient's scale is b·(2m − 1) at most; near-zero entries of x̂
    # need the absolute part.
    atol = tol * np.max(b) * 2 * margin
    np.testing.assert_allclose(dx, (b * factor)[:, None] * x_hat, rtol=tol, atol=atol)


@pytest.mark.parametrize("margin", [2, 4, 8])
def test_large_norms_float32(margin):
    x, w, labels = _spread_data(margin, batch=16)
    x = 1e4 * x / np.linalg.norm(x, axis=1, keepdims=True)
    w = 1e4 * w / np.linalg.norm(w, axis=1, keepdims=True)
    x, w = x.astype(np.float32), w.astype(np.float32)
    out, _ = _assert_finite_with_grads(x, w, labels, margin, 0.0)
    expected = ref.lsoftmax_ref(x, w, labels, margin, 0.0)
    assert _rel_err(out, expected) <= 1e-5


def test_margin_eight_lambda_zero():
    x, w, labels = _spread_data(8, batch=64)
    out, _ = _assert_finite_with_grads(x, w, labels, 8, 0.0)
    assert _rel_err(out, ref.lsoftmax_ref(x, w, labels, 8, 0.0)) <= 1e-10


@pytest.mark.parametrize("dtype, tol", [(tf.float16, 5e-3), (tf.bfloat16, 3e-2)])
def test_half_precision_inputs_compute_in_float32(dtype, tol):
    x, w, labels = _spread_data(4, batch=16)
    x32, w32 = tf.constant(x, tf.float32), tf.constant(w, tf.float32)
    x_half, w_half = tf.cast(x32, dtype), tf.cast(w32, dtype)
    out, (dx, dw) = _grads(x_half, w_half, labels, 4, 0.0, np.ones((16, 5)))
    assert out.dtype == tf.float32
    assert dx.dtype == dtype and dw.dtype == dtype
    assert np.all(np.isfinite(tf.cast(dx, tf.float32)))
    assert np.all(np.isfinite(tf.cast(dw, tf.float32)))
    # The half inputs are only upcast: identical to float32 on those values.
    upcast = ops.lsoftmax_logits(
        tf.cast(x_half, tf.float32), tf.cast(w_half, tf.float32), labels, 4, 0.0
    )
    np.testing.assert_allclose(out, upcast, rtol=1e-6, atol=1e-6)
    # Close to the float32 computation, up to the rounding of the inputs.
    full = ops.lsoftmax_logits(x32, w32, labels, 4, 0.0)
    assert _rel_err(out, full.numpy()) <= tol
    assert ops.plain_logits(x_half, w_half).dtype == tf.float32


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize("margin", [0, -1, 2.5, True, "4", None])
def test_invalid_margin(margin):
    x, w, labels = _spread_data(0, batch=4)
    with pytest.raises(ValueError, match=re.escape(f"margin={margin!r}")):
        ops.lsoftmax_logits(x, w, labels, margin, 0.0)
    with pytest.raises(ValueError, match="`margin`"):
        ops.psi(np.array([0.5]), margin)


@pytest.mark.parametrize("lam", [-0.5, -1, float("nan")])
def test_negative_python_lambda(lam):
    x, w, labels = _spread_data(0, batch=4)
    with pytest.raises(ValueError, match="`lam`"):
        ops.lsoftmax_logits(x, w, labels, 4, lam)


@pytest.mark.parametrize("in_function", [False, True])
def test_negative_tensor_lambda(in_function):
    x, w, labels = _spread_data(0, batch=4)

    def f(lam):
        return ops.lsoftmax_logits(x, w, labels, 4, lam)

    if in_function:
        f = tf.function(f)
    with pytest.raises(tf.errors.InvalidArgumentError, match="`lam`"):
        f(tf.constant(-0.5))


def test_non_scalar_lambda():
    x, w, labels = _spread_data(0, batch=4)
    with pytest.raises(ValueError, match="`lam`"):
        ops.lsoftmax_logits(x, w, labels, 4, tf.constant([0.5, 0.5]))


@pytest.mark.parametrize(
    "x_shape, w_shape, name",
    [
        ((4,), (5, 3), "inputs"),
        ((4, 3, 1), (5, 3), "inputs"),
        ((4, 3), (5, 3, 1), "kernel"),
        ((4, 2), (5, 3), "inputs"),
    ],
)
def test_inputs_of_wrong_rank_or_size(x_shape, w_shape, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        ops.lsoftmax_logits(
            np.ones(x_shape), np.ones(w_shape), np.zeros(4, np.int32), 4, 0.0
        )


@pytest.mark.parametrize(
    "labels",
    [
        np.zeros((6, 1), np.int32),  # (B, 1): the op takes sparse (B,) only
        np.zeros((6, 5), np.int32),  # one-hot-like
        np.array(0, np.int32),  # scalar
        np.zeros(7, np.int32),  # one label too many
        np.zeros(1, np.int32),  # would broadcast against the batch
        np.zeros(6, np.float32),  # not integer
    ],
    ids=["B1", "BC", "scalar", "B+1", "one", "float"],
)
def test_labels_of_wrong_shape_or_dtype(labels):
    x, w, _ = _spread_data(0, batch=6)
    with pytest.raises(ValueError, match="`labels`"):
        ops.lsoftmax_logits(x, w, labels, 4, 0.0)


@pytest.mark.parametrize("in_function", [False, True])
@pytest.mark.parametrize("dtype", [tf.int32, tf.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("bad", [-1, 5])
def test_labels_out_of_range(bad, dtype, in_function):
    x, w, _ = _spread_data(0, batch=4)
    x, w = tf.constant(x, tf.float32), tf.constant(w, tf.float32)
    labels = tf.constant([0, bad, 1, 2], dtype)

    def f(x, w, labels):
        return ops.lsoftmax_logits(x, w, labels, 4, 0.0)

    if in_function:
        f = tf.function(f)
    # In a graph the range check races the gather that reads the labels
    # unless the gather depends on it: repeat to see the race. The match is
    # backquoted: a bare "labels" would match this test's own name in the
    # traceback that graph errors carry.
    for _ in range(5):
        with pytest.raises(tf.errors.InvalidArgumentError, match="`labels`"):
            f(x, w, labels)


def _ancestors(op):
    """Every op that `op` depends on, through data or control edges."""
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        parents = [t.op for t in current.inputs] + list(current.control_inputs)
        for parent in parents:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


@pytest.mark.parametrize("dtype", [tf.int32, tf.int64], ids=["int32", "int64"])
def test_labels_checked_before_any_gather_in_graph(dtype):
    # The runtime race above is scheduling dependent; this checks its cause
    # deterministically: every op that indexes with the labels must depend on
    # the range assertions, or a bad label fails there with a message that
    # does not name `labels`.
    fn = tf.function(lambda x, w, y: ops.lsoftmax_logits(x, w, y, 4, 0.0))
    graph = fn.get_concrete_function(
        tf.TensorSpec((4, 3)), tf.TensorSpec((5, 3)), tf.TensorSpec((4,), dtype)
    ).graph
    labels = graph.inputs[2].op
    indexing = [
        op
        for op in graph.get_operations()
        if "Gather" in op.type or "Scatter" in op.type
    ]
    readers = [op for op in indexing if labels in _ancestors(op)]
    assert readers
    for op in readers:
        names = [a.name.lower() for a in _ancestors(op)]
        assert any("assert" in name for name in names), op.name


def test_check_labels_returns_int32():
    got = ops.check_labels(np.array([0, 4, 2], np.int64), 5)
    assert got.dtype == tf.int32
    np.testing.assert_array_equal(got, [0, 4, 2])
