"""The L-Softmax op on JAX: `jax.custom_vjp` with the exact gradient.

The math is described in `keras_lsoftmax.ops`. The forward pass is one matrix
product plus O(B·D) work on the B labelled class weights; the backward pass
is the two matrix products of a Dense layer plus O(B·D) work. Each pass is a
`jax.jit` computation of its own, so that outside `jit` it runs as one
compiled call (its scatter updates in place) instead of op by op; under an
outer `jit` it is inlined.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_lsoftmax.backend.common import check_lambda_number
from keras_lsoftmax.backend.common import check_operand_shapes
from keras_lsoftmax.backend.common import MIN_NORM
from keras_lsoftmax.backend.common import MIN_SQUARED_NORM
from keras_lsoftmax.backend.common import compute_dtype
from keras_lsoftmax.backend.common import target_terms
from keras_lsoftmax.margins import TargetMargin
from keras_lsoftmax.margins import as_target_margin

# Whether a training step of a sub-centre head gathers each class's logit at
# its chosen sub-centre instead of taking `max` along the sub-centres. Not on
# JAX: with a kernel sharded by class (keras.distribution) the logits are
# sharded too, and XLA would all-gather them for the gather, where `max`
# along the sub-centres stays within each device's share.
GATHER_SUB_CENTRES = False

# x·wᵀ and Gᵀ·x as contractions: `w.T` outside `jit` would copy the kernel.
_CONTRACT_LAST = (((1,), (1,)), ((), ()))
_CONTRACT_FIRST = (((0,), (0,)), ((), ()))


def check_labels(
    labels: Any, num_classes: int, inputs: Any = None
) -> jax.Array:
    """Validates sparse labels of shape (B,) and returns them as int32.

    Dtype, rank and (given `inputs`) the one-label-per-row checks are static.
    The range check [0, num_classes) needs the label values, so it runs only
    on concrete labels, outside `jit`. Under `jit` labels outside the range
    are not reported: the op's gathers and scatters clamp them (after a
    negative label counts from the end, as in NumPy indexing).
    """
    labels = _host_or_device(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            "Expected `labels` to hold integer class ids. Received: labels "
            f"with dtype {labels.dtype.name}"
        )
    if labels.ndim != 1:
        raise ValueError(
            "Expected `labels` to have shape (batch_size,). Received: labels "
            f"with shape {labels.shape}"
        )
    if inputs is not None and labels.shape[:1] != np.shape(inputs)[:1]:
        raise ValueError(
            "Expected `labels` to hold one label per row of `inputs`. "
            f"Received: labels with shape {labels.shape}, inputs with "
            f"shape {np.shape(inputs)}"
        )
    if not isinstance(labels, jax.core.Tracer) and labels.size:
        _check_label_range(np.asarray(labels), num_classes)
    return jnp.asarray(labels, jnp.int32)


def _host_or_device(value: Any) -> np.ndarray | jax.Array:
    # Host values stay in NumPy until checked: without x64, JAX would first
    # narrow int64 labels to int32 and could wrap a huge one into range.
    if isinstance(value, keras.Variable):
        return keras.ops.convert_to_tensor(value)
    return value if isinstance(value, jax.Array) else np.asarray(value)


def _check_label_range(labels: np.ndarray, num_classes: int) -> None:
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"Expected `labels` in [0, {num_classes}). Received labels from "
            f"{low} to {high}"
        )


def plain_logits(inputs: Any, kernel: Any) -> jax.Array:
    """`inputs @ kernelᵀ` in the dtype `lsoftmax_logits` computes in."""
    inputs, kernel = _to_array(inputs), _to_array(kernel)
    dtype = compute_dtype(inputs.dtype, kernel.dtype)
    return _logits(_cast(inputs, dtype), _cast(kernel, dtype))


def margin_logits(
    inputs: Any,
    kernel: Any,
    labels: Any,
    margin: TargetMargin | int,
    lam: Any,
    valid: Any = None,
    normalize_weights: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """See `keras_lsoftmax.ops.margin_logits`.

    A λ given as an array or a variable is not checked for λ ≥ 0: that would
    need its value on the host at every call.
    """
    margin = as_target_margin(margin)
    inputs, kernel = _to_array(inputs), _to_array(kernel)
    check_operand_shapes(inputs.shape, kernel.shape)
    dtype = compute_dtype(inputs.dtype, kernel.dtype)
    # Cast before the custom VJP: its cotangents must have the dtypes of its
    # inputs, and the cast's own transpose returns them in the caller's.
    x, w = _cast(inputs, dtype), _cast(kernel, dtype)
    labels = _to_array(labels)
    lam = _lambda(lam, dtype)
    if valid is not None:
        valid = _to_array(valid).astype(dtype)
    if margin.is_identity:
        logits, target, cos = _plain_forward(x, w, labels)
        if normalize_weights:
            # No margin math to fold the norms into: autodiff of a product.
            scales = jax.lax.rsqrt(
                jnp.maximum(jnp.sum(w * w, axis=1), MIN_SQUARED_NORM)
            )
            logits = logits * scales
            target = target * jax.lax.stop_gradient(scales).at[labels].get(
                mode="clip"
            )
    else:
        logits, target, cos = _margin_core(
            x, w, labels, lam, valid, margin, normalize_weights
        )
    return logits, jax.lax.stop_gradient(target), jax.lax.stop_gradient(cos)


def with_plain_targets(
    logits: jax.Array, labels: jax.Array, plain_target: jax.Array
) -> jax.Array:
    """`logits` (B, C) with each entry [i, labels[i]] set to `plain_target[i]`.

    Undoes the margin of `margin_logits` for metrics; under `jit` the update
    is in place where nothing else holds `logits`, an O(B) cost.
    """
    rows = jnp.arange(labels.shape[0])
    return logits.at[rows, labels].set(
        plain_target.astype(logits.dtype), mode="clip"
    )


def _to_array(value: Any) -> jax.Array:
    # Keras variables through Keras, so that a `StatelessScope` (as in
    # `stateless_call`) substitutes its value.
    if isinstance(value, keras.Variable):
        return keras.ops.convert_to_tensor(value)
    # Arrays and tracers as they are: `jnp.asarray` of a tracer is a copy
    # under autodiff outside `jit`, and the backward pass would keep it.
    return value if isinstance(value, jax.Array) else jnp.asarray(value)


def _cast(t: jax.Array, dtype: str) -> jax.Array:
    """`t` in `dtype`; itself, not a copy (as `astype` makes under autodiff
    outside `jit`), where it has that dtype already."""
    return t if t.dtype == dtype else t.astype(dtype)


def _lambda(lam: Any, dtype: str) -> jax.Array:
    if isinstance(check_lambda_number(lam), (int, float)):
        return jnp.asarray(lam, dtype)
    lam = _to_array(lam).astype(dtype)
    if lam.ndim != 0:
        raise ValueError(
            "Expected `lam` to be a scalar. Received: lam with shape "
            f"{lam.shape}"
        )
    return lam


def _logits(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.dot_general(x, w, _CONTRACT_LAST)


def _row_norms(t: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(t * t, axis=1))


def _divide_no_nan(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 where den is 0 (as `tf.math.divide_no_nan`)."""
    nonzero = den != 0
    # The inner `where` keeps the discarded quotients finite, so that
    # `jax_debug_nans` stays quiet.
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


def _targets(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The entries [i, labels[i]] of `logits` (B, C), clamping the labels."""
    rows = jnp.arange(labels.shape[0])
    return logits.at[rows, labels].get(mode="clip")


def _cosines(
    x: jax.Array, w_y: jax.Array, target: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """‖x‖, ‖w_y‖ and cos θ per row; cos θ = 0 where a norm is 0."""
    a, b = _row_norms(x), _row_norms(w_y)
    return a, b, jnp.clip(_divide_no_nan(target, a * b), -1.0, 1.0)


@jax.jit
def _plain_forward(
    x: jax.Array, w: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The identity margin: the plain logits, differentiated by autodiff."""
    logits = _logits(x, w)
    target = _targets(logits, labels)
    w_y = w.at[labels].get(mode="clip")
    return logits, target, _cosines(x, w_y, target)[2]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _margin_core(
    x: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    lam: jax.Array,
    valid: jax.Array | None,
    margin: TargetMargin,
    normalize_weights: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The margin logits, plain targets and cos θ, with the analytic VJP."""
    return _forward(x, w, labels, lam, valid, margin, normalize_weights)[:3]


def _margin_core_fwd(
    x: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    lam: jax.Array,
    valid: jax.Array | None,
    margin: TargetMargin,
    normalize_weights: bool,
) -> tuple[tuple[jax.Array, ...], tuple[Any, ...]]:
    out, target, cos, saved = _forward(
        x, w, labels, lam, valid, margin, normalize_weights
    )
    return (out, target, cos), (x, w, labels, saved)


def _margin_core_bwd(
    margin: TargetMargin,
    normalize_weights: bool,
    residuals: tuple[Any, ...],
    cotangents: tuple[jax.Array, ...],
) -> tuple[jax.Array | None, ...]:
    del margin, normalize_weights  # Both are in the saved terms.
    x, w, labels, saved = residuals
    # Only the logits' cotangent counts: the plain targets and cos θ carry
    # no gradient.
    dx, dw = _backward(x, w, labels, saved, cotangents[0])
    # None: no gradient for the labels, λ and the mask.
    return dx, dw, None, None, None


_margin_core.defvjp(_margin_core_fwd, _margin_core_bwd)


@functools.partial(jax.jit, static_argnames=("margin", "normalize_weights"))
def _forward(
    x: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    lam: jax.Array,
    valid: jax.Array | None,
    margin: TargetMargin,
    normalize_weights: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, ...]]:
    """The forward pass of `_margin_core`.

    Returns the margin logits, the plain target logits (both with the
    class weights normalised if asked), cos θ and what the backward pass
    needs: (a, b, α − 1, δ), each (B,), and the kernel's row norms (C,) or
    None.
    """
    logits = _logits(x, w)
    target = _targets(logits, labels)
    a, b, cos = _cosines(x, w.at[labels].get(mode="clip"), target)
    shift, alpha_minus_1, delta = target_terms(margin, cos, lam, valid)
    rows = jnp.arange(labels.shape[0])
    # Set from the gathered target, not added: a shift that ignores cos θ
    # (CosFace's) would leave the gather unordered before this update, and
    # XLA would copy the (B, C) logits to keep the gather's read.
    out = logits.at[rows, labels].set(target + a * b * shift, mode="clip")
    norms = None
    if normalize_weights:
        norms = _row_norms(w)
        scales = 1.0 / jnp.maximum(norms, MIN_NORM)
        out = out * scales
        target = target * scales.at[labels].get(mode="clip")
    return out, target, cos, (a, b, alpha_minus_1, delta, norms)


@jax.jit
def _backward(
    x: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    saved: tuple[jax.Array, ...],
    upstream: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """∂L/∂x and ∂L/∂w from G = `upstream`.

    The Dense products of G, plus on the B labelled rows what a target logit
    adds to a plain one: (α − 1)·g times the other operand, and the radial
    term g·δ (see `keras_lsoftmax.ops`). With normalised class weights
    (scales s = 1/‖w‖) the products take G·diag(s) and ∂L/∂w_j loses its
    part along w_j: dw_j − s_j²·(w_j·dw_j)·w_j. Without them no modified
    copy of G is made.
    """
    a, b, alpha_minus_1, delta, norms = saved
    scales = None if norms is None else 1.0 / jnp.maximum(norms, MIN_NORM)
    if scales is not None:
        upstream = upstream * scales
    g = _targets(upstream, labels)
    # Gathered again rather than saved: B·D reads, no (B, D) residual.
    w_y = w.at[labels].get(mode="clip")
    alpha_g = (alpha_minus_1 * g)[:, None]
    gd = g * delta
    dx = upstream @ w + alpha_g * w_y + _divide_no_nan(gd * b, a)[:, None] * x
    per_row = alpha_g * x + _divide_no_nan(gd * a, b)[:, None] * w_y
    dw = jax.lax.dot_general(upstream, x, _CONTRACT_FIRST)
    dw = dw.at[labels].add(per_row, mode="clip")
    if scales is not None:
        dots = jnp.sum(w * dw, axis=1)
        along = jnp.where(norms > MIN_NORM, scales * scales * dots, 0.0)
        dw = dw - along[:, None] * w
    return dx, dw


def row_major(t: jax.Array) -> jax.Array:
    """`t` itself: JAX arrays have no strides to keep."""
    return t
