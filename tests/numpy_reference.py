"""Reference formulations of the L-Softmax logits, independent of the package.

`psi_ref` and `lsoftmax_ref` follow the paper literally in float64 NumPy:
θ = arccos(cos θ), k = ⌊θ / (π/m)⌋ clipped to m − 1, and
ψ(θ) = (−1)^k cos(mθ) − 2k. They share no code with `keras_lsoftmax.ops`,
which counts thresholds on cos θ and evaluates Chebyshev polynomials instead.

`lsoftmax_autodiff` is the same math in TensorFlow, differentiated by plain
automatic differentiation (k under `stop_gradient`, no `tf.custom_gradient`),
so that the package's hand-written gradient can be compared with it.

`caffe_psi` holds the authors' sign-based closed forms for m = 2, 3, 4.
"""

import math

import numpy as np


def psi_ref(theta: np.ndarray, margin: int) -> np.ndarray:
    """ψ(θ) = (−1)^k cos(mθ) − 2k with k = ⌊θ/(π/m)⌋ clipped to [0, m − 1]."""
    theta = np.asarray(theta, dtype=np.float64)
    k = np.clip(np.floor(theta / (np.pi / margin)), 0, margin - 1)
    return (-1.0) ** k * np.cos(margin * theta) - 2.0 * k


def caffe_psi(c: np.ndarray, margin: int) -> np.ndarray:
    """The authors' Caffe ψ(c) for m = 2, 3, 4 (reference §2, step 5)."""
    c = np.asarray(c, dtype=np.float64)
    s0 = np.sign(c)
    if margin == 2:
        return 2.0 * s0 * c**2 - 1.0
    if margin == 3:
        s1 = np.sign(np.abs(c) - 0.5)
        s2 = s0 * (1.0 + s1) - 2.0
        return s1 * (4.0 * c**3 - 3.0 * c) + s2
    if margin == 4:
        s3 = s0 * np.sign(2.0 * c**2 - 1.0)
        s4 = 2.0 * s0 + s3 - 3.0
        return s3 * (8.0 * c**4 - 8.0 * c**2 + 1.0) + s4
    raise ValueError(f"No Caffe closed form for margin={margin}")


def target_geometry(x, w, labels):
    """Per sample: ‖x‖, ‖w_y‖, x·w_y and cos θ (0 where a norm is 0)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    w_y = w[np.asarray(labels)]
    a = np.linalg.norm(x, axis=1)
    b = np.linalg.norm(w_y, axis=1)
    dot = np.sum(x * w_y, axis=1)
    ab = a * b
    cos = np.divide(dot, ab, out=np.zeros_like(dot), where=ab > 0)
    return a, b, dot, np.clip(cos, -1.0, 1.0)


def lsoftmax_ref(x, w, labels, margin: int, lam: float) -> np.ndarray:
    """The paper's L-Softmax logits, in float64; `w` holds one row per class."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    labels = np.asarray(labels)
    a, b, _, cos = target_geometry(x, w, labels)
    psi = psi_ref(np.arccos(cos), margin)
    target = (lam * a * b * cos + a * b * psi) / (1.0 + lam)
    out = x @ w.T
    out[np.arange(len(labels)), labels] = target
    return out


def breakpoint_distance(theta: np.ndarray, margin: int) -> np.ndarray:
    """Distance of θ to the nearest breakpoint jπ/m, j = 0..m."""
    breaks = np.arange(margin + 1) * (np.pi / margin)
    theta = np.asarray(theta, dtype=np.float64)
    return np.min(np.abs(theta[..., None] - breaks), axis=-1)


def features_at_angles(rng, w, labels, theta, norms=None) -> np.ndarray:
    """Features x_i at angle θ_i from their class weight w[labels[i]].

    Each x_i is r_i·(cos θ_i·ŵ + sin θ_i·v̂) with v̂ a random unit vector
    orthogonal to ŵ, so a test can place samples in every interval of ψ.
    """
    w = np.asarray(w, dtype=np.float64)
    theta = np.asarray(theta, dtype=np.float64)
    u = w[np.asarray(labels)]
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    v = rng.standard_normal(u.shape)
    v -= np.sum(v * u, axis=1, keepdims=True) * u
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    if norms is None:
        norms = rng.uniform(0.5, 2.0, size=len(theta))
    return norms[:, None] * (np.cos(theta)[:, None] * u + np.sin(theta)[:, None] * v)


def sample_away_from_breakpoints(
    rng: np.random.Generator,
    labels,
    input_dim: int,
    num_classes: int,
    margin: int,
    min_distance: float = 1e-3,
):
    """Random float64 (x, w) with target angles uniform on [0, π] off jπ/m.

    Finite differences straddling a breakpoint see the jump of ψ'' there,
    so angles closer than `min_distance` (radians) to one are redrawn.
    """
    labels = np.asarray(labels)
    w = rng.standard_normal((num_classes, input_dim))
    theta = rng.uniform(0.0, np.pi, size=len(labels))
    while True:
        bad = breakpoint_distance(theta, margin) <= min_distance
        if not bad.any():
            break
        theta[bad] = rng.uniform(0.0, np.pi, size=int(bad.sum()))
    return features_at_angles(rng, w, labels, theta), w


def lsoftmax_autodiff(x, w, labels, margin: int, lam):
    """The L-Softmax logits in TensorFlow, for plain automatic differentiation.

    cos(mθ) is the Chebyshev polynomial T_m(cos θ) (stable in float32, unlike
    the derivative of arccos near θ = 0); the interval index k comes from
    arccos and floor, under `stop_gradient`.
    """
    import tensorflow as tf  # only the TensorFlow tests use this one

    x = tf.convert_to_tensor(x)
    w = tf.convert_to_tensor(w, dtype=x.dtype)
    lam = tf.cast(lam, x.dtype)
    logits = tf.matmul(x, w, transpose_b=True)
    w_y = tf.gather(w, labels)
    a = tf.norm(x, axis=1)
    b = tf.norm(w_y, axis=1)
    cos = tf.clip_by_value(tf.reduce_sum(x * w_y, axis=1) / (a * b), -1.0, 1.0)
    theta = tf.stop_gradient(tf.acos(cos))
    k = tf.minimum(tf.floor(theta / (math.pi / margin)), margin - 1.0)
    t_prev, t = tf.ones_like(cos), cos
    for _ in range(margin - 1):
        t_prev, t = t, 2.0 * cos * t - t_prev
    psi = (1.0 - 2.0 * tf.math.floormod(k, 2.0)) * t - 2.0 * k
    target = (lam * a * b * cos + a * b * psi) / (1.0 + lam)
    mask = tf.one_hot(labels, tf.shape(w)[0], dtype=x.dtype)
    return logits * (1.0 - mask) + mask * target[:, None]


# ------------------------------------------------- the large-margin family
#
# The heads' formulas as /work/shared/reference/margin-family.md states
# them, with θ by arccos: SphereFace ψ(θ) on unit class weights, CosFace
# s·(cos θ − m), ArcFace s·cos(θ + m) (s·(cos θ − m·sin m) beyond π − m),
# sub-centre ArcFace's max over K weights per class.


def unit_rows(a) -> np.ndarray:
    """`a` with every row scaled to unit norm (zero rows stay zero)."""
    a = np.asarray(a, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return np.divide(a, norms, out=np.zeros_like(a), where=norms > 0)


def angular_phi(cos, margin: int) -> np.ndarray:
    """ψ(θ) of L-Softmax and SphereFace, as a function of cos θ."""
    return psi_ref(np.arccos(np.clip(cos, -1.0, 1.0)), margin)


def cosine_phi(cos, margin: float) -> np.ndarray:
    """CosFace's cos θ − m."""
    return np.asarray(cos, dtype=np.float64) - margin


def arc_phi(cos, margin: float) -> np.ndarray:
    """ArcFace's cos(θ + m), and cos θ − m·sin m where θ > π − m."""
    cos = np.clip(np.asarray(cos, dtype=np.float64), -1.0, 1.0)
    theta = np.arccos(cos)
    return np.where(
        theta <= np.pi - margin,
        np.cos(theta + margin),
        cos - margin * np.sin(margin),
    )


def head_ref(
    x,
    w,
    labels=None,
    phi=None,
    lam: float = 0.0,
    scale: float | None = None,
    normalize_weights: bool = False,
    sub_centers: int = 1,
    valid=None,
) -> np.ndarray:
    """A family head's logits (B, C) in float64; `w` holds K rows per class.

    Features are normalised and scaled by `scale` if it is set, class weights
    normalised if `normalize_weights`. Without `labels` (or `phi`) the plain
    logits: per class, the largest of its K sub-centre logits. With them,
    the labelled class of each row whose `valid` is not 0 takes
    ‖x‖‖w_k‖·(λ cos θ + φ(cos θ)) / (1 + λ) on its sub-centre k of largest
    cosine.
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    if scale is not None:
        x = scale * unit_rows(x)
    if normalize_weights:
        w = unit_rows(w)
    per_row = x @ w.T
    grouped = per_row.reshape(len(x), -1, sub_centers)
    out = grouped.max(axis=-1)
    if labels is None or phi is None:
        return out
    labels = np.asarray(labels)
    rows = np.arange(len(x))
    closest = np.argmax(grouped[rows, labels], axis=-1)
    chosen = labels * sub_centers + closest
    a, b, _, cos = target_geometry(x, w, chosen)
    target = a * b * (lam * cos + phi(cos)) / (1.0 + lam)
    keep = np.ones(len(x), bool) if valid is None else np.asarray(valid) != 0
    out[rows[keep], labels[keep]] = target[keep]
    return out
