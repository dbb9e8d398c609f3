"""Tests of `keras_lsoftmax.backend.torch.ops`, the op on PyTorch.

Forward values are compared with the float64 NumPy reference of the paper's
formula (`tests/numpy_reference.py`, θ by arccos); the analytic gradient with
autograd through a plain differentiable torch formulation, with
`torch.autograd.gradcheck` (float64 finite differences) and with the plain
Dense gradient where the margin is off.
"""

import math
import re

import keras
import numpy as np
import pytest

if keras.backend.backend() != "torch":
    pytest.skip("needs KERAS_BACKEND=torch", allow_module_level=True)

import torch  # noqa: E402

from keras_lsoftmax import ops as public_ops  # noqa: E402
from keras_lsoftmax.backend.torch import ops  # noqa: E402
from keras_lsoftmax.margins import ArcMargin  # noqa: E402
from keras_lsoftmax.margins import CosineMargin  # noqa: E402
from tests import numpy_reference as ref  # noqa: E402
from tests.backend_utils import gradients  # noqa: E402

pytestmark = pytest.mark.torch

MARGINS = [1, 2, 3, 4]


def _spread_data(seed, batch=48, dim=4, num_classes=5):
    """(x, w, labels) in float64 with target angles spread over [0, π].

    With 48 rows and 5 classes the labels repeat, so the kernel gradient
    must add up every sample of a class.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((num_classes, dim))
    labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
    theta = rng.permutation(np.linspace(0.005, np.pi - 0.005, batch))
    return ref.features_at_angles(rng, w, labels, theta), w, labels


def _blocked_problem():
    """float64 (x, w, labels, upstream) whose kernel spans several blocks of
    classes in the backward pass of normalised weights."""
    rng = np.random.default_rng(7)
    batch, dim = 48, 4
    num_classes = 4 * ops._MIN_CLASS_BLOCK + 9
    x = torch.tensor(rng.standard_normal((batch, dim)), requires_grad=True)
    w = torch.tensor(
        rng.standard_normal((num_classes, dim))
        * rng.uniform(0.5, 2.0, (num_classes, 1)),
        requires_grad=True,
    )
    labels = torch.tensor(
        rng.integers(0, num_classes, batch), dtype=torch.int32
    )
    upstream = torch.tensor(rng.standard_normal((batch, num_classes)))
    return x, w, labels, upstream


def _rel_err(got, expected) -> float:
    got = np.asarray(got, dtype=np.float64)
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


def _logits(x, w, labels, margin, lam, valid=None):
    return ops.margin_logits(x, w, labels, margin, lam, valid)[0]


def _grads(fn, x, w, upstream):
    """fn(x, w) and the gradients of sum(fn(x, w) · upstream) w.r.t. x, w."""
    x = torch.tensor(x, requires_grad=True)
    w = torch.tensor(w, requires_grad=True)
    out = fn(x, w)
    (out * torch.as_tensor(upstream, dtype=out.dtype)).sum().backward()
    return out.detach(), x.grad, w.grad


def _autodiff_logits(x, w, labels, margin, lam):
    """The L-Softmax logits as plain differentiable torch ops.

    cos(mθ) is T_m(cos θ); the interval index k comes from arccos and floor
    without gradient. Shares no code with the package.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    logits = x @ w.T
    w_y = w[labels]
    a = torch.linalg.vector_norm(x, dim=1)
    b = torch.linalg.vector_norm(w_y, dim=1)
    cos = torch.clamp((x * w_y).sum(dim=1) / (a * b), -1.0, 1.0)
    with torch.no_grad():
        k = torch.clamp(
            torch.floor(torch.acos(cos) / (math.pi / margin)), max=margin - 1
        )
    t_prev, t = torch.ones_like(cos), cos
    for _ in range(margin - 1):
        t_prev, t = t, 2.0 * cos * t - t_prev
    psi = (-1.0) ** k * t - 2.0 * k
    target = (lam * a * b * cos + a * b * psi) / (1.0 + lam)
    mask = torch.nn.functional.one_hot(labels, w.shape[0]).to(x.dtype)
    return logits * (1.0 - mask) + mask * target[:, None]


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize(
    "dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)]
)
@pytest.mark.parametrize("lam", [0.0, 0.5, 1000.0])
@pytest.mark.parametrize("margin", MARGINS)
def test_forward_matches_numpy_reference(margin, lam, dtype, tol):
    x, w, labels = _spread_data(margin)
    x, w = x.astype(dtype), w.astype(dtype)
    # The reference sees the same rounded inputs: only the op's rounding
    # is measured.
    expected = ref.lsoftmax_ref(x, w, labels, margin, lam)
    got = _logits(x, w, labels, margin, lam)
    assert got.dtype == getattr(torch, np.dtype(dtype).name)
    assert _rel_err(got, expected) <= tol


@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("margin", [2, 3, 4])
def test_non_target_logits_are_exactly_plain(margin, lam):
    x, w, labels = _spread_data(margin)
    got = _logits(x, w, labels, margin, lam).numpy()
    plain = ops.plain_logits(x, w).numpy()
    target = np.zeros_like(plain, dtype=bool)
    target[np.arange(len(labels)), labels] = True
    np.testing.assert_array_equal(got[~target], plain[~target])
    assert np.all(got[target] != plain[target])


def test_margin_logits_extra_outputs():
    x, w, labels = _spread_data(3)
    x_t = torch.tensor(x, requires_grad=True)
    logits, plain_target, cos = ops.margin_logits(x_t, w, labels, 3, 0.0)
    _, _, dot, expected_cos = ref.target_geometry(x, w, labels)
    np.testing.assert_allclose(plain_target, dot, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cos, expected_cos, rtol=1e-12, atol=1e-12)
    assert logits.requires_grad
    assert not plain_target.requires_grad and not cos.requires_grad


@pytest.mark.parametrize("make_lam", [float, torch.tensor, keras.Variable])
def test_lambda_as_number_tensor_or_variable(make_lam):
    x, w, labels = _spread_data(2)
    got = _logits(x, w, labels, 2, make_lam(0.5))
    np.testing.assert_allclose(
        got, ref.lsoftmax_ref(x, w, labels, 2, 0.5), rtol=1e-12, atol=1e-12
    )


def test_no_gradient_reaches_lambda():
    x, w, labels = _spread_data(2)
    lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    x_t = torch.tensor(x, requires_grad=True)
    _logits(x_t, w, labels, 2, lam).sum().backward()
    assert lam.grad is None
    assert x_t.grad is not None


def test_keras_variable_kernel_gets_its_gradient():
    x, w, labels = _spread_data(4, batch=8)
    kernel = keras.Variable(w.astype(np.float32))
    _logits(x.astype(np.float32), kernel, labels, 4, 0.0).sum().backward()
    _, _, expected = _grads(
        lambda x, w: _logits(x, w, labels, 4, 0.0),
        x.astype(np.float32),
        w.astype(np.float32),
        np.ones((8, 5)),
    )
    torch.testing.assert_close(kernel.value.grad, expected, rtol=0, atol=0)


def test_lists_and_arrays_are_converted():
    x, w, labels = _spread_data(4, batch=6)
    from_lists = _logits(x.tolist(), w.tolist(), labels.tolist(), 4, 0.0)
    from_arrays = _logits(
        x.astype(np.float32), w.astype(np.float32), labels, 4, 0.0
    )
    # Keras turns Python floats into floatx.
    assert from_lists.dtype == torch.float32
    np.testing.assert_allclose(from_lists, from_arrays, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- ψ


@pytest.mark.parametrize("margin", [1, 2, 3, 4, 6])
def test_psi_matches_paper_definition(margin):
    theta = np.linspace(0.0, np.pi, 1001)
    theta = theta[ref.breakpoint_distance(theta, margin) > 1e-4]
    p, dp = public_ops.psi(torch.tensor(np.cos(theta)), margin)
    np.testing.assert_allclose(p, ref.psi_ref(theta, margin), atol=1e-12)
    # dψ/dθ = P'(c)·(−sin θ): compare with the derivative of the cosine of
    # the reference, d/dθ[(−1)^k cos mθ] = −(−1)^k m sin mθ.
    k = np.clip(np.floor(theta / (np.pi / margin)), 0, margin - 1)
    dpsi = -((-1.0) ** k) * margin * np.sin(margin * theta)
    np.testing.assert_allclose(dp * -np.sin(theta), dpsi, atol=1e-10)


@pytest.mark.parametrize("margin", [2, 3, 4])
def test_psi_matches_caffe_closed_forms(margin):
    c = np.linspace(-1.0, 1.0, 999)  # avoids the exact thresholds
    p, _ = public_ops.psi(torch.tensor(c), margin)
    np.testing.assert_allclose(p, ref.caffe_psi(c, margin), atol=1e-12)


def test_psi_clips_out_of_range_cosines():
    p, dp = public_ops.psi(torch.tensor([1.5, -2.0]), 4)
    np.testing.assert_allclose(p, [1.0, -7.0], atol=1e-6)
    assert torch.all(torch.isfinite(dp))


# --------------------------------------------------------------- gradient


@pytest.mark.parametrize(
    "dtype, tol", [(np.float32, 2e-5), (np.float64, 1e-11)]
)
@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("margin", MARGINS)
def test_gradient_matches_autodiff(margin, lam, dtype, tol):
    x, w, labels = _spread_data(10 + margin)
    x, w = x.astype(dtype), w.astype(dtype)
    upstream = np.random.default_rng(margin).standard_normal((len(labels), 5))
    got = _grads(
        lambda x, w: _logits(x, w, labels, margin, lam), x, w, upstream
    )
    expected = _grads(
        lambda x, w: _autodiff_logits(x, w, labels, margin, lam), x, w, upstream
    )
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype
        assert _rel_err(g, e.numpy()) <= tol


@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("margin", [2, 3, 4])
def test_gradcheck_float64(margin, lam):
    rng = np.random.default_rng(margin)
    labels = np.array([0, 2, 0, 1, 4, 2], np.int32)
    x, w = ref.sample_away_from_breakpoints(rng, labels, 4, 5, margin)
    x = torch.tensor(x, requires_grad=True)
    w = torch.tensor(w, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w: _logits(x, w, labels, margin, lam),
        (x, w),
        eps=1e-6,
        atol=1e-6,
        rtol=1e-5,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_margin_one_is_plain_dense(dtype):
    x, w, labels = _spread_data(1)
    x, w = x.astype(dtype), w.astype(dtype)
    upstream = np.random.default_rng(1).standard_normal((len(labels), 5))
    got = _grads(lambda x, w: _logits(x, w, labels, 1, 0.0), x, w, upstream)
    expected = _grads(lambda x, w: x @ w.T, x, w, upstream)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("margin", [2, 4])
def test_valid_mask_rows_are_plain(margin):
    x, w, labels = _spread_data(margin, batch=8)
    valid = np.array([1, 0, 1, 1, 0, 0, 1, 0], np.float64)
    on = valid == 1
    upstream = np.random.default_rng(0).standard_normal((8, 5))
    out, dx, dw = _grads(
        lambda x, w: _logits(x, w, labels, margin, 0.0, valid), x, w, upstream
    )
    # The rows split into a plain Dense part and a margin part; the kernel
    # gradient is the sum of both.
    plain_out, plain_dx, plain_dw = _grads(
        lambda x, w: x @ w.T, x[~on], w, upstream[~on]
    )
    margin_out, margin_dx, margin_dw = _grads(
        lambda x, w: _logits(x, w, labels[on], margin, 0.0),
        x[on],
        w,
        upstream[on],
    )
    close = {"rtol": 0.0, "atol": 1e-12}
    torch.testing.assert_close(out[~on], plain_out, **close)
    torch.testing.assert_close(out[on], margin_out, **close)
    torch.testing.assert_close(dx[~on], plain_dx, **close)
    torch.testing.assert_close(dx[on], margin_dx, **close)
    torch.testing.assert_close(dw, plain_dw + margin_dw, **close)


def test_backward_leaves_upstream_unchanged():
    x, w, labels = _spread_data(4, batch=8)
    x = torch.tensor(x, requires_grad=True)
    upstream = torch.tensor(np.random.default_rng(0).standard_normal((8, 5)))
    before = upstream.clone()
    _logits(x, w, labels, 4, 0.0).backward(upstream)
    torch.testing.assert_close(upstream, before, rtol=0.0, atol=0.0)


def test_only_requested_gradients():
    x, w, labels = _spread_data(4, batch=8)
    x = torch.tensor(x)
    w = torch.tensor(w, requires_grad=True)
    _logits(x, w, labels, 4, 0.0).sum().backward()
    assert x.grad is None
    assert torch.all(torch.isfinite(w.grad))


# ------------------------------------------------------------ edge inputs


def _assert_finite_grads(x, w, labels, margin):
    out, (dx, dw, _) = gradients(
        lambda x, w, y: _logits(x, w, y, margin, 0.0), x, w, labels
    )
    assert np.all(np.isfinite(out))
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dw))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("margin", [2, 4, 8])
def test_zero_feature_rows(margin, dtype):
    x, w, labels = _spread_data(margin, batch=8)
    x, w = x.astype(dtype), w.astype(dtype)
    x[[1, 5]] = 0.0
    out = _assert_finite_grads(x, w, labels, margin)
    np.testing.assert_array_equal(out[[1, 5]], 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("margin", [2, 4, 8])
def test_zero_class_weights(margin, dtype):
    x, w, labels = _spread_data(margin, batch=8)
    x, w = x.astype(dtype), w.astype(dtype)
    w[1] = 0.0
    labels[:3] = 1
    out = _assert_finite_grads(x, w, labels, margin)
    np.testing.assert_array_equal(out[:, 1], 0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_float32(dtype):
    x, w, labels = _spread_data(4, batch=16)
    x_half = torch.tensor(x, dtype=dtype, requires_grad=True)
    w_half = torch.tensor(w, dtype=dtype, requires_grad=True)
    out = _logits(x_half, w_half, labels, 4, 0.0)
    out.sum().backward()
    assert out.dtype == torch.float32
    assert ops.plain_logits(x_half, w_half).dtype == torch.float32
    assert x_half.grad.dtype == dtype and w_half.grad.dtype == dtype
    # The half inputs are only upcast: identical to float32 on those values.
    _, dx, dw = _grads(
        lambda x, w: _logits(x, w, labels, 4, 0.0),
        x_half.detach().float().numpy(),
        w_half.detach().float().numpy(),
        np.ones((16, 5)),
    )
    torch.testing.assert_close(x_half.grad, dx.to(dtype), rtol=0.0, atol=0.0)
    torch.testing.assert_close(w_half.grad, dw.to(dtype), rtol=0.0, atol=0.0)


# ------------------------------------------------------ with_plain_targets


def test_with_plain_targets_restores_plain_logits_in_place():
    x, w, labels = _spread_data(4, batch=8)
    logits, plain_target, _ = ops.margin_logits(x, w, labels, 4, 0.0)
    got = ops.with_plain_targets(logits, labels, plain_target)
    np.testing.assert_allclose(
        got, ops.plain_logits(x, w), rtol=0.0, atol=1e-12
    )
    assert got.data_ptr() == logits.data_ptr()  # an O(B) write, no copy


def test_with_plain_targets_after_backward():
    x, w, labels = _spread_data(4, batch=8)
    x = torch.tensor(x, requires_grad=True)
    logits, plain_target, _ = ops.margin_logits(x, w, labels, 4, 0.0)
    torch.nn.functional.cross_entropy(
        logits, torch.as_tensor(labels).long()
    ).backward()
    got = ops.with_plain_targets(logits, labels, plain_target)
    assert not got.requires_grad
    np.testing.assert_allclose(got, ops.plain_logits(x.detach(), w), atol=1e-12)


def test_with_plain_targets_never_feeds_a_pending_backward():
    # A loss that saves the logits themselves: changing them before its
    # backward pass must raise, not silently give wrong gradients.
    x, w, labels = _spread_data(4, batch=8)
    x = torch.tensor(x, requires_grad=True)
    logits, plain_target, _ = ops.margin_logits(x, w, labels, 4, 0.0)
    loss = (logits**2).sum()
    ops.with_plain_targets(logits, labels, plain_target)
    with pytest.raises(RuntimeError, match="inplace operation"):
        loss.backward()


# --------------------------------------------------------- torch.compile


@pytest.mark.parametrize(
    "margin, normalize_weights",
    [(4, False), (CosineMargin(0.35), True)],
    ids=["lsoftmax", "cosface"],
)
def test_compiled_training_step_matches_eager(margin, normalize_weights):
    """Compiling forward and backward takes some 20 s per case on 2 cores.
    With normalised weights the kernel spans several blocks of classes and
    the normalisation's gradient runs as the package's custom op."""
    if normalize_weights:
        x, w, labels, _ = _blocked_problem()
        x, w, labels = x.detach().numpy(), w.detach().numpy(), labels.numpy()
    else:
        x, w, labels = _spread_data(4, batch=16)
    lam = torch.tensor(0.5, dtype=torch.float64)

    def step(x, w, labels, lam):
        labels = ops.check_labels(labels, w.shape[0], x)
        logits = ops.margin_logits(
            x, w, labels, margin, lam, normalize_weights=normalize_weights
        )[0]
        return torch.nn.functional.cross_entropy(logits, labels.long())

    def run(fn):
        xt = torch.tensor(x, requires_grad=True)
        wt = torch.tensor(w, requires_grad=True)
        loss = fn(xt, wt, torch.as_tensor(labels), lam)
        loss.backward()
        return loss.detach(), xt.grad, wt.grad

    torch._dynamo.reset()
    compiled = run(torch.compile(step, fullgraph=True))
    for got, expected in zip(compiled, run(step)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize("margin", [0, -1, 2.5, True, "4", None])
def test_invalid_margin(margin):
    x, w, labels = _spread_data(0, batch=4)
    with pytest.raises(ValueError, match=re.escape(f"margin={margin!r}")):
        ops.margin_logits(x, w, labels, margin, 0.0)
    with pytest.raises(ValueError, match="`margin`"):
        public_ops.psi(torch.tensor([0.5]), margin)


@pytest.mark.parametrize("lam", [-0.5, -1, float("nan")])
def test_negative_python_lambda(lam):
    x, w, labels = _spread_data(0, batch=4)
    with pytest.raises(ValueError, match="`lam`"):
        ops.margin_logits(x, w, labels, 4, lam)


@pytest.mark.parametrize("lam", [-0.5, float("nan")])
def test_negative_tensor_lambda(lam):
    x, w, labels = _spread_data(0, batch=4)
    with pytest.raises(ValueError, match=re.escape("Expected `lam` >= 0")):
        ops.margin_logits(x, w, labels, 4, torch.tensor(lam))


def test_non_scalar_lambda():
    x, w, labels = _spread_data(0, batch=4)
    with pytest.raises(ValueError, match="Expected `lam` to be a scalar"):
        ops.margin_logits(x, w, labels, 4, torch.tensor([0.5, 0.5]))


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
        ops.margin_logits(
            np.ones(x_shape), np.ones(w_shape), np.zeros(4, np.int32), 4, 0.0
        )


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.zeros((6, 1), np.int32), "shape \\(batch_size,\\)"),
        (np.array(0, np.int32), "shape \\(batch_size,\\)"),
        (np.zeros(7, np.int32), "one label per row"),
        (np.zeros(1, np.int32), "one label per row"),
        (np.zeros(6, np.float32), "integer class ids"),
        (np.zeros(6, bool), "integer class ids"),
    ],
    ids=["B1", "scalar", "B+1", "one", "float", "bool"],
)
def test_labels_of_wrong_shape_or_dtype(labels, message):
    x, _, _ = _spread_data(0, batch=6)
    with pytest.raises(ValueError, match=message):
        ops.check_labels(labels, 5, x)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("bad", [-1, 5])
def test_labels_out_of_range(bad, dtype):
    labels = torch.tensor([0, bad, 1, 2], dtype=dtype)
    low, high = min(bad, 0), max(bad, 2)
    expected = f"in [0, 5). Received labels from {low} to {high}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        ops.check_labels(labels, 5)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8])
def test_check_labels_returns_int32(dtype):
    got = ops.check_labels(np.array([0, 4, 2], dtype), 5, np.zeros((3, 2)))
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got, [0, 4, 2])


@pytest.mark.parametrize(
    "margin", [4, CosineMargin(0.35), ArcMargin(0.5)], ids=str
)
def test_normalized_weights_over_several_class_blocks(margin):
    """The blocked backward pass of normalised weights gives the gradients
    of the op on unit rows normalised by autograd."""
    x, w, labels, upstream = _blocked_problem()
    out = ops.margin_logits(x, w, labels, margin, 0.5, normalize_weights=True)
    out[0].backward(upstream)
    got = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    unit = w / torch.linalg.vector_norm(w, dim=1, keepdim=True)
    ops.margin_logits(x, unit, labels, margin, 0.5)[0].backward(upstream)
    for grad, want in zip(got, (x.grad, w.grad)):
        torch.testing.assert_close(grad, want, rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("margin", [4, CosineMargin(0.35)], ids=str)
def test_normalized_weights_backward_builds_no_scaled_upstream(margin):
    """No allocation of the backward pass comes near a (B, C) buffer: the
    scaled upstream gradient exists one block of classes at a time."""
    x, w, labels, upstream = _blocked_problem()
    out = ops.margin_logits(x, w, labels, margin, 0.5, normalize_weights=True)
    with torch.profiler.profile(profile_memory=True) as profile:
        out[0].backward(upstream)
    largest = max(event.cpu_memory_usage for event in profile.events())
    assert 0 < largest < upstream.numel() * upstream.element_size() / 2


def test_second_derivative_raises():
    """The analytic backward pass is a first derivative only: a gradient of
    the gradient raises instead of leaving out the margin's terms."""
    x, w, labels = _spread_data(4, batch=8)
    x = torch.tensor(x, requires_grad=True)
    logits = _logits(x, w, labels, 4, 0.5)
    loss = torch.nn.functional.cross_entropy(
        logits, torch.as_tensor(labels, dtype=torch.int64)
    )
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.square().sum().backward()
