"""The margin logits of the large-margin family and their exact gradient.

This module is the one description of the math; each Keras backend
implements it in `keras_lsoftmax/backend/<backend>/ops.py` and the functions
here take and return that backend's tensors.

Forward. For sample i with feature x (D,), label y and class weight
w = kernel[y] (the kernel holds one row per class, (C, D)), every logit is
`x @ kernelᵀ` except the target, which becomes

    t = ‖x‖‖w‖·φ_λ(cos θ),   φ_λ(c) = (λc + φ(c)) / (1 + λ),
    cos θ = x·w / (‖x‖‖w‖),

for the head's margin φ, a `keras_lsoftmax.margins.TargetMargin` (the hook
each head states its formula in). For L-Softmax φ is
ψ(θ) = (−1)^k cos(mθ) − 2k for θ ∈ [kπ/m, (k+1)π/m], computed from c as
P(c) = (−1)^k T_m(c) − 2k (T_m the Chebyshev polynomial, k the number of
thresholds cos(jπ/m), j = 1..m−1, that c does not exceed), so no arccosine
is taken; CosFace and ArcFace use c − m and cos(θ + m) (see
`keras_lsoftmax.margins`). The identity margin (L-Softmax m = 1) gives the
plain logits; λ → ∞ tends to them.

Backward. With a = ‖x‖, b = ‖w‖, α = φ_λ'(c) and
δ = φ_λ(c) − c·φ_λ'(c), the target's derivatives are
∂t/∂x = α·w + δ·b·x/a and ∂t/∂w = α·x + δ·a·w/b (finite for a = 0 or
b = 0). With G = ∂L/∂logits and g_i = G[i, y_i], the layer's gradients are
the two matrix products of a Dense layer plus O(B·D) work on the B labelled
rows:

    ∂L/∂X = G·W + diag((α − 1)·g)·W_y + diag(g·δ·b/a)·X
    ∂L/∂W = Gᵀ·X + Σ_i e_{y_i}·((α − 1)·g_i·x_i + g_i·δ_i·(a_i/b_i)·w_{y_i})

The heads that normalise x (CosFace, ArcFace) do so before the op, and
autodiff carries the gradient through the normalisation. Normalised class
weights (SphereFace, CosFace, ArcFace; `normalize_weights=True`) are not
computed: the logits' columns are scaled by s_j = 1/‖w_j‖, so the products
above take G·diag(s), and dw_j, the kernel's gradient with s held fixed,
becomes dw_j − s_j²·(w_j·dw_j)·w_j (every logit is homogeneous of degree 1
in its class weight, so w_j·dw_j/s_j is the gradient of s_j).
Neither a normalised copy of the kernel nor the unscaled logits are kept
for the backward pass.

Second derivatives (a gradient penalty, for instance) of the op are exact on
TensorFlow and JAX. On PyTorch they raise a `RuntimeError`: the op's
backward pass there is a first derivative only.

float16 and bfloat16 inputs are computed and returned in float32, float64
inputs in float64.

Reference:
    Liu, Wen, Yu, Yang, "Large-Margin Softmax Loss for Convolutional Neural
    Networks", ICML 2016, https://arxiv.org/abs/1612.02295
"""

from typing import Any

import keras

from keras_lsoftmax.backend import ops as _backend
from keras_lsoftmax.backend.common import check_margin
from keras_lsoftmax.backend.common import compute_dtype
from keras_lsoftmax.margins import AngularMargin
from keras_lsoftmax.margins import TargetMargin
from keras_lsoftmax.margins import as_target_margin

__all__ = [
    "check_labels",
    "check_margin",
    "compute_dtype",
    "lsoftmax_logits",
    "margin_logits",
    "plain_logits",
    "psi",
    "with_plain_targets",
]


def psi(cos_theta: Any, margin: int) -> tuple[Any, Any]:
    """The paper's margin function ψ and its derivative, as functions of cos θ.

    Args:
        cos_theta: float tensor of cosines, any shape; values outside
            [−1, 1] are clipped.
        margin: the integer margin m ≥ 1.

    Returns:
        A pair `(P(c), P'(c))`, P(c) = (−1)^k T_m(c) − 2k and
        P'(c) = (−1)^k m U_{m−1}(c), U the Chebyshev polynomial of the
        second kind; both have the shape and dtype of `cos_theta`. P is
        continuous and decreasing in θ, with P(1) = 1 and P(−1) = 1 − 2m.
    """
    margin = AngularMargin(check_margin(margin))
    cos_theta = keras.ops.convert_to_tensor(cos_theta)
    return margin.psi(keras.ops.clip(cos_theta, -1.0, 1.0))


def check_labels(labels: Any, num_classes: int, inputs: Any = None) -> Any:
    """Validates sparse labels of shape (B,) and returns them as int32.

    The range check (and, given `inputs`, the check that there is one label
    per row of `inputs`) runs wherever the backend can check at run time:
    TensorFlow in eager and graph mode, PyTorch in eager mode, JAX outside
    `jit`. Compiled code does not check them: under XLA
    (`jit_compile=True` on TensorFlow, `jit` on JAX) the gather clamps
    labels outside [0, num_classes), and under `torch.compile` the indexing
    fails with PyTorch's own "index out of bounds" error.
    """
    return _backend.check_labels(labels, num_classes, inputs)


def plain_logits(inputs: Any, kernel: Any) -> Any:
    """`inputs @ kernelᵀ` in the dtype `lsoftmax_logits` computes in."""
    return _backend.plain_logits(inputs, kernel)


def margin_logits(
    inputs: Any,
    kernel: Any,
    labels: Any,
    margin: TargetMargin | int,
    lam: Any,
    valid: Any = None,
    normalize_weights: bool = False,
) -> tuple[Any, Any, Any]:
    """The margin logits plus, per sample, the plain target logit and cos θ.

    Args:
        inputs: float tensor (B, D).
        kernel: float tensor (C, D).
        labels: int32 class ids (B,) already checked by `check_labels`.
        margin: a `keras_lsoftmax.margins.TargetMargin`, or a Python int
            m ≥ 1 for `AngularMargin(m)` (L-Softmax).
        lam: scalar ≥ 0 (float, tensor or variable), the λ of φ_λ; 0 for
            the margin φ itself.
        valid: optional float mask (B,) scaling each row's margin: rows with
            0 keep their plain logits and get the plain gradient.
        normalize_weights: bool. If True, the class weights are the unit
            rows w_j/‖w_j‖ of `kernel` (a row with ‖w_j‖ < 1e-6 is divided
            by 1e-6 instead), and the gradient reaches `kernel` through the
            normalisation.

    Returns:
        `(logits, plain_target, cos_theta)`: the margin logits (B, C), and
        the plain logit of each labelled class and cos θ, both (B,) and
        without gradient (the models use them for metrics on plain logits
        and for logging θ).
    """
    if not isinstance(normalize_weights, bool):
        raise ValueError(
            "Received an invalid value for `normalize_weights`, expected a "
            f"bool. Received: normalize_weights={normalize_weights!r}"
        )
    return _backend.margin_logits(
        inputs,
        kernel,
        labels,
        as_target_margin(margin),
        lam,
        valid,
        normalize_weights,
    )


def lsoftmax_logits(
    inputs: Any, kernel: Any, labels: Any, margin: int, lam: Any
) -> Any:
    """The L-Softmax logits: plain logits with the labelled one given a margin.

    See the module docstring for the math. The gradient is analytic on every
    backend (`tf.custom_gradient`, `jax.custom_vjp`, a
    `torch.autograd.Function`): the two matrix products of a Dense layer
    plus O(B·D) element-wise work, finite for zero feature rows and zero
    class weights.

    The class weights are the rows of `kernel`, as in the authors' Caffe
    layer and `torch.nn.Linear`: a training step then reads and updates only
    the B contiguous rows of the labelled classes.

    Args:
        inputs: float tensor (B, D), the features.
        kernel: float tensor (C, D), one row of class weights per class.
        labels: integer tensor (B,), class ids in [0, C).
        margin: Python int m ≥ 1.
        lam: scalar ≥ 0 (float, tensor or variable), the paper's λ.

    Returns:
        Tensor (B, C) of logits, float32 (float64 if either input is), of
        the backend in use.

    Example:

    ```python
    x = keras.random.normal((8, 16), seed=1)
    w = keras.random.normal((10, 16), seed=2)
    y = keras.ops.arange(8)
    logits = keras_lsoftmax.ops.lsoftmax_logits(x, w, y, margin=4, lam=0.0)
    ```

    Reference:
        Liu, Wen, Yu, Yang, "Large-Margin Softmax Loss for Convolutional
        Neural Networks", ICML 2016, https://arxiv.org/abs/1612.02295
    """
    check_margin(margin)
    labels = check_labels(labels, _num_classes(kernel), inputs)
    return margin_logits(inputs, kernel, labels, margin, lam)[0]


def with_plain_targets(logits: Any, labels: Any, plain_target: Any) -> Any:
    """`logits` (B, C) with each entry [i, labels[i]] set to `plain_target[i]`.

    Undoes the margin of `margin_logits` for metrics with an O(B) update
    (in place where the backend allows it), not a second forward pass.
    """
    return _backend.with_plain_targets(logits, labels, plain_target)


def _num_classes(kernel: Any) -> Any:
    shape = getattr(kernel, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(
            "Expected `kernel` of shape (units, input_dim). Received: kernel "
            f"with shape {shape}"
        )
    return shape[0]
