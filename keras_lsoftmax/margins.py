"""Target margins: how each head of the large-margin family bends cos θ_y.

Every head of the family computes the plain logits ‖x‖‖w_j‖cos θ_j (after
normalising x and w where the head does) and replaces the labelled one by
‖x‖‖w_y‖·φ(cos θ_y), for a function φ of the target cosine:

| margin | φ(c) | head |
|---|---|---|
| `AngularMargin(m)` | ψ(θ) = (−1)^k cos(mθ) − 2k | L-Softmax, SphereFace |
| `CosineMargin(m)` | c − m | CosFace (AM-Softmax) |
| `ArcMargin(m)` | cos(θ + m), or c − m·sin m where θ > π − m | ArcFace |

A margin is the hook the op (`keras_lsoftmax.ops.margin_logits`) takes: it
returns φ(c) − c and φ'(c) − 1, from which the op builds the target logit
and its exact gradient (see `keras_lsoftmax.ops`). A new margin is a small
frozen dataclass with that `__call__`, written with `keras.ops` and
arithmetic operators, so that one formula serves every backend.
"""

import dataclasses
import math
from typing import Any

import keras

from keras_lsoftmax.backend.common import chebyshev_psi
from keras_lsoftmax.backend.common import check_margin
from keras_lsoftmax.backend.common import thresholds

# sin θ is floored here in ArcMargin's derivative: φ'(c) = cos m + c·sin m /
# sin θ is infinite at θ = 0, while the gradient it feeds, through
# ∂c/∂x ∝ sin θ, stays finite.
_MIN_SINE = math.sqrt(1e-7)


class TargetMargin:
    """Base class of the margins: φ of the target cosine, as a shift.

    Subclasses are frozen dataclasses (hashable, so that a compiled op can
    key on them) and implement `__call__`.
    """

    def __call__(self, cos_theta: Any) -> tuple[Any, Any]:
        """φ(c) − c and φ'(c) − 1 for cosines `cos_theta` in [−1, 1].

        Args:
            cos_theta: float tensor (B,) of the chosen backend, clipped to
                [−1, 1].

        Returns:
            The pair `(φ(c) − c, φ'(c) − 1)`, each with the shape and dtype
            of `cos_theta`.
        """
        raise NotImplementedError

    @property
    def is_identity(self) -> bool:
        """Whether φ(c) = c, so that the op computes the plain logits."""
        return False

    def get_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "TargetMargin":
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_lsoftmax")
@dataclasses.dataclass(frozen=True)
class AngularMargin(TargetMargin):
    """ψ(θ) = (−1)^k cos(mθ) − 2k on [kπ/m, (k+1)π/m]: the L-Softmax margin.

    Computed from c = cos θ by Chebyshev polynomials, without an arccosine
    (see `keras_lsoftmax.ops.psi`). m = 1 is the identity.

    Args:
        m: positive int, the multiplicative angular margin.
    """

    m: int

    def __post_init__(self) -> None:
        check_margin(self.m)

    def __call__(self, cos_theta: Any) -> tuple[Any, Any]:
        p, dp = self.psi(cos_theta)
        return p - cos_theta, dp - 1.0

    def psi(self, cos_theta: Any) -> tuple[Any, Any]:
        """ψ and its derivative in c, for cosines already in [−1, 1]."""
        # Python-float thresholds: a threshold tensor would be a
        # host-to-device copy on every call on PyTorch.
        k = keras.ops.zeros_like(cos_theta)
        for bound in thresholds(self.m):
            k = k + keras.ops.cast(cos_theta <= bound, cos_theta.dtype)
        return chebyshev_psi(cos_theta, k, self.m)

    @property
    def is_identity(self) -> bool:
        return self.m == 1


@keras.saving.register_keras_serializable(package="keras_lsoftmax")
@dataclasses.dataclass(frozen=True)
class CosineMargin(TargetMargin):
    """φ(c) = c − m: the additive cosine margin of CosFace / AM-Softmax.

    Args:
        m: float ≥ 0, subtracted from the target cosine.
    """

    m: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "m", check_nonnegative(self.m, "margin"))

    def __call__(self, cos_theta: Any) -> tuple[Any, Any]:
        zeros = keras.ops.zeros_like(cos_theta)
        return zeros - self.m, zeros

    @property
    def is_identity(self) -> bool:
        return self.m == 0.0


@keras.saving.register_keras_serializable(package="keras_lsoftmax")
@dataclasses.dataclass(frozen=True)
class ArcMargin(TargetMargin):
    """φ(c) = cos(θ + m): the additive angular margin of ArcFace, in radians.

    Where θ + m > π, cos(θ + m) would rise again with θ; there φ is
    c − m·sin m instead, as in insightface and pytorch-metric-learning, so
    that φ keeps decreasing with θ. That holds for m up to about 2.33
    (where cos m + m·sin m = 1, so both branches give −1 at θ = π − m),
    far above the margins in use (0.5 in the ArcFace paper); beyond it the
    second branch starts above −1, and φ rises by that step at θ = π − m.

    Args:
        m: float in [0, π), in radians.
    """

    m: float

    def __post_init__(self) -> None:
        m = check_nonnegative(self.m, "margin")
        if m >= math.pi:
            raise ValueError(
                "Received an invalid value for `margin`, expected radians in "
                f"[0, π). Received: margin={self.m!r}"
            )
        object.__setattr__(self, "m", m)

    def __call__(self, cos_theta: Any) -> tuple[Any, Any]:
        c = cos_theta
        cos_m, sin_m = math.cos(self.m), math.sin(self.m)
        sine = keras.ops.sqrt(keras.ops.clip(1.0 - c * c, 0.0, 1.0))
        floored = keras.ops.where(sine > _MIN_SINE, sine, _MIN_SINE)
        # cos(θ + m) − c and its derivative in c, minus 1.
        shift = c * (cos_m - 1.0) - sine * sin_m
        slope = (cos_m - 1.0) + c * sin_m / floored
        # θ > π − m ⇔ c < −cos m.
        beyond = c < -cos_m
        zeros = keras.ops.zeros_like(c)
        return (
            keras.ops.where(beyond, zeros - self.m * sin_m, shift),
            keras.ops.where(beyond, zeros, slope),
        )

    @property
    def is_identity(self) -> bool:
        return self.m == 0.0


def check_nonnegative(value: Any, name: str) -> float:
    """`value` as a float if it is a finite real number ≥ 0, else raises."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a finite "
            f"float >= 0. Received: {name}={value!r}"
        )
    return float(value)


def as_target_margin(margin: Any) -> TargetMargin:
    """`margin` as a `TargetMargin`: an int m stands for `AngularMargin(m)`."""
    if isinstance(margin, TargetMargin):
        return margin
    return AngularMargin(check_margin(margin))


__all__ = [
    "AngularMargin",
    "ArcMargin",
    "CosineMargin",
    "TargetMargin",
]
