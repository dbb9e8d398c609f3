"""Argument checks and dtype rules shared by every backend's op."""

import math
from typing import Any

import keras


# Normalised rows: a row whose squared norm is below this is divided by
# 1e-6 instead (zero rows stay zero), and gets no gradient through it.
MIN_SQUARED_NORM = 1e-12
MIN_NORM = 1e-6


def check_margin(margin: Any) -> int:
    """Returns `margin` if it is a positive Python integer, else raises."""
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 1:
        raise ValueError(
            "Received an invalid value for `margin`, expected a positive "
            f"integer. Received: margin={margin!r}"
        )
    return margin


def check_operand_shapes(inputs_shape: tuple, kernel_shape: tuple) -> None:
    """Raises unless the shapes are (B, D) and (C, D) (None matches any)."""
    inputs_shape, kernel_shape = tuple(inputs_shape), tuple(kernel_shape)
    if len(inputs_shape) != 2 or len(kernel_shape) != 2:
        raise ValueError(
            "Expected `inputs` of shape (batch_size, input_dim) and `kernel` "
            f"of shape (units, input_dim). Received: inputs with shape "
            f"{inputs_shape}, kernel with shape {kernel_shape}"
        )
    last = (inputs_shape[1], kernel_shape[1])
    if None not in last and last[0] != last[1]:
        raise ValueError(
            "The last dimension of `inputs` must equal the last of `kernel`. "
            f"Received: inputs with shape {inputs_shape}, kernel with shape "
            f"{kernel_shape}"
        )


def check_lambda_number(lam: Any) -> Any:
    """Raises if `lam` is a Python number that is not >= 0; returns it."""
    if isinstance(lam, (int, float)) and not isinstance(lam, bool):
        if not lam >= 0:
            raise ValueError(
                "Received an invalid value for `lam`, expected a float >= 0. "
                f"Received: lam={lam!r}"
            )
    return lam


def compute_dtype(*dtypes: Any) -> str:
    """The dtype the op computes in: "float64" if any input is, else "float32".

    Half precision loses the margin (cos 4θ of a float16 cosine), so the math
    runs in float32 unless a caller asked for float64.
    """
    names = {keras.backend.standardize_dtype(d) for d in dtypes}
    return "float64" if "float64" in names else "float32"


def thresholds(margin: int) -> list[float]:
    """cos(jπ/m) for j = 1..m−1: the bounds of the intervals k of ψ."""
    return [math.cos(j * math.pi / margin) for j in range(1, margin)]


def chebyshev_psi(c: Any, k: Any, margin: int) -> tuple[Any, Any]:
    """ψ and its derivative from clipped cosines `c` and their intervals `k`.

    P(c) = (−1)^k T_m(c) − 2k and P'(c) = (−1)^k m U_{m−1}(c), with T and U
    the Chebyshev polynomials of the first and second kind. Only arithmetic
    operators are used, so `c` and `k` (float, same shape) may be arrays of
    any backend.
    """
    # T and U share the recurrence v_{n+1} = 2c·v_n − v_{n−1}, from
    # (T_0, T_1) = (1, c) and (U_{−1}, U_0) = (0, 1).
    two_c = 2.0 * c
    t_previous, t = 1.0, c
    u_previous, u = 0.0, 1.0
    for _ in range(margin - 1):
        t_previous, t = t, two_c * t - t_previous
        u_previous, u = u, two_c * u - u_previous
    sign = 1.0 - 2.0 * (k % 2.0)
    return sign * t - 2.0 * k, sign * float(margin) * u


def target_terms(
    margin: Any, cos: Any, lam: Any, valid: Any = None
) -> tuple[Any, Any, Any]:
    """What the target logit adds to the plain one, per labelled row.

    With φ the head's margin (`keras_lsoftmax.margins`), the target logit
    is t + ab·(φ_λ(c) − c), φ_λ(c) = (λc + φ(c)) / (1 + λ), and its
    derivatives are those of `keras_lsoftmax.ops` with α = φ_λ'(c) and
    δ = φ_λ(c) − c·φ_λ'(c). Only arithmetic operators act on `cos`, `lam`
    and `valid`, so they may be tensors of any backend.

    Args:
        margin: a `keras_lsoftmax.margins.TargetMargin`.
        cos: cosines (B,), clipped to [−1, 1].
        lam: λ ≥ 0, a float or a scalar tensor.
        valid: optional mask (B,); rows with 0 keep their plain logit.

    Returns:
        `(shift, α − 1, δ)`, each (B,): the target logit is
        t + ab·shift.
    """
    shift, slope = margin(cos)
    # Divided, not blended, so that λ → ∞ returns the plain logit exactly.
    inv = 1.0 / (1.0 + lam)
    if valid is not None:
        inv = inv * valid
    return shift * inv, slope * inv, (shift - cos * slope) * inv
