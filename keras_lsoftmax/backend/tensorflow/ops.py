"""The L-Softmax op on TensorFlow: `tf.custom_gradient` with the exact gradient.

The math is described in `keras_lsoftmax.ops`. The forward pass is one matrix
product plus O(B·D) work on the B labelled class weights; the backward pass
is the two matrix products of a Dense layer plus O(B·D) work.
"""

import functools
from typing import Any

import tensorflow as tf

from keras_lsoftmax.backend.common import check_lambda_number
from keras_lsoftmax.backend.common import check_operand_shapes
from keras_lsoftmax.backend.common import MIN_NORM
from keras_lsoftmax.backend.common import MIN_SQUARED_NORM
from keras_lsoftmax.backend.common import compute_dtype as _dtype_name
from keras_lsoftmax.backend.common import target_terms
from keras_lsoftmax.backend.tensorflow import compat
from keras_lsoftmax.margins import TargetMargin
from keras_lsoftmax.margins import as_target_margin

# Whether a training step of a sub-centre head gathers each class's logit at
# its chosen sub-centre (one scatter in the backward pass) instead of taking
# `max` along the sub-centres (some five passes over the (B, C, K) logits).
GATHER_SUB_CENTRES = True


def compute_dtype(*dtypes: tf.DType) -> tf.DType:
    """The dtype the op computes in: float64 if any input is, else float32."""
    return tf.as_dtype(_dtype_name(*dtypes))


def _check_lambda(lam: Any, dtype: tf.DType) -> tf.Tensor:
    if isinstance(check_lambda_number(lam), (int, float)):
        return tf.constant(lam, dtype)
    lam = tf.cast(tf.convert_to_tensor(lam), dtype)
    if lam.shape.rank != 0:
        raise ValueError(
            f"Expected `lam` to be a scalar. Received: lam with shape {lam.shape}"
        )
    # String-only data: a float tensor in it would wrap the assertion in a
    # tf.cond, which costs more per step than the rest of the λ math.
    check = tf.debugging.Assert(
        lam >= 0, ["Expected `lam` >= 0 (the L-Softmax λ)."]
    )
    with tf.control_dependencies([check]):
        return tf.identity(lam)


def check_labels(
    labels: Any, num_classes: int, inputs: Any = None
) -> tf.Tensor:
    """Validates sparse labels of shape (B,) and returns them as int32.

    The range check (and, given `inputs`, the check that there is one label
    per row of `inputs`) runs in eager and graph mode. Under XLA
    (`jit_compile=True`) assertions are compiled away, so labels outside
    [0, num_classes) are not reported there (XLA clamps the gather).
    """
    labels = tf.convert_to_tensor(labels)
    if not labels.dtype.is_integer:
        raise ValueError(
            "Expected `labels` to hold integer class ids. Received: labels "
            f"with dtype {labels.dtype.name}"
        )
    if labels.shape.rank != 1:
        raise ValueError(
            "Expected `labels` to have shape (batch_size,). Received: labels "
            f"with shape {labels.shape}"
        )
    # One assertion with int32 and string data only: other dtypes in the
    # data would wrap it in a tf.cond, a function call per step.
    wide = tf.cast(labels, tf.int64)
    checks = [
        tf.debugging.Assert(
            tf.reduce_all((wide >= 0) & (wide < num_classes)),
            [
                f"Expected `labels` in [0, {num_classes}). Received labels "
                "from",
                tf.cast(tf.reduce_min(wide), tf.int32),
                "to",
                tf.cast(tf.reduce_max(wide), tf.int32),
            ],
        )
    ]
    if inputs is not None:
        inputs = tf.convert_to_tensor(inputs)
        if not labels.shape.is_compatible_with(inputs.shape[:1]):
            raise ValueError(
                "Expected `labels` to hold one label per row of `inputs`. "
                f"Received: labels with shape {labels.shape}, inputs with "
                f"shape {inputs.shape}"
            )
        checks.append(
            tf.debugging.assert_equal(
                tf.shape(labels)[0],
                tf.shape(inputs)[0],
                message="Expected `labels` to hold one label per input row.",
            )
        )
    with tf.control_dependencies(checks):
        # identity: a same-dtype cast creates no op to hang the checks on.
        return tf.identity(tf.cast(labels, tf.int32))


def plain_logits(inputs: Any, kernel: Any) -> tf.Tensor:
    """`inputs @ kernelᵀ` in the dtype `lsoftmax_logits` computes in."""
    inputs = tf.convert_to_tensor(inputs)
    kernel = tf.convert_to_tensor(kernel)
    dtype = compute_dtype(inputs.dtype, kernel.dtype)
    return _logits(tf.cast(inputs, dtype), tf.cast(kernel, dtype))


def margin_logits(
    inputs: Any,
    kernel: Any,
    labels: Any,
    margin: TargetMargin | int,
    lam: Any,
    valid: Any = None,
    normalize_weights: bool = False,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """See `keras_lsoftmax.ops.margin_logits`."""
    margin = as_target_margin(margin)
    inputs = tf.convert_to_tensor(inputs)
    kernel = tf.convert_to_tensor(kernel)
    check_operand_shapes(_dims(inputs.shape), _dims(kernel.shape))
    dtype = compute_dtype(inputs.dtype, kernel.dtype)
    inputs = tf.cast(inputs, dtype)
    kernel = tf.cast(kernel, dtype)
    lam = _check_lambda(lam, dtype)
    if valid is not None:
        valid = tf.cast(valid, dtype)
    if margin.is_identity and normalize_weights:
        # No margin math to fold the norms into: autodiff of a product.
        logits, target, cos = _margin_core(inputs, kernel, labels, lam, margin)
        scales = tf.math.rsqrt(
            tf.maximum(tf.reduce_sum(kernel * kernel, axis=1), MIN_SQUARED_NORM)
        )
        logits = logits * scales
        target = target * tf.gather(scales, labels)
    else:
        logits, target, cos = _margin_core(
            inputs, kernel, labels, lam, margin, valid, normalize_weights
        )
    return logits, tf.stop_gradient(target), tf.stop_gradient(cos)


def _margin_core(
    x: tf.Tensor,
    w: tf.Tensor,
    labels: tf.Tensor,
    lam: tf.Tensor,
    margin: TargetMargin,
    valid: tf.Tensor | None = None,
    normalize_weights: bool = False,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    full_pass = _full_pass(x, w)
    plain = margin.is_identity
    compiled = not plain and _compile_forward(x, w)
    extra = () if valid is None else (valid,)

    @tf.custom_gradient
    def forward(x, w, labels, lam):
        index = target_index(labels)
        if plain:
            logits, target, cos, _ = _margin_forward(
                x, w, labels, index, lam, None, margin, full_pass
            )
            return (logits, target, cos), _dense_grad(x, w)
        if compiled:
            fn = _compiled_forward(
                margin, full_pass, valid is not None, normalize_weights
            )
            out, target, cos, saved = fn(x, w, labels, index, lam, *extra)
        else:
            out, target, cos, saved = _margin_forward(
                x, w, labels, index, lam, valid, margin, full_pass,
                normalize_weights=normalize_weights,
            )
        a, b, alpha_minus_1, delta, w_y, norms = saved

        def grad(upstream, *unused):
            scales = None
            if norms is not None:
                scales = 1.0 / tf.maximum(norms, MIN_NORM)
                # The unit rows' logits: G·diag(s) for the unscaled ones.
                upstream = upstream * scales
            g = tf.gather_nd(upstream, index)
            with tf.control_dependencies([g]):
                g_adj = _add_at(upstream, index, alpha_minus_1 * g)
            gd = g * delta
            dx = tf.matmul(g_adj, w)
            dx += tf.math.divide_no_nan(gd * b, a)[:, None] * x
            dw = tf.matmul(g_adj, x, transpose_a=True)
            # The radial term w_y·gδa/b of each labelled class weight.
            radial = tf.math.divide_no_nan(gd * a, b)
            if w_y is None:
                per_class = tf.math.unsorted_segment_sum(
                    radial, labels, tf.shape(w)[0]
                )
                dw += per_class[:, None] * w
            else:
                dw = _add_at(dw, labels[:, None], radial[:, None] * w_y)
            if scales is not None:
                dw = _normalization_grad(dw, w, norms, scales)
            return dx, dw, None, None

        return (out, target, cos), grad

    return forward(x, w, labels, lam)


def _normalization_grad(
    dw: tf.Tensor, w: tf.Tensor, norms: tf.Tensor, scales: tf.Tensor
) -> tf.Tensor:
    """dw, the kernel's gradient with the scales s held fixed, turned into
    the gradient through s_j = 1/‖w_j‖ too: dw_j − s_j²·(w_j·dw_j)·w_j (see
    `keras_lsoftmax.ops`).

    Rows whose norm was clamped have a constant scale, so only their dw.
    """

    def along(rows: slice, dots: tf.Tensor) -> tf.Tensor:
        s = scales[rows]
        return tf.where(norms[rows] > MIN_NORM, s * s * dots, 0.0)

    classes = w.shape[0]
    # XLA updates in place by itself; eagerly, each block would copy the
    # whole of `dw`, which the caller still holds.
    if _in_xla_context() or classes is None or tf.executing_eagerly():
        dots = _row_dots(w, dw)
        return dw - along(slice(None), dots)[:, None] * w
    # Block by block, in place: `dw - c[:, None] * w` would hold a (C, D)
    # temporary next to the kernel's gradient.
    block = max(-(-classes // _CLASS_BLOCKS), _MIN_CLASS_BLOCK)
    for start in range(0, classes, block):
        rows = slice(start, min(start + block, classes))
        w_block = w[rows]
        dots = _row_dots(w_block, dw[rows])
        dw = _add_at(
            dw,
            tf.range(rows.start, rows.stop)[:, None],
            -along(rows, dots)[:, None] * w_block,
        )
    return dw


def _margin_forward(
    x: tf.Tensor,
    w: tf.Tensor,
    labels: tf.Tensor,
    index: tf.Tensor,
    lam: tf.Tensor,
    valid: tf.Tensor | None,
    margin: TargetMargin,
    full_pass: bool,
    normalize_weights: bool = False,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tuple[Any, ...] | None]:
    """The forward pass of `_margin_core`.

    Returns the margin logits, the plain target logits (both with the
    class weights normalised if asked), cos θ and what the gradient needs:
    (a, b, α − 1, δ, w_y, norms), with the labelled class weights w_y
    (B, D) None if `full_pass` and the kernel's row norms (C,) None unless
    `normalize_weights`; None for the identity margin.
    """
    logits = _logits(x, w)
    target = tf.gather_nd(logits, index)
    w_y = norms = None
    if full_pass or normalize_weights:
        norms = _row_norms(w)
    if full_pass:
        b = tf.gather(norms, labels)
    else:
        w_y = tf.gather(w, labels)  # (B, D)
        b = _row_norms(w_y)
    a = _row_norms(x)
    ab = a * b
    cos = tf.clip_by_value(tf.math.divide_no_nan(target, ab), -1.0, 1.0)
    if margin.is_identity:
        return logits, target, cos, None
    shift, alpha_minus_1, delta = target_terms(margin, cos, lam, valid)
    with tf.control_dependencies([target]):
        out = _add_at(logits, index, ab * shift)
    if not normalize_weights:
        return out, target, cos, (a, b, alpha_minus_1, delta, w_y, None)
    scales = 1.0 / tf.maximum(norms, MIN_NORM)
    out = out * scales
    target = target * tf.gather(scales, labels)
    return out, target, cos, (a, b, alpha_minus_1, delta, w_y, norms)


def _dims(shape: tf.TensorShape) -> tuple:
    # An unknown rank reads as no dimensions, which the shape check rejects.
    return tuple(shape) if shape.rank is not None else ()


def _compile_forward(x: tf.Tensor, w: tf.Tensor) -> bool:
    """Whether `_margin_core` runs its forward pass as one XLA computation.

    Only in a graph that XLA does not compile already, on a CPU-only
    machine, with more classes than samples and enough of both (see
    `_COMPILE_MIN_ROWS`). There TensorFlow's Eigen matmul has no fast
    orientation for x·wᵀ (see `_logits`): the (B, C) transpose takes some
    3 ms of a 55 ms linear-probe step at B = 256, D = 512, C = 10 000 on two
    cores, and the O(B·D) margin math adds some fifty small kernels. XLA
    computes x·wᵀ as fast as the fast orientation and fuses the rest into a
    few loops. The backward pass stays in TensorFlow (its products have a
    fast orientation, and an unused ∂L/∂x is pruned), and so does the rest
    of the step. XLA compiles the forward pass once per input shape, in a
    fraction of a second.

    Not under a `tf.distribute` strategy, with op determinism enabled or
    with an accelerator visible (Keras does not compile those with XLA
    either), and not in eager mode (a compilation per call shape).
    """
    rows, classes = _num_rows(x), _num_rows(w)
    if rows >= classes or rows < _COMPILE_MIN_ROWS:
        return False
    if rows * classes < _COMPILE_MIN_LOGITS:
        return False
    if tf.executing_eagerly():
        return False
    if _in_xla_context() or tf.distribute.has_strategy():
        return False
    return _xla_cpu_only()


# The gradient through the norms of normalised weights is taken in this
# many blocks of classes, of at least _MIN_CLASS_BLOCK classes each (see
# `_normalization_grad`). Outside XLA, at C = 10 000, B = 256, D = 512 on 2
# CPU cores, a step's peak resident memory is 0.84-0.98 times Dense's in 16
# blocks and 0.97-1.20 times unblocked. The in-place updates run on one
# thread: the pass takes about 15 ms, against 11 ms unblocked.
_CLASS_BLOCKS = 16
_MIN_CLASS_BLOCK = 512

# Measured on two cores (B = 16 to 512, C = 300 to 100 000, D = 512): from
# 128 rows and 65 536 logits the compiled forward pass makes a training step
# 0 to 7 % faster; with fewer rows it gains nothing and can lose up to 5 %.
_COMPILE_MIN_ROWS = 128
_COMPILE_MIN_LOGITS = 1 << 16

_XLA_CPU_ONLY = None


def _xla_cpu_only() -> bool:
    global _XLA_CPU_ONLY
    if compat.op_determinism_enabled():
        return False
    if _XLA_CPU_ONLY is None:
        _XLA_CPU_ONLY = "CPU" in compat.kernel_device_types(
            "XlaLaunch"
        ) and _cpu_only()
    return _XLA_CPU_ONLY


@functools.cache
def _cpu_only() -> bool:
    return all(
        d.device_type == "CPU" for d in tf.config.list_logical_devices()
    )


_COMPILED_FORWARD: dict[tuple[TargetMargin, bool, bool, bool], Any] = {}


def _compiled_forward(
    margin: TargetMargin,
    full_pass: bool,
    with_valid: bool,
    normalize_weights: bool,
):
    """`_margin_forward` as a `tf.function(jit_compile=True)`.

    One per (margin, radial path, mask or not, normalised weights or not),
    kept for the process; each traces and compiles once per input shape and
    dtype.
    """
    key = (margin, full_pass, with_valid, normalize_weights)
    if key not in _COMPILED_FORWARD:

        def fn(x, w, labels, index, lam, valid=None):
            return _margin_forward(
                x, w, labels, index, lam, valid, margin, full_pass,
                normalize_weights=normalize_weights,
            )

        _COMPILED_FORWARD[key] = tf.function(
            fn, jit_compile=True, autograph=False, reduce_retracing=True
        )
    return _COMPILED_FORWARD[key]


def _dense_grad(x: tf.Tensor, w: tf.Tensor):
    def grad(upstream, *unused):
        dx = tf.matmul(upstream, w)
        return dx, tf.matmul(upstream, x, transpose_a=True), None, None

    return grad


def _full_pass(x: tf.Tensor, w: tf.Tensor) -> bool:
    # With no more classes than samples, passes over the whole kernel cost
    # less than gathering and scattering the B labelled rows.
    return _num_rows(w) <= _num_rows(x)


def _logits(x: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
    """`x @ wᵀ`, with the matrix product in its faster orientation."""
    if _in_xla_context() or _num_rows(x) >= _num_rows(w):
        return tf.matmul(x, w, transpose_b=True)
    # TensorFlow's Eigen matmul is slow when the operand it transposes is
    # the larger one: with more classes than samples x·wᵀ runs up to 2.5
    # times slower than (w·xᵀ)ᵀ, and transposing the (B, C) product costs
    # far less than the difference. XLA picks its own layouts.
    return tf.transpose(tf.matmul(w, x, transpose_b=True))


def _row_norms(t: tf.Tensor) -> tf.Tensor:
    if _in_xla_context():
        return tf.sqrt(_row_dots(t, t))
    # One pass over `t` instead of two (square, then sum). XLA has no kernel
    # for it.
    return tf.math.reduce_euclidean_norm(t, axis=1)


def _row_dots(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    if not _in_xla_context():
        # A batch of dot products: `reduce_sum(a * b)` would hold a
        # temporary the size of `a`.
        return tf.einsum("cd,cd->c", a, b)
    if _cpu_only():
        # XLA's CPU row reduction is slower than an elementwise product
        # followed by a matrix-vector product: at C = 10 000, D = 512 on 2
        # cores, 5.4 ms against 2.2 ms for the norms of a (C, D) kernel and
        # 4.6 ms against 2.6 ms for the dot products of two. The product is
        # a temporary the size of `a`; with it, a training step at B = 256
        # peaks at 0.82 times Dense's memory.
        ones = tf.ones(tf.shape(a)[-1:], a.dtype)
        return tf.linalg.matvec(a * b, ones)
    # XLA fuses the product into the sum.
    return tf.reduce_sum(a * b, axis=1)


_TYPICAL_BATCH_SIZE = 256


def _num_rows(t: tf.Tensor) -> int:
    # A batch size unknown at trace time is taken to be a typical one.
    return t.shape[0] if t.shape[0] is not None else _TYPICAL_BATCH_SIZE


def _add_at(
    tensor: tf.Tensor, indices: tf.Tensor, updates: tf.Tensor
) -> tf.Tensor:
    """`tensor` with `updates` added at `indices`, in place where possible.

    The ops in this module only ever change B entries of a (B, C) tensor or
    B rows of a (C, D) one, so a copy of the whole tensor would dominate
    their cost. TensorFlow's `TensorScatterAdd` kernel always makes that copy
    (it tries to reuse the buffer of its `updates` input, never that of
    `tensor`). `ScatterNdNonAliasingAdd` reuses the buffer of `tensor` when
    nothing else holds it, but has no XLA kernel; XLA updates a
    `TensorScatterAdd` in place by itself.
    """
    if _in_xla_context():
        return tf.tensor_scatter_nd_add(tensor, indices, updates)
    return tf.raw_ops.ScatterNdNonAliasingAdd(
        input=tensor, indices=indices, updates=updates
    )


_in_xla_context = compat.in_xla_context


def target_index(labels: tf.Tensor) -> tf.Tensor:
    """Indices (B, 2) of the entries [i, labels[i]] of a (B, C) matrix."""
    rows = tf.range(tf.shape(labels)[0], dtype=labels.dtype)
    return tf.stack([rows, labels], axis=1)


def with_plain_targets(
    logits: tf.Tensor, labels: tf.Tensor, plain_target: tf.Tensor
) -> tf.Tensor:
    """`logits` (B, C) with each entry [i, labels[i]] set to `plain_target[i]`.

    Undoes the margin of `margin_logits` for metrics, in place where nothing
    else holds `logits` any more, so it costs O(B) instead of a (B, C) copy.
    """
    index = target_index(labels)
    target = tf.gather_nd(logits, index)
    return _add_at(logits, index, tf.cast(plain_target, logits.dtype) - target)


def row_major(t: tf.Tensor) -> tf.Tensor:
    """`t` itself: TensorFlow tensors are always row-major."""
    return t
