"""The L-Softmax op on PyTorch: a `torch.autograd.Function`, exact gradient.

The math is described in `keras_lsoftmax.ops`. The forward pass is one matrix
product plus O(B·D) work on the B labelled class weights, the margin written
in place into the B target logits; the backward pass is the two matrix
products of a Dense layer plus O(B·D) work, the labelled rows' extra terms
added in place. No (B, C) tensor is built beside the logits and the upstream
gradient.

`keras.ops.custom_gradient` is not used: on torch its grad function gets one
upstream gradient only (this op has three outputs), it saves only tensor
arguments, and when a first call raises it re-runs the forward pass under a
bare `except`, after which the gradients come out NaN.

Under `torch.compile` a training step through the op compiles, also with
`fullgraph=True` (dynamo traces the Function's forward and backward; a λ
that changes, Python float or tensor, does not recompile), and matches eager
mode. The one difference: the checks that read tensor values back to the
host are skipped, so labels outside [0, C) and a negative λ tensor raise no
`ValueError`. A bad label then fails in the compiled gather instead (a
`RuntimeError` "index out of bounds" from inductor's bounds check on CPU, a
device-side assertion on an accelerator); a negative λ goes unreported.

The backward pass is `once_differentiable`: the terms it takes from the
forward pass carry no graph, so a second derivative through it would leave
out the margin's terms. It raises a `RuntimeError` instead.
"""

from typing import Any

import keras
import numpy as np
import torch

from keras_lsoftmax.backend.common import check_lambda_number
from keras_lsoftmax.backend.common import check_operand_shapes
from keras_lsoftmax.backend.common import MIN_NORM
from keras_lsoftmax.backend.common import MIN_SQUARED_NORM
from keras_lsoftmax.backend.common import compute_dtype
from keras_lsoftmax.backend.common import target_terms
from keras_lsoftmax.margins import TargetMargin
from keras_lsoftmax.margins import as_target_margin

# Whether a training step of a sub-centre head gathers each class's logit at
# its chosen sub-centre (one scatter in the backward pass) instead of taking
# `max` along the sub-centres (some five passes over the (B, C, K) logits).
GATHER_SUB_CENTRES = True

# The scaled upstream gradient of normalised weights is built in this many
# blocks of classes (see `_add_upstream_product`), blocks of at least
# _MIN_CLASS_BLOCK classes, so small heads run one matrix product. At
# C = 10 000, B = 256, D = 512 on 2 CPU cores, a compiled step's peak memory
# is 1.03-1.11 times Dense's in 64 blocks and 1.11-1.18 times in 16; the
# blocked product takes 20 ms, against 19 ms in 16 blocks and 17.5 ms for
# Dense's unblocked one.
_CLASS_BLOCKS = 64
_MIN_CLASS_BLOCK = 128


def check_labels(
    labels: Any, num_classes: int, inputs: Any = None
) -> torch.Tensor:
    """Validates sparse labels of shape (B,) and returns them as int32.

    int32 is what the other backends return; torch indexes with int32 as
    well as with int64. The labels are moved to the device of `inputs` when
    that is a tensor. The range check reads the smallest and largest label
    back to the host, so it runs in eager mode only: under `torch.compile`
    labels outside [0, num_classes) are not reported here.
    """
    device = inputs.device if isinstance(inputs, torch.Tensor) else None
    labels = _to_tensor(labels, device)
    dtype_name = keras.backend.standardize_dtype(labels.dtype)
    if not dtype_name.startswith(("int", "uint")):
        raise ValueError(
            "Expected `labels` to hold integer class ids. Received: labels "
            f"with dtype {dtype_name}"
        )
    if labels.ndim != 1:
        raise ValueError(
            "Expected `labels` to have shape (batch_size,). Received: labels "
            f"with shape {tuple(labels.shape)}"
        )
    if inputs is not None:
        inputs_shape = np.shape(inputs)
        if tuple(labels.shape) != tuple(inputs_shape[:1]):
            raise ValueError(
                "Expected `labels` to hold one label per row of `inputs`. "
                f"Received: labels with shape {tuple(labels.shape)}, inputs "
                f"with shape {tuple(inputs_shape)}"
            )
    if labels.numel() and not torch.compiler.is_compiling():
        low, high = torch.stack(torch.aminmax(labels)).tolist()
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"Expected `labels` in [0, {num_classes}). Received labels "
                f"from {low} to {high}"
            )
    return labels.to(torch.int32)


def plain_logits(inputs: Any, kernel: Any) -> torch.Tensor:
    """`inputs @ kernelᵀ` in the dtype `lsoftmax_logits` computes in."""
    x, w = _operands(inputs, kernel)
    return x @ w.T


def margin_logits(
    inputs: Any,
    kernel: Any,
    labels: Any,
    margin: TargetMargin | int,
    lam: Any,
    valid: Any = None,
    normalize_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See `keras_lsoftmax.ops.margin_logits`."""
    margin = as_target_margin(margin)
    x, w = _operands(inputs, kernel, check_shapes=True)
    labels = _to_tensor(labels, x.device)
    lam = _check_lambda(lam, x.dtype, x.device)
    if margin.is_identity:
        logits, target, cos = _plain_margin_logits(x, w, labels)
        if normalize_weights:
            # No margin math to fold the norms into: autograd of a product.
            scales = torch.rsqrt(
                torch.clamp((w * w).sum(dim=1), min=MIN_SQUARED_NORM)
            )
            logits = logits * scales
            target = target * scales.detach()[labels]
        return logits, target, cos
    if valid is not None:
        valid = _to_tensor(valid, x.device).detach().to(x.dtype)
    return _MarginLogits.apply(
        x, w, labels, lam, valid, normalize_weights, margin
    )


def with_plain_targets(
    logits: torch.Tensor, labels: Any, plain_target: Any
) -> torch.Tensor:
    """`logits` (B, C) with each entry [i, labels[i]] set to `plain_target[i]`.

    Undoes the margin of `margin_logits` for metrics with an O(B) write into
    the storage of `logits` (no (B, C) copy), through a detached alias that
    is returned: the result carries no gradient, and `logits` itself reads
    the plain targets afterwards. The models call it after the loss's
    backward pass, when nothing else needs the margin logits. The alias
    shares the version counter of `logits`, so should autograd still hold
    `logits` for a backward pass that has not run, that pass raises instead
    of computing with the changed values.
    """
    out = logits.detach()
    labels = _to_tensor(labels, out.device)
    rows = torch.arange(labels.shape[0], device=out.device)
    plain_target = _to_tensor(plain_target, out.device).to(out.dtype)
    return out.index_put_((rows, labels), plain_target)


class _MarginLogits(torch.autograd.Function):
    """The margin logits (B, C), plain target logits and cos θ (B,).

    Arguments: x (B, D) and w (C, D) in the compute dtype, int labels (B,),
    λ (a float or a 0-d tensor), the optional row mask `valid` (B,),
    whether the class weights are normalised, and the
    `keras_lsoftmax.margins.TargetMargin`. Only x and w get gradients.
    """

    @staticmethod
    def forward(ctx, x, w, labels, lam, valid, normalize_weights, margin):
        logits = x @ w.T
        rows, target, w_y, a, b, cos = _target_terms(logits, x, w, labels)
        shift, alpha_minus_1, delta = target_terms(margin, cos, lam, valid)
        logits.index_put_((rows, labels), target + a * b * shift)
        norms = None
        if normalize_weights:
            norms = torch.linalg.vector_norm(w, dim=1)
            scales = 1.0 / torch.clamp(norms, min=MIN_NORM)
            logits.mul_(scales)
            target = target * scales[labels]
        # w_y is gathered again in the backward pass: kept, it would be
        # one (B, D) tensor more at the backward pass's peak.
        ctx.save_for_backward(x, w, labels, a, b, alpha_minus_1, delta, norms)
        ctx.mark_non_differentiable(target, cos)
        return logits, target, cos

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, upstream, *unused):
        x, w, labels, a, b, alpha_minus_1, delta, norms = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        dx = dw = None
        if not (need_x or need_w):
            return dx, dw, None, None, None, None, None
        scales = None
        if norms is not None:
            scales = 1.0 / torch.clamp(norms, min=MIN_NORM)
        # The labelled rows' terms come first, so that their temporaries are
        # freed before the (C, D) product exists.
        x_terms, w_terms = _labelled_terms(
            upstream, x, w, labels, a, b, alpha_minus_1, delta, scales
        )
        if need_x:
            # The O(B·D) terms are the matrix product's addend: no pass over
            # a modified copy of the (B, C) upstream gradient.
            dx = _add_upstream_product(x_terms, upstream, scales, w)
        if need_w:
            dw = upstream.T @ x
            if scales is not None:
                dw.mul_(scales[:, None])
            dw.index_add_(0, labels, w_terms)
            if scales is not None:
                _add_normalization_grad(dw, w, norms, scales)
        return dx, dw, None, None, None, None, None


def _labelled_terms(
    upstream: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    alpha_minus_1: torch.Tensor,
    delta: torch.Tensor,
    scales: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The O(B·D) terms of the B labelled rows (see `keras_lsoftmax.ops`).

    Returns:
        The (B, D) addend of ∂L/∂X and the (B, D) rows added to ∂L/∂W at
        the rows `labels`.
    """
    rows = torch.arange(labels.shape[0], device=labels.device)
    g = upstream[rows, labels]
    if scales is not None:
        g = g * scales[labels]
    tangent = (alpha_minus_1 * g)[:, None]
    gd = g * delta
    w_y = w.index_select(0, labels)
    x_radial = torch.where(a > 0, gd * b / a, 0.0)[:, None]
    w_radial = torch.where(b > 0, gd * a / b, 0.0)[:, None]
    x_terms = torch.addcmul(tangent * w_y, x_radial, x)
    return x_terms, torch.addcmul(tangent * x, w_radial, w_y)


def _add_upstream_product(
    dx: torch.Tensor,
    upstream: torch.Tensor,
    scales: torch.Tensor | None,
    w: torch.Tensor,
) -> torch.Tensor:
    """dx + (upstream · diag(scales)) @ w, in place into dx.

    With scales, the product runs over blocks of classes, so the scaled
    upstream gradient exists one block at a time: a whole scaled copy would
    be one (B, C) buffer more than a Dense step's backward pass needs.
    """
    if scales is None:
        return dx.addmm_(upstream, w)
    classes = w.shape[0]
    block = max(-(-classes // _CLASS_BLOCKS), _MIN_CLASS_BLOCK)
    for start in range(0, classes, block):
        stop = start + block
        dx.addmm_(upstream[:, start:stop] * scales[start:stop], w[start:stop])
    return dx


@torch.library.custom_op(
    "keras_lsoftmax::add_normalization_grad_", mutates_args=("dw",)
)
def _add_normalization_grad(
    dw: torch.Tensor, w: torch.Tensor, norms: torch.Tensor, scales: torch.Tensor
) -> None:
    """dw, the kernel's gradient with the scales s held fixed, turned into
    the gradient through s_j = 1/‖w_j‖ too, in place:
    dw_j − s_j²·(w_j·dw_j)·w_j (see `keras_lsoftmax.ops`).

    Rows whose norm was clamped have a constant scale, so only their dw.
    A custom op, so that the update stays in place under `torch.compile`:
    written as plain ops, inductor fuses the dot products with the update
    into one kernel, which writes a second (C, D) buffer.
    """
    # A batch of C dot products: no (C, D) product of w and dw.
    dots = torch.bmm(w.unsqueeze(1), dw.unsqueeze(2)).reshape(-1)
    coefficient = torch.where(norms > MIN_NORM, -scales * scales * dots, 0.0)
    dw.addcmul_(coefficient[:, None], w)


def _target_terms(
    logits: torch.Tensor, x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The per-sample terms of the target logits, computed without gradient.

    Returns:
        Row indices (B,), the plain target logits x·w_y, the labelled class
        weights w_y (B, D), ‖x‖, ‖w_y‖ and cos θ (0 where a norm is 0).
    """
    rows = torch.arange(labels.shape[0], device=labels.device)
    target = logits[rows, labels]
    w_y = w.index_select(0, labels)
    a = torch.linalg.vector_norm(x, dim=1)
    b = torch.linalg.vector_norm(w_y, dim=1)
    ab = a * b
    cos = torch.clamp(torch.where(ab > 0, target / ab, 0.0), -1.0, 1.0)
    return rows, target, w_y, a, b, cos


def _plain_margin_logits(
    x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The identity margin: the plain logits (autograd's Dense gradient)."""
    logits = x @ w.T
    with torch.no_grad():
        _, target, _, _, _, cos = _target_terms(logits, x, w, labels)
    return logits, target, cos


def _operands(
    inputs: Any, kernel: Any, check_shapes: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`inputs` and `kernel` as tensors in the compute dtype.

    Both go to the device of `inputs`; autograd casts their gradients back
    to the callers' dtypes.
    """
    x = _to_tensor(inputs)
    w = _to_tensor(kernel, x.device)
    if check_shapes:
        check_operand_shapes(x.shape, w.shape)
    dtype = getattr(torch, compute_dtype(x.dtype, w.dtype))
    return x.to(dtype), w.to(dtype)


def _check_lambda(
    lam: Any, dtype: torch.dtype, device: torch.device
) -> float | torch.Tensor:
    """λ as a Python float or a detached 0-d tensor of `dtype` on `device`.

    A negative λ tensor raises in eager mode only: the check reads λ back to
    the host, which `torch.compile` cannot trace.
    """
    if isinstance(lam, (int, float)) and not isinstance(lam, bool):
        return float(check_lambda_number(lam))
    lam = _to_tensor(lam, device).detach().to(dtype)
    if lam.ndim != 0:
        raise ValueError(
            "Expected `lam` to be a scalar. Received: lam with shape "
            f"{tuple(lam.shape)}"
        )
    if not torch.compiler.is_compiling() and not bool(lam >= 0):
        raise ValueError(
            "Expected `lam` >= 0 (the L-Softmax λ). Received: "
            f"lam={lam.item()!r}"
        )
    return lam


def _to_tensor(value: Any, device: torch.device | None = None) -> torch.Tensor:
    """`value` (tensor, Keras variable, array, list or number) as a tensor.

    Non-tensors go through `keras.ops.convert_to_tensor` (Keras's device and
    dtype rules, variables unwrapped); the result is moved to `device` if
    one is given.
    """
    if not isinstance(value, torch.Tensor):
        value = keras.ops.convert_to_tensor(value)
    return value if device is None else value.to(device)


def row_major(t: torch.Tensor) -> torch.Tensor:
    """`t` in row-major memory.

    A variable keeps the strides of its initial value: a transposed view
    would make every step read and update the kernel column by column (1.3
    to 1.7 times a Dense step at B = 256, D = 512 on CPU).
    """
    return t.contiguous()
