"""Argument checks and dtype rules shared by every backend's op."""

import math
from typing import Any

import keras


def check_margin(margin: Any) -> int:
    """Returns `margin` if it is a positive Python integer, else raises."""
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 1:
        raise ValueError(
            "Received an invalid value for `margin`, expected a positive "
            f"integer. Received: margin={margin!r}"
        )
    return margin


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
