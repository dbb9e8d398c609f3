"""Tests of `keras_lsoftmax.margins`, the φ of each head's target cosine.

Each margin returns (φ(c) − c, φ'(c) − 1); both are compared in float64 with
NumPy evaluations of the papers' formulas (θ by arccos, see
`tests/numpy_reference.py`), and φ' with central differences of φ. Every
test runs on each Keras backend.
"""

import math
import re

import keras
import numpy as np
import pytest

from keras_lsoftmax import ops
from keras_lsoftmax.margins import AngularMargin
from keras_lsoftmax.margins import ArcMargin
from keras_lsoftmax.margins import CosineMargin
from keras_lsoftmax.margins import TargetMargin
from keras_lsoftmax.margins import as_target_margin
from tests import numpy_reference as ref
from tests.test_ops import x64  # noqa: F401 (fixture)

# One grid size for every test: JAX compiles each margin once per shape.
GRID = 2001

# (margin, NumPy φ of cos θ, breakpoints of φ in θ besides 0 and π).
CASES = {
    "angular1": (AngularMargin(1), lambda c: ref.angular_phi(c, 1), []),
    "angular2": (AngularMargin(2), lambda c: ref.angular_phi(c, 2), [np.pi / 2]),
    "angular4": (
        AngularMargin(4),
        lambda c: ref.angular_phi(c, 4),
        [j * np.pi / 4 for j in (1, 2, 3)],
    ),
    "cosine0": (CosineMargin(0.0), lambda c: ref.cosine_phi(c, 0.0), []),
    "cosine035": (CosineMargin(0.35), lambda c: ref.cosine_phi(c, 0.35), []),
    "arc0": (ArcMargin(0.0), lambda c: ref.arc_phi(c, 0.0), []),
    "arc05": (ArcMargin(0.5), lambda c: ref.arc_phi(c, 0.5), [np.pi - 0.5]),
    "arc12": (ArcMargin(1.2), lambda c: ref.arc_phi(c, 1.2), [np.pi - 1.2]),
    "arc3": (ArcMargin(3.0), lambda c: ref.arc_phi(c, 3.0), [np.pi - 3.0]),
}


def _evaluate(margin, cos):
    """φ(c) − c and φ'(c) − 1 as NumPy arrays, for NumPy cosines."""
    shift, slope = margin(keras.ops.convert_to_tensor(cos))
    return keras.ops.convert_to_numpy(shift), keras.ops.convert_to_numpy(slope)


def _phi(margin, cos):
    return cos + _evaluate(margin, cos)[0]


def _angles_away_from(breaks, distance):
    """GRID angles in (0, π), at least `distance` from 0, π and `breaks`."""
    theta = np.linspace(distance, np.pi - distance, GRID)
    for b in breaks:
        near = np.abs(theta - b) < distance
        # Moved off the breakpoint, not dropped: one input shape.
        theta[near] = b + np.where(theta[near] < b, -distance, distance)
    return theta


def _expected_derivative(name, theta):
    """dφ/dc = (dφ/dθ) / (dc/dθ) of the papers' formulas."""
    margin = CASES[name][0]
    if isinstance(margin, AngularMargin):
        m = margin.m
        k = np.clip(np.floor(theta / (np.pi / m)), 0, m - 1)
        return (-1.0) ** k * m * np.sin(m * theta) / np.sin(theta)
    if isinstance(margin, CosineMargin):
        return np.ones_like(theta)
    m = margin.m
    return np.where(
        theta <= np.pi - m, np.sin(theta + m) / np.sin(theta), 1.0
    )


@pytest.mark.parametrize("name", list(CASES))
def test_shift_and_slope_match_numpy_formulas(x64, name):  # noqa: F811
    margin, phi, breaks = CASES[name]
    theta = _angles_away_from(breaks, 1e-3)
    c = np.cos(theta)
    shift, slope = _evaluate(margin, c)
    assert shift.dtype == slope.dtype == np.float64
    np.testing.assert_allclose(shift, phi(c) - c, rtol=0, atol=1e-10)
    np.testing.assert_allclose(
        slope, _expected_derivative(name, theta) - 1.0, rtol=1e-8, atol=1e-8
    )


@pytest.mark.parametrize("name", list(CASES))
def test_derivative_matches_finite_differences(x64, name):  # noqa: F811
    margin, _, breaks = CASES[name]
    # 0.05 rad from the ends and breakpoints: the steps in c (1e-7) stay on
    # one piece, and ArcMargin's floored sine is not reached.
    theta = _angles_away_from(breaks, 0.05)
    c, h = np.cos(theta), 1e-7
    numeric = (_phi(margin, c + h) - _phi(margin, c - h)) / (2 * h)
    _, slope = _evaluate(margin, c)
    scale = np.maximum(1.0, np.abs(numeric))
    np.testing.assert_array_less(np.abs(slope + 1.0 - numeric), 1e-6 * scale)


# Not "arc3": ArcMargin's branch c − m·sin m jumps up, not down, for
# m > 2.33 (where tan(m/2) = m), as in insightface.
@pytest.mark.parametrize("name", [name for name in CASES if name != "arc3"])
def test_phi_decreases_with_theta(x64, name):  # noqa: F811
    margin, _, _ = CASES[name]
    theta = np.linspace(0.0, np.pi, GRID)
    phi = _phi(margin, np.cos(theta))
    assert np.all(np.diff(phi) <= 1e-12)
    assert np.all(np.diff(phi)[1:-1] < 0)


@pytest.mark.parametrize("m", [0.5, 1.2])
def test_arc_margin_branch_beyond_pi_minus_m(x64, m):  # noqa: F811
    # On each side of θ = π − m: cos(θ + m), then c − m·sin m, which keeps
    # φ decreasing where cos(θ + m) would rise again. The branch jumps down
    # (by m·sin m − (1 − cos m) > 0), so φ stays monotone there too.
    branch = np.pi - m
    theta = np.array([branch - 1e-6, branch + 1e-6, branch + 0.1, np.pi])
    c = np.cos(theta)
    shift, slope = _evaluate(ArcMargin(m), c)
    phi = c + shift
    np.testing.assert_allclose(phi[0], np.cos(theta[0] + m), rtol=0, atol=1e-12)
    np.testing.assert_allclose(phi[1:], c[1:] - m * np.sin(m), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(slope[1:], 0.0)
    jump = m * np.sin(m) - (1.0 - np.cos(m))
    np.testing.assert_allclose(phi[0] - phi[1], jump, rtol=0, atol=1e-5)
    assert phi[3] < phi[2]


@pytest.mark.parametrize("name", list(CASES))
def test_finite_at_both_ends(x64, name):  # noqa: F811
    # θ = 0 makes ArcMargin's dφ/dc = cos m + c·sin m / sin θ infinite; the
    # floored sine keeps it finite.
    margin, phi, _ = CASES[name]
    c = np.array([1.0, -1.0, np.nextafter(1.0, 0.0), np.nextafter(-1.0, 0.0)])
    shift, slope = _evaluate(margin, c)
    assert np.all(np.isfinite(shift)) and np.all(np.isfinite(slope))
    np.testing.assert_allclose(shift, phi(c) - c, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", list(CASES))
def test_float32_cosines_stay_float32(name):
    margin = CASES[name][0]
    shift, slope = _evaluate(margin, np.linspace(-1, 1, GRID, dtype=np.float32))
    assert shift.dtype == slope.dtype == np.float32


@pytest.mark.parametrize(
    "margin, identity",
    [
        (AngularMargin(1), True),
        (AngularMargin(4), False),
        (CosineMargin(0.0), True),
        (CosineMargin(0.35), False),
        (ArcMargin(0.0), True),
        (ArcMargin(0.5), False),
    ],
)
def test_is_identity(margin, identity):
    assert margin.is_identity is identity
    assert isinstance(margin, TargetMargin)


@pytest.mark.parametrize(
    "margin", [AngularMargin(3), CosineMargin(0.2), ArcMargin(0.5)], ids=str
)
def test_config_and_serialization_round_trip(margin):
    config = margin.get_config()
    assert config == {"m": margin.m}
    assert type(margin).from_config(config) == margin
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(margin)
    )
    assert restored == margin and type(restored) is type(margin)
    # Frozen and hashable: a compiled op can key on them.
    assert hash(type(margin)(margin.m)) == hash(margin)
    with pytest.raises(AttributeError):
        margin.m = 1


def test_cosine_and_arc_margins_store_floats():
    assert CosineMargin(1).m == 1.0 and isinstance(CosineMargin(1).m, float)
    assert isinstance(ArcMargin(1).m, float)


@pytest.mark.parametrize(
    "cls, value",
    [
        (AngularMargin, 0),
        (AngularMargin, -2),
        (AngularMargin, 2.5),
        (AngularMargin, True),
        (CosineMargin, -0.1),
        (CosineMargin, float("nan")),
        (CosineMargin, float("inf")),
        (CosineMargin, True),
        (CosineMargin, "0.35"),
        (CosineMargin, None),
        (ArcMargin, -0.5),
        (ArcMargin, math.pi),
        (ArcMargin, 4.0),
        (ArcMargin, float("nan")),
        (ArcMargin, "0.5"),
    ],
)
def test_invalid_margins_name_the_argument_and_value(cls, value):
    with pytest.raises(ValueError, match=re.escape(f"margin={value!r}")):
        cls(value)


def test_as_target_margin():
    arc = ArcMargin(0.5)
    assert as_target_margin(arc) is arc
    assert as_target_margin(4) == AngularMargin(4)
    with pytest.raises(ValueError, match=re.escape("margin=0.5")):
        as_target_margin(0.5)


def test_op_takes_an_int_or_an_angular_margin_alike():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4)).astype("float32")
    w = rng.standard_normal((5, 4)).astype("float32")
    labels = ops.check_labels(rng.integers(0, 5, 8), 5, x)
    by_int = ops.margin_logits(x, w, labels, 4, 0.5)
    by_margin = ops.margin_logits(x, w, labels, AngularMargin(4), 0.5)
    for a, b in zip(by_int, by_margin):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        )


@pytest.mark.parametrize(
    "margin, phi",
    [
        (CosineMargin(0.35), lambda c: ref.cosine_phi(c, 0.35)),
        (ArcMargin(0.5), lambda c: ref.arc_phi(c, 0.5)),
        (AngularMargin(3), lambda c: ref.angular_phi(c, 3)),
    ],
    ids=["cosine", "arc", "angular"],
)
@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_op_applies_each_margin_to_the_target_logits(x64, margin, phi, lam):  # noqa: F811
    # The op's λ blend on unnormalised operands: ‖x‖‖w‖(λc + φ(c))/(1 + λ).
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 4))
    labels = rng.integers(0, 5, 16).astype(np.int32)
    x = ref.features_at_angles(rng, w, labels, np.linspace(0.05, 3.1, 16))
    got, plain_target, cos = ops.margin_logits(
        x, w, ops.check_labels(labels, 5, x), margin, lam
    )
    expected = ref.head_ref(x, w, labels, phi, lam)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(got), expected, rtol=0, atol=1e-10
    )
    _, _, dot, expected_cos = ref.target_geometry(x, w, labels)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(plain_target), dot, atol=1e-12)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(cos), expected_cos, atol=1e-12)
