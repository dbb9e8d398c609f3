"""The L-Softmax margin logit and its exact analytic gradient.

The forward pass is one matrix product plus O(B·D) work on the B labelled
columns; the backward pass is the two matrix products of a Dense layer plus
O(B·D) work. See `lsoftmax_logits` for the math.
"""

import math
from typing import Any

import tensorflow as tf

_HALF_DTYPES = (tf.float16, tf.bfloat16)


def check_margin(margin: Any) -> int:
    """Returns `margin` if it is a positive Python integer, else raises."""
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 1:
        raise ValueError(
            "Received an invalid value for `margin`, expected a positive "
            f"integer. Received: margin={margin!r}"
        )
    return margin


def psi(cos_theta: Any, margin: int) -> tuple[tf.Tensor, tf.Tensor]:
    """The paper's margin function ψ and its derivative, as functions of cos θ.

    ψ(θ) = (−1)^k cos(mθ) − 2k for θ ∈ [kπ/m, (k+1)π/m]. It is computed as
    P(c) = (−1)^k T_m(c) − 2k with c = cos θ, the Chebyshev polynomial T_m and
    k the number of thresholds cos(jπ/m), j = 1..m−1, that c does not exceed,
    so no arccosine is taken. P is continuous and decreasing in θ, with
    P(1) = 1 and P(−1) = 1 − 2m.

    Args:
        cos_theta: float tensor of cosines, any shape; values outside
            [−1, 1] are clipped.
        margin: the integer margin m ≥ 1.

    Returns:
        A pair `(P(c), P'(c))` with P'(c) = (−1)^k m U_{m−1}(c), U the
        Chebyshev polynomial of the second kind; both have the shape and dtype
        of `cos_theta`.
    """
    margin = check_margin(margin)
    c = tf.clip_by_value(tf.convert_to_tensor(cos_theta), -1.0, 1.0)
    # T and U share the recurrence v_{n+1} = 2c·v_n − v_{n−1}: run it once
    # on both, from (T_0, U_{−1}) = (1, 0) and (T_1, U_0) = (c, 1).
    two_c = 2.0 * c
    previous = tf.stack([tf.ones_like(c), tf.zeros_like(c)])
    current = tf.stack([c, tf.ones_like(c)])
    for _ in range(margin - 1):
        previous, current = current, two_c * current - previous
    t, u = tf.unstack(current)
    thresholds = [math.cos(j * math.pi / margin) for j in range(1, margin)]
    below = c[..., None] <= tf.constant(thresholds, c.dtype)
    k = tf.reduce_sum(tf.cast(below, c.dtype), axis=-1)
    sign = 1.0 - 2.0 * tf.math.floormod(k, 2.0)
    return sign * t - 2.0 * k, sign * float(margin) * u


def compute_dtype(*dtypes: tf.DType) -> tf.DType:
    """The dtype the op computes in: float64 if any input is, else float32."""
    # Half precision loses the margin (cos 4θ of a float16 cosine), so the
    # math runs in float32 unless a caller asked for float64.
    return tf.float64 if tf.float64 in dtypes else tf.float32


def _check_lambda(lam: Any, dtype: tf.DType) -> tf.Tensor:
    if isinstance(lam, (int, float)) and not isinstance(lam, bool):
        if not lam >= 0:
            raise ValueError(
                "Received an invalid value for `lam`, expected a float >= 0. "
                f"Received: lam={lam!r}"
            )
        return tf.constant(lam, dtype)
    lam = tf.cast(tf.convert_to_tensor(lam), dtype)
    if lam.shape.rank != 0:
        raise ValueError(
            f"Expected `lam` to be a scalar. Received: lam with shape {lam.shape}"
        )
    tf.debugging.assert_non_negative(
        lam, message="Expected `lam` >= 0 (the L-Softmax λ)."
    )
    return lam


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
    checks = [
        tf.debugging.assert_non_negative(
            labels, message="Expected `labels` in [0, num_classes)."
        ),
        tf.debugging.assert_less(
            labels,
            tf.constant(num_classes, labels.dtype),
            message=f"Expected `labels` in [0, {num_classes}).",
        ),
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
    """`inputs @ kernel` in the dtype `lsoftmax_logits` computes in."""
    inputs = tf.convert_to_tensor(inputs)
    kernel = tf.convert_to_tensor(kernel)
    dtype = compute_dtype(inputs.dtype, kernel.dtype)
    return tf.matmul(tf.cast(inputs, dtype), tf.cast(kernel, dtype))


def margin_logits(
    inputs: Any, kernel: Any, labels: Any, margin: int, lam: Any
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """`lsoftmax_logits` plus, per sample, the plain target logit and cos θ.

    `labels` must already be int32 class ids checked by `check_labels`. The
    two extra outputs (shape (B,)) carry no gradient; the layer uses them for
    metrics on plain logits and for logging θ.
    """
    margin = check_margin(margin)
    inputs = tf.convert_to_tensor(inputs)
    kernel = tf.convert_to_tensor(kernel)
    if inputs.shape.rank != 2 or kernel.shape.rank != 2:
        raise ValueError(
            "Expected `inputs` of shape (batch_size, input_dim) and `kernel` "
            f"of shape (input_dim, units). Received: inputs with shape "
            f"{inputs.shape}, kernel with shape {kernel.shape}"
        )
    if not inputs.shape[1:].is_compatible_with(kernel.shape[:1]):
        raise ValueError(
            "The last dimension of `inputs` must equal the first of `kernel`. "
            f"Received: inputs with shape {inputs.shape}, kernel with shape "
            f"{kernel.shape}"
        )
    dtype = compute_dtype(inputs.dtype, kernel.dtype)
    inputs = tf.cast(inputs, dtype)
    kernel = tf.cast(kernel, dtype)
    lam = _check_lambda(lam, dtype)
    logits, target, cos = _margin_core(inputs, kernel, labels, lam, margin)
    return logits, tf.stop_gradient(target), tf.stop_gradient(cos)


def lsoftmax_logits(
    inputs: Any, kernel: Any, labels: Any, margin: int, lam: Any
) -> tf.Tensor:
    """The L-Softmax logits: plain logits with the labelled one given a margin.

    For sample i with feature x, label y and class weight w = kernel[:, y],
    every logit is `x @ kernel` except the target, which becomes

        t = (λ·x·w + ‖x‖‖w‖·ψ(θ)) / (1 + λ),   cos θ = x·w / (‖x‖‖w‖),

    with ψ from `psi`. m = 1 gives the plain logits; λ → ∞ tends to them.
    The gradient is analytic (`tf.custom_gradient`): the two matrix products
    of a Dense layer plus O(B·D) element-wise work, finite for zero feature
    rows and zero kernel columns. float16 and bfloat16 inputs are computed and
    returned in float32.

    Args:
        inputs: float tensor (B, D), the features.
        kernel: float tensor (D, C), the class weights.
        labels: integer tensor (B,), class ids in [0, C).
        margin: Python int m ≥ 1.
        lam: scalar ≥ 0 (float, tensor or variable), the paper's λ.

    Returns:
        Tensor (B, C) of logits, float32 (float64 if either input is).

    Example:

    ```python
    x = tf.random.normal((8, 16))
    w = tf.random.normal((16, 10))
    y = tf.constant([0, 1, 2, 3, 4, 5, 6, 7])
    logits = lsoftmax_logits(x, w, y, margin=4, lam=0.0)
    ```

    Reference:
        Liu, Wen, Yu, Yang, "Large-Margin Softmax Loss for Convolutional
        Neural Networks", ICML 2016, https://arxiv.org/abs/1612.02295
    """
    kernel = tf.convert_to_tensor(kernel)
    labels = check_labels(labels, kernel.shape[-1], inputs)
    return margin_logits(inputs, kernel, labels, margin, lam)[0]


# Up to this many classes a pass over the whole kernel costs less than
# gathering and scattering its B labelled columns element by element.
_FULL_PASS_MAX_CLASSES = 32768


def _margin_core(
    x: tf.Tensor, w: tf.Tensor, labels: tf.Tensor, lam: tf.Tensor, margin: int
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    full_pass = w.shape[1] is not None and w.shape[1] <= _FULL_PASS_MAX_CLASSES

    @tf.custom_gradient
    def forward(x, w, labels, lam):
        logits = tf.matmul(x, w)
        index = target_index(labels)
        target = tf.gather_nd(logits, index)
        if full_pass:
            b = tf.gather(tf.norm(w, axis=0), labels)
        else:
            w_y = tf.gather(w, labels, axis=1)  # (D, B)
            b = tf.norm(w_y, axis=0)
        a = tf.norm(x, axis=1)
        ab = a * b
        cos = tf.clip_by_value(tf.math.divide_no_nan(target, ab), -1.0, 1.0)
        if margin == 1:
            return (logits, target, cos), _dense_grad(x, w)
        p, dp = psi(cos, margin)
        inv = 1.0 / (1.0 + lam)
        # (λ·xw + ab·P)/(1+λ) written so that λ → ∞ returns xw exactly.
        margin_target = target + ab * (p - cos) * inv
        # After the gather, the scatter is the last reader of `logits` and
        # updates it in place.
        with tf.control_dependencies([target]):
            out = tf.tensor_scatter_nd_update(logits, index, margin_target)
        alpha = 1.0 + (dp - 1.0) * inv
        delta = (p - cos * dp) * inv

        def grad(upstream, *unused):
            g = tf.gather_nd(upstream, index)
            with tf.control_dependencies([g]):
                g_adj = tf.tensor_scatter_nd_update(upstream, index, alpha * g)
            gd = g * delta
            dx = tf.matmul(g_adj, w, transpose_b=True)
            dx += tf.math.divide_no_nan(gd * b, a)[:, None] * x
            dw = tf.matmul(x, g_adj, transpose_a=True)
            # The radial term w_y·gδa/b of each labelled column.
            radial = tf.math.divide_no_nan(gd * a, b)
            if full_pass:
                per_class = tf.math.unsorted_segment_sum(
                    radial, labels, tf.shape(w)[1]
                )
                dw += w * per_class[None, :]
            else:
                dw = tf.tensor_scatter_nd_add(
                    dw, _column_index(w, labels), w_y * radial[None, :]
                )
            return dx, dw, None, None

        return (out, target, cos), grad

    return forward(x, w, labels, lam)


def _dense_grad(x: tf.Tensor, w: tf.Tensor):
    def grad(upstream, *unused):
        dx = tf.matmul(upstream, w, transpose_b=True)
        return dx, tf.matmul(x, upstream, transpose_a=True), None, None

    return grad


def target_index(labels: tf.Tensor) -> tf.Tensor:
    """Indices (B, 2) of the entries [i, labels[i]] of a (B, C) matrix."""
    rows = tf.range(tf.shape(labels)[0], dtype=labels.dtype)
    return tf.stack([rows, labels], axis=1)


def _column_index(w: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    # Indices (D, B, 2) of the entries [d, labels[i]] of a (D, C) matrix.
    dims = tf.range(tf.shape(w)[0], dtype=labels.dtype)
    d = tf.broadcast_to(dims[:, None], [tf.shape(w)[0], tf.shape(labels)[0]])
    y = tf.broadcast_to(labels[None, :], tf.shape(d))
    return tf.stack([d, y], axis=-1)
