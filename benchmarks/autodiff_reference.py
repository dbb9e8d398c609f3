"""A straightforward autodiff L-Softmax head: the benchmark's reference row.

This is the margin math of `keras_lsoftmax.ops.lsoftmax_logits` written the
way a typical user would write it in plain TensorFlow: take the plain logits,
gather the target logit and the target weight columns, compute the norms and
cos θ, evaluate ψ with the Chebyshev recurrence and a `stop_gradient` k, and
write the target logit back with a one-hot mask. The gradient is whatever
autodiff makes of that (no `tf.custom_gradient`), so the backward pass carries
several (B, C) temporaries: the mask select, the gather's scatter-back and
their sum.

It is *not* part of the package. The benchmark (`benchmarks/bench_head.py`)
times it next to `LSoftmaxDense` and `keras.layers.Dense`, and
`tests/test_benchmarks.py` checks it against the package op in float64, so
it doubles as an independent reference for the op's value and gradient.

Like most hand-written versions it is not safe at the edges: a zero feature
row or zero weight column gives NaN gradients (the derivative of the norm at
0), which the package op avoids.
"""

import math
from typing import Any

import keras
import tensorflow as tf


def autodiff_lsoftmax_logits(
    inputs: Any, kernel: Any, labels: Any, margin: int, lam: Any
) -> tf.Tensor:
    """L-Softmax logits (B, C) by plain TF ops, differentiated by autodiff.

    Args:
        inputs: float tensor (B, D).
        kernel: float tensor (D, C), same dtype as `inputs`.
        labels: integer tensor (B,).
        margin: Python int m >= 1.
        lam: scalar λ >= 0 (float, tensor or variable).
    """
    x = tf.convert_to_tensor(inputs)
    w = tf.convert_to_tensor(kernel)
    labels = tf.cast(labels, tf.int32)
    lam = tf.cast(lam, x.dtype)
    num_classes = tf.shape(w)[1]

    logits = tf.matmul(x, w)  # (B, C)
    target = tf.gather(logits, labels, axis=1, batch_dims=1)  # (B,) x·w_y
    w_y = tf.gather(w, labels, axis=1)  # (D, B) target columns
    a = tf.norm(x, axis=1)  # ‖x‖
    b = tf.norm(w_y, axis=0)  # ‖w_y‖
    cos = tf.clip_by_value(target / (a * b), -1.0, 1.0)

    # cos(mθ) = T_m(cos θ), the Chebyshev polynomial of the first kind.
    t_prev, t_m = tf.ones_like(cos), cos
    for _ in range(margin - 1):
        t_prev, t_m = t_m, 2.0 * cos * t_m - t_prev
    # θ ∈ [kπ/m, (k+1)π/m]; k is piecewise constant, so no gradient.
    k = tf.zeros_like(cos)
    for j in range(1, margin):
        k += tf.cast(cos <= math.cos(j * math.pi / margin), cos.dtype)
    k = tf.stop_gradient(k)
    sign = 1.0 - 2.0 * tf.math.floormod(k, 2.0)
    psi = sign * t_m - 2.0 * k

    margin_target = (lam * target + a * b * psi) / (1.0 + lam)  # (B,)
    mask = tf.one_hot(labels, num_classes, on_value=True, off_value=False)
    return tf.where(mask, margin_target[:, None], logits)


class AutodiffLSoftmaxDense(keras.layers.Layer):
    """A bias-free class-weight layer using `autodiff_lsoftmax_logits`.

    Same call signature as `keras_lsoftmax.LSoftmaxDense` for the
    benchmark: `layer(x, labels=y, training=True)` gives margin logits, and
    anything else the plain logits. λ is a non-trainable float32 variable.
    """

    def __init__(
        self,
        units: int,
        margin: int = 4,
        initial_lambda: float = 0.0,
        kernel_initializer: Any = "glorot_uniform",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.units = units
        self.margin = margin
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.lambda_ = self.add_weight(
            name="lambda",
            shape=(),
            dtype="float32",
            initializer=keras.initializers.Constant(initial_lambda),
            trainable=False,
        )

    def build(self, input_shape: tuple) -> None:
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_shape[-1], self.units),
            initializer=self.kernel_initializer,
        )

    def call(
        self, inputs: Any, labels: Any = None, training: bool | None = None
    ) -> tf.Tensor:
        if labels is None or not training:
            return tf.matmul(inputs, self.kernel)
        return autodiff_lsoftmax_logits(
            inputs, self.kernel, labels, self.margin, self.lambda_
        )

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[0], self.units)
