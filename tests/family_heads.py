"""The family's heads as the workflow tests and their subprocesses build them.

`HEADS[kind](units, name)` builds a head; `FORMULAS[kind]` holds the
keywords of `tests.numpy_reference.head_ref` for its training formula. The
scale is 16, not the default 64: the tiny models of the tests train with it
in a few steps.
"""

from keras_lsoftmax import ArcFaceDense
from keras_lsoftmax import CosFaceDense
from keras_lsoftmax import SphereFaceDense
from tests import numpy_reference as ref

SCALE = 16.0

HEADS = {
    "sphereface": lambda units, name=None: SphereFaceDense(units, name=name),
    "cosface": lambda units, name=None: CosFaceDense(
        units, scale=SCALE, name=name
    ),
    "arcface": lambda units, name=None: ArcFaceDense(
        units, scale=SCALE, name=name
    ),
    "arcface_k3": lambda units, name=None: ArcFaceDense(
        units, scale=SCALE, sub_centers=3, name=name
    ),
}

FORMULAS = {
    "sphereface": dict(
        phi=lambda c: ref.angular_phi(c, 4), normalize_weights=True
    ),
    "cosface": dict(
        phi=lambda c: ref.cosine_phi(c, 0.35), scale=SCALE, normalize_weights=True
    ),
    "arcface": dict(
        phi=lambda c: ref.arc_phi(c, 0.5), scale=SCALE, normalize_weights=True
    ),
    "arcface_k3": dict(
        phi=lambda c: ref.arc_phi(c, 0.5),
        scale=SCALE,
        normalize_weights=True,
        sub_centers=3,
    ),
}
