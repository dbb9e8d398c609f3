"""Tests of the family's heads (`keras_lsoftmax.heads`) and `MarginDense`.

Forward values are compared in float64 with the NumPy formulas of each
paper (`tests/numpy_reference.py`, θ by arccos), gradients with central
finite differences; then every head goes through the workflows of
`LSoftmaxDense`: `fit` / `evaluate` / `predict`, structured labels,
`ignore_class`, `label_scope` in a custom step, `.keras` files, export,
mixed precision, compiled steps, `tf.distribute` and JAX `DataParallel`
(in subprocesses), and default arguments that train. Every test runs on
each Keras backend unless it is marked.
"""

import json
import math
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_lsoftmax
from keras_lsoftmax import ArcFaceDense
from keras_lsoftmax import CosFaceDense
from keras_lsoftmax import LSoftmaxDense
from keras_lsoftmax import MarginDense
from keras_lsoftmax import SphereFaceDense
from keras_lsoftmax import label_scope
from keras_lsoftmax.margins import AngularMargin
from keras_lsoftmax.margins import ArcMargin
from keras_lsoftmax.margins import CosineMargin
from tests import family_heads
from tests import numpy_reference as ref
from tests.backend_utils import BACKEND
from tests.backend_utils import gradients
from tests.datasets import random_classification
from tests.test_mixed_precision import dtype_policy
from tests.test_models import BLOB_CLASSES
from tests.test_models import _blobs
from tests.test_ops import _central_differences
from tests.test_ops import x64  # noqa: F401 (fixture)
from tests.workers import ROOT
from tests.workers import worker_env

B, D, C = 24, 6, 5  # batch, features, classes of the formula tests
H = 16  # hidden units of the workflow models


def _np(tensor):
    return keras.ops.convert_to_numpy(tensor)


# ------------------------------------------------------------- formulas

# name: (layer factory, NumPy reference keywords). The scales are small
# enough that float64 rounding of s·cos θ stays far below the tolerances.
FORMULAS = {
    "sphereface": (
        lambda **kw: SphereFaceDense(C, margin=4, **kw),
        dict(phi=lambda c: ref.angular_phi(c, 4), normalize_weights=True),
    ),
    "sphereface_m2": (
        lambda **kw: SphereFaceDense(C, margin=2, **kw),
        dict(phi=lambda c: ref.angular_phi(c, 2), normalize_weights=True),
    ),
    "cosface": (
        lambda **kw: CosFaceDense(C, margin=0.35, scale=30.0, **kw),
        dict(
            phi=lambda c: ref.cosine_phi(c, 0.35),
            scale=30.0,
            normalize_weights=True,
        ),
    ),
    "arcface": (
        lambda **kw: ArcFaceDense(C, margin=0.5, scale=30.0, **kw),
        dict(phi=lambda c: ref.arc_phi(c, 0.5), scale=30.0, normalize_weights=True),
    ),
    "arcface_k3": (
        lambda **kw: ArcFaceDense(C, margin=0.5, scale=30.0, sub_centers=3, **kw),
        dict(
            phi=lambda c: ref.arc_phi(c, 0.5),
            scale=30.0,
            normalize_weights=True,
            sub_centers=3,
        ),
    ),
    # MarginDense with neither normalisation: the op on the raw operands.
    "margin_dense_cosine": (
        lambda **kw: MarginDense(C, target_margin=CosineMargin(0.2), **kw),
        dict(phi=lambda c: ref.cosine_phi(c, 0.2)),
    ),
    "margin_dense_arc_k2": (
        lambda **kw: MarginDense(
            C, target_margin=ArcMargin(0.3), scale=8.0, sub_centers=2, **kw
        ),
        dict(phi=lambda c: ref.arc_phi(c, 0.3), scale=8.0, sub_centers=2),
    ),
}


def _float64_head(name, lam=0.0, seed=0):
    """The head `name`, float64, built on D features with a seeded kernel."""
    factory, _ = FORMULAS[name]
    layer = factory(
        lambda_schedule=lam,
        dtype="float64",
        kernel_initializer=keras.initializers.RandomNormal(seed=seed),
    )
    layer.build((None, D))
    return layer


def _formula_data(layer, seed=0, theta=None):
    """(x, labels) float64, the target angles to sub-centre 0 spread over
    (0, π) (or `theta`), the other sub-centres (if any) wherever they fall.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(B) % C).astype(np.int32)
    if theta is None:
        theta = rng.permutation(np.linspace(0.05, np.pi - 0.05, B))
    kernel = _np(layer.kernel)
    first_centres = kernel[:: layer.sub_centers]
    return ref.features_at_angles(rng, first_centres, labels, theta), labels


def _expected(name, layer, x, labels, lam=0.0, valid=None):
    _, keywords = FORMULAS[name]
    return ref.head_ref(
        x, _np(layer.kernel), labels, lam=lam, valid=valid, **keywords
    )


def _plain_expected(name, layer, x):
    _, keywords = FORMULAS[name]
    keywords = {k: v for k, v in keywords.items() if k != "phi"}
    return ref.head_ref(x, _np(layer.kernel), **keywords)


def _lambda_cases():
    for name in FORMULAS:
        yield pytest.param(name, 0.0, id=f"{name}-lam0")
    for name in ("sphereface", "cosface", "arcface"):
        yield pytest.param(name, 0.5, id=f"{name}-lam0.5")


@pytest.mark.parametrize("name, lam", list(_lambda_cases()))
def test_float64_logits_match_the_formulas(x64, name, lam):  # noqa: F811
    layer = _float64_head(name, lam)
    x, labels = _formula_data(layer)
    got = layer(x, labels=labels, training=True)
    assert keras.backend.standardize_dtype(got.dtype) == "float64"
    expected = _expected(name, layer, x, labels, lam)
    np.testing.assert_allclose(_np(got), expected, rtol=0, atol=1e-10)
    # The check can fail: the margin moved every target logit.
    plain = _plain_expected(name, layer, x)
    rows = np.arange(B)
    assert np.all(np.abs(expected[rows, labels] - plain[rows, labels]) > 1e-3)
    # Inference: the plain logits, with or without labels.
    for out in (layer(x), layer(x, labels=labels, training=False)):
        np.testing.assert_allclose(_np(out), plain, rtol=0, atol=1e-10)


def test_arcface_branch_beyond_pi_minus_m(x64):  # noqa: F811
    layer = _float64_head("arcface")
    # Half the targets beyond θ = π − m = 2.64, half before it.
    theta = np.concatenate(
        [np.linspace(2.7, 3.1, B // 2), np.linspace(2.2, 2.6, B // 2)]
    )
    x, labels = _formula_data(layer, seed=1, theta=theta)
    got = _np(layer(x, labels=labels, training=True))[np.arange(B), labels]
    beyond = 30.0 * (np.cos(theta) - 0.5 * np.sin(0.5))
    before = 30.0 * np.cos(theta + 0.5)
    expected = np.where(theta > np.pi - 0.5, beyond, before)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)
    # cos(θ + m) would have been larger than the branch beyond π − m.
    assert np.all(before[: B // 2] > beyond[: B // 2] + 1.0)


def test_sub_centres_take_the_closest_and_the_max(x64):  # noqa: F811
    layer = _float64_head("arcface_k3", seed=3)
    kernel = ref.unit_rows(_np(layer.kernel))
    rng = np.random.default_rng(4)
    labels = (np.arange(B) % C).astype(np.int32)
    # Each sample near sub-centre k = i mod 3 of its class.
    chosen = labels * 3 + np.arange(B) % 3
    x = kernel[chosen] + 0.1 * rng.standard_normal((B, D))
    got = _np(layer(x, labels=labels, training=True))
    cos = np.sum(ref.unit_rows(x) * kernel[chosen], axis=1)
    np.testing.assert_allclose(
        got[np.arange(B), labels],
        30.0 * np.cos(np.arccos(cos) + 0.5),
        rtol=0,
        atol=1e-10,
    )
    plain = 30.0 * ref.unit_rows(x) @ kernel.T
    np.testing.assert_allclose(
        _np(layer(x)), plain.reshape(B, C, 3).max(axis=-1), rtol=0, atol=1e-10
    )
    assert layer.kernel.shape == (C * 3, D)


@pytest.mark.parametrize("name", ["sphereface", "cosface", "arcface_k3"])
def test_ignore_class_rows_keep_plain_logits(x64, name):  # noqa: F811
    layer = _float64_head(name, 0.5)
    x, labels = _formula_data(layer, seed=2)
    ignored = labels.copy()
    ignored[::3] = -1
    valid = ignored != -1
    with label_scope(ignored, ignore_class=-1) as scope:
        got = layer(x, training=True)
    expected = _expected(name, layer, x, np.where(valid, labels, 0), 0.5, valid)
    np.testing.assert_allclose(_np(got), expected, rtol=0, atol=1e-10)
    assert len(scope.records) == 1
    np.testing.assert_array_equal(_np(scope.records[0].valid), valid)


# ------------------------------------------------------------ gradients


def _gradient_case(name, lam, seed):
    """A float64 head and data off every breakpoint of its φ."""
    layer = _float64_head(name, lam, seed=seed)
    rng = np.random.default_rng(seed)
    theta = rng.uniform(0.1, np.pi - 0.1, B)
    if "sphere" in name:
        m = layer.margin
        off = ref.breakpoint_distance(theta, m) > 0.02
        theta = np.where(off, theta, theta + 0.05)
    else:
        # Off ArcFace's branch point π − m, on both sides of it.
        theta = np.where(np.abs(theta - (np.pi - 0.5)) > 0.02, theta, theta - 0.05)
    x, labels = _formula_data(layer, seed=seed, theta=theta)
    upstream = rng.standard_normal((B, C))
    return layer, x, labels, upstream


def _head_function(layer, labels, upstream):
    """The head's margin logits as a function of (x, kernel), weighted."""

    def fn(x, kernel):
        out, _ = layer.stateless_call(
            [kernel], [layer.lambda_.value], x, labels=labels, training=True
        )
        return keras.ops.multiply(out, upstream)

    return fn


@pytest.mark.parametrize("name, lam", list(_lambda_cases()))
def test_gradients_match_finite_differences(x64, name, lam):  # noqa: F811
    layer, x, labels, upstream = _gradient_case(name, lam, seed=5)
    fn = _head_function(layer, labels, upstream)
    kernel = _np(layer.kernel)
    _, (dx, dw) = gradients(fn, x, kernel)
    assert dx.dtype == dw.dtype == np.float64
    for got, numeric in zip((dx, dw), _central_differences(fn, x, kernel)):
        scale = max(1.0, float(np.max(np.abs(numeric))))
        np.testing.assert_allclose(got, numeric, rtol=0, atol=1e-6 * scale)


HEAD_NAMES = ["sphereface", "cosface", "arcface", "arcface_k3"]


def _finite_gradients(layer, x, labels, kernel=None):
    kernel = _np(layer.kernel) if kernel is None else kernel
    upstream = np.ones((len(x), C), x.dtype)
    out, (dx, dw) = gradients(_head_function(layer, labels, upstream), x, kernel)
    for value in (out, dx, dw):
        assert np.all(np.isfinite(value))
    return out, dx, dw


def _float32_head(name):
    layer = FORMULAS[name][0](
        kernel_initializer=keras.initializers.RandomNormal(seed=6)
    )
    layer.build((None, D))
    return layer


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_finite_at_theta_zero_zero_features_and_zero_weights(name):
    layer = _float32_head(name)
    kernel = _np(layer.kernel)
    labels = (np.arange(8) % C).astype(np.int32)
    rows = labels * layer.sub_centers
    # θ = 0 exactly: x parallel to its class weight (sub-centre 0).
    x = (2.0 * kernel[rows]).astype("float32")
    out, _, _ = _finite_gradients(layer, x, labels)
    # θ = 0: φ(1) = 1 for SphereFace, 1 − m for CosFace, cos m for ArcFace.
    target = out[np.arange(8), labels]
    factor = {"sphereface": 1.0, "cosface": 30.0 * 0.65}.get(
        name, 30.0 * math.cos(0.5)
    )
    norms = np.linalg.norm(x, axis=1) if name == "sphereface" else 1.0
    # ArcFace reads θ from a float32 cosine: sin θ = √(1 − c²) of a c one
    # ulp below 1 is already 5e-4.
    np.testing.assert_allclose(target, factor * norms, rtol=1e-3)
    # Zero feature rows.
    x[[1, 5]] = 0.0
    out, _, _ = _finite_gradients(layer, x, labels)
    np.testing.assert_array_equal(out[[1, 5]], 0.0)
    # A zero class weight (every sub-centre of class 1), labelled.
    kernel[layer.sub_centers : 2 * layer.sub_centers] = 0.0
    x = np.random.default_rng(7).standard_normal((8, D)).astype("float32")
    out, _, _ = _finite_gradients(layer, x, labels, kernel)
    np.testing.assert_array_equal(out[:, 1], 0.0)


# ----------------------------------------------------------- validation


@pytest.mark.parametrize(
    "factory, name, value",
    [
        (SphereFaceDense, "units", 0),
        (CosFaceDense, "units", 0),
        (ArcFaceDense, "units", 0),
        (MarginDense, "units", 0),
        (ArcFaceDense, "units", 2.5),
        (SphereFaceDense, "margin", 0),
        (SphereFaceDense, "margin", -1),
        (SphereFaceDense, "margin", 2.5),
        (CosFaceDense, "margin", -0.1),
        (CosFaceDense, "margin", float("nan")),
        (ArcFaceDense, "margin", -0.5),
        (ArcFaceDense, "margin", math.pi),
        (ArcFaceDense, "margin", 3.5),
        (CosFaceDense, "scale", 0.0),
        (CosFaceDense, "scale", -1.0),
        (ArcFaceDense, "scale", 0.0),
        (ArcFaceDense, "scale", float("inf")),
        (ArcFaceDense, "scale", "64"),
        (ArcFaceDense, "sub_centers", 0),
        (ArcFaceDense, "sub_centers", -1),
        (ArcFaceDense, "sub_centers", 1.5),
        (MarginDense, "sub_centers", 0),
        (MarginDense, "scale", 0.0),
        (MarginDense, "normalize_weights", 1),
        (MarginDense, "target_margin", 4),
        (MarginDense, "target_margin", "arc"),
        (MarginDense, "target_margin", None),
        (CosFaceDense, "lambda_schedule", -1.0),
    ],
)
def test_constructor_errors_name_the_argument_and_value(factory, name, value):
    kwargs = {"units": C, name: value}
    if factory is MarginDense:
        kwargs.setdefault("target_margin", ArcMargin(0.5))
    with pytest.raises(ValueError, match=re.escape(f"{name}={value!r}")):
        factory(**kwargs)


# ---------------------------------------------------------- config, API


@pytest.mark.parametrize(
    "layer, formula",
    [
        (SphereFaceDense(3), {"margin": 4}),
        (CosFaceDense(3, margin=0.2, scale=16), {"margin": 0.2, "scale": 16.0}),
        (
            ArcFaceDense(3, margin=0.3, scale=8, sub_centers=2),
            {"margin": 0.3, "scale": 8.0, "sub_centers": 2},
        ),
    ],
    ids=["sphereface", "cosface", "arcface"],
)
def test_config_round_trip(layer, formula):
    config = layer.get_config()
    assert {k: config[k] for k in formula} == formula
    assert "target_margin" not in config and "normalize_weights" not in config
    restored = type(layer).from_config(config)
    assert restored.get_config() == config
    assert restored.target_margin == layer.target_margin
    assert restored.normalize_weights is True


def test_margin_dense_config_round_trip_with_a_custom_margin():
    layer = MarginDense(
        4, target_margin=ArcMargin(0.25), scale=10.0, normalize_weights=True,
        sub_centers=2, lambda_schedule=1.5, name="custom",
    )  # fmt: skip
    config = layer.get_config()
    restored = MarginDense.from_config(json.loads(json.dumps(config)))
    assert restored.target_margin == ArcMargin(0.25)
    assert restored.get_config() == config
    assert float(restored.lambda_) == 1.5


def test_heads_state_their_formula_on_margin_dense():
    sphere, cos, arc = SphereFaceDense(3), CosFaceDense(3), ArcFaceDense(3)
    assert isinstance(sphere, LSoftmaxDense)
    assert (sphere.target_margin, sphere.scale, sphere.normalize_weights) == (
        AngularMargin(4), None, True,
    )  # fmt: skip
    assert (cos.target_margin, cos.scale, cos.normalize_weights) == (
        CosineMargin(0.35), 64.0, True,
    )  # fmt: skip
    assert (arc.target_margin, arc.scale, arc.sub_centers) == (
        ArcMargin(0.5), 64.0, 1,
    )  # fmt: skip
    # SphereFace anneals λ by default, to its authors' floor of 5; the
    # additive margins train from λ = 0.
    assert sphere.lambda_schedule == "auto" and sphere.auto_lambda_minimum == 5.0
    assert sphere.needs_lambda_annealing
    assert cos.lambda_schedule is None and float(cos.lambda_) == 0.0
    assert not (cos.needs_lambda_annealing or arc.needs_lambda_annealing)


def test_margin_dense_equals_the_named_heads():
    x = np.random.default_rng(8).standard_normal((B, D)).astype("float32")
    labels = (np.arange(B) % C).astype(np.int32)
    pairs = [
        (ArcFaceDense(C, scale=30.0), dict(target_margin=ArcMargin(0.5), scale=30.0, normalize_weights=True)),
        (LSoftmaxDense(C, margin=3, lambda_schedule=0.0), dict(target_margin=AngularMargin(3))),
    ]  # fmt: skip
    for head, kwargs in pairs:
        generic = MarginDense(C, **kwargs)
        head.build((None, D))
        generic.build((None, D))
        generic.kernel.assign(head.kernel)
        np.testing.assert_array_equal(
            _np(generic(x, labels=labels, training=True)),
            _np(head(x, labels=labels, training=True)),
        )


# ------------------------------------------------------------ workflows

FACTORIES = {
    kind: (lambda name=None, make=make: make(C, name))
    for kind, make in family_heads.HEADS.items()
}
HEAD_FORMULA = family_heads.FORMULAS
# The workflows exercise the layer's machinery, which every head shares:
# the default run takes SphereFace (unnormalised features, annealed λ) and
# sub-centre ArcFace (normalised, scaled, K rows per class); `-m slow` adds
# the others. The formulas, gradients and defaults cover every head.
WORKFLOW_KINDS = [
    kind
    if kind in ("sphereface", "arcface_k3")
    else pytest.param(kind, marks=pytest.mark.slow)
    for kind in FACTORIES
]


def _data(n=32, seed=0):
    return random_classification(n, D, C, seed)


def _sparse_ce(**kwargs):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, **kwargs)


def _sequential(kind):
    return keras_lsoftmax.Sequential(
        [
            keras.Input((D,), name="features"),
            keras.layers.Dense(H, activation="relu", name="hidden"),
            FACTORIES[kind]("head"),
        ]
    )


def _functional(kind):
    inputs = keras.Input((D,), name="features")
    hidden = keras.layers.Dense(H, activation="relu", name="hidden")(inputs)
    return keras_lsoftmax.Model(inputs, FACTORIES[kind]("head")(hidden))


BUILDERS = {"sequential": _sequential, "functional": _functional}


def _features(model, x):
    kernel, bias = (_np(v) for v in model.get_layer("hidden").weights)
    return np.maximum(x @ kernel + bias, 0.0)


def _head_logits(kind, model, x, labels=None, lam=0.0, head="head", valid=None):
    keywords = dict(HEAD_FORMULA[kind])
    if labels is None:
        keywords.pop("phi")
    return ref.head_ref(
        _features(model, x),
        _np(model.get_layer(head).kernel),
        labels,
        lam=lam,
        valid=valid,
        **keywords,
    )


# Each head in one kind of model, both kinds in all: a test that fits costs
# seconds.
@pytest.mark.parametrize(
    "kind, builder",
    [
        ("sphereface", "sequential"),
        ("cosface", "functional"),
        ("arcface", "functional"),
        ("arcface_k3", "sequential"),
    ],
)
def test_fit_evaluate_predict(kind, builder):
    keras.utils.set_random_seed(1)
    x, y = _data()
    model = BUILDERS[builder](kind)
    model.compile(keras.optimizers.Adam(0.01), _sparse_ce(), metrics=["accuracy"])
    before = _np(model.get_layer("head").kernel)
    logs = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history
    assert np.all(np.isfinite(logs["loss"]))
    assert 0.0 < logs["lsoftmax_theta"][-1] < 180.0
    assert np.max(np.abs(_np(model.get_layer("head").kernel) - before)) > 1e-3
    # Inference: plain logits (s·cos θ, ‖x‖cos θ for SphereFace), no labels.
    predicted = model.predict(x, verbose=0)
    plain = _head_logits(kind, model, x)
    np.testing.assert_allclose(predicted, plain, rtol=1e-5, atol=1e-5)
    results = model.evaluate(x, y, verbose=0, return_dict=True)
    assert results["accuracy"] == pytest.approx(np.mean(plain.argmax(1) == y))
    expected_loss = float(np.mean(_np(_sparse_ce(reduction=None)(y, plain))))
    assert results["loss"] == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind", WORKFLOW_KINDS)
def test_one_step_loss_is_the_margin_loss_of_each_output(kind):
    # Two heads on one model, labels by output name: each output's loss in
    # the step is the cross-entropy of its own margin logits.
    keras.utils.set_random_seed(2)
    x, y = _data(seed=1)
    y_aux = (y + 1) % C
    inputs = keras.Input((D,), name="features")
    hidden = keras.layers.Dense(H, activation="relu", name="hidden")(inputs)
    outputs = {
        "main": FACTORIES[kind]("main")(hidden),
        "aux": FACTORIES["cosface"]("aux")(hidden),
    }
    model = keras_lsoftmax.Model(inputs, outputs)
    model.compile(
        keras.optimizers.SGD(0.0), loss={"main": _sparse_ce(), "aux": _sparse_ce()}
    )
    logs = model.fit(
        x, {"main": y, "aux": y_aux}, batch_size=len(x), verbose=0
    ).history
    lam = float(model.get_layer("main").lambda_)  # this step's λ
    for name, labels, head_kind, head_lam in [
        ("main", y, kind, lam),
        ("aux", y_aux, "cosface", 0.0),
    ]:
        margin = _head_logits(head_kind, model, x, labels, head_lam, head=name)
        expected = float(np.mean(_np(_sparse_ce(reduction=None)(labels, margin))))
        assert logs[f"{name}_loss"][0] == pytest.approx(expected, rel=1e-5)
        plain = _head_logits(head_kind, model, x, head=name)
        assert expected > float(
            np.mean(_np(_sparse_ce(reduction=None)(labels, plain)))
        )


@pytest.mark.parametrize("kind", WORKFLOW_KINDS)
def test_ignore_class_in_the_compiled_loss(kind):
    keras.utils.set_random_seed(3)
    x, y = _data(seed=2)
    y = y.copy()
    y[::4] = -1
    valid = y != -1
    model = _functional(kind)
    loss = _sparse_ce(ignore_class=-1)
    model.compile(keras.optimizers.SGD(0.0), loss)
    logs = model.fit(x, y, batch_size=len(x), verbose=0).history
    lam = float(model.get_layer("head").lambda_)
    margin = _head_logits(kind, model, x, np.where(valid, y, 0), lam, valid=valid)
    assert logs["loss"][0] == pytest.approx(float(_np(loss(y, margin))), rel=1e-5)


@pytest.mark.parametrize("kind", WORKFLOW_KINDS)
def test_label_scope_in_a_custom_step(kind):
    # A custom loop: the step opens the scope, the head takes its labels,
    # and the gradient is that of the margin logits given labels directly.
    keras.utils.set_random_seed(4)
    head = FACTORIES[kind]("head")
    head.build((None, D))
    x, y = _data(seed=3)
    x = x.astype("float32")
    step = keras.ops.convert_to_tensor(0)

    def loss_with_scope(kernel):
        with label_scope(y, step=step) as scope:
            out, _ = head.stateless_call(
                [kernel], [head.lambda_.value], x, training=True
            )
        assert len(scope.records) == 1
        return keras.ops.mean(_sparse_ce(reduction=None)(y, out))

    kernel = _np(head.kernel)
    loss, (grad,) = gradients(loss_with_scope, kernel)
    # The λ of that step: SphereFace's "auto" schedule at step 1, else 0.
    lam = 0.0 if kind != "sphereface" else float(head.lambda_schedule(1))
    assert kind != "sphereface" or lam > 100.0
    expected_logits = ref.head_ref(x, kernel, y, lam=lam, **HEAD_FORMULA[kind])
    expected = float(np.mean(_np(_sparse_ce(reduction=None)(y, expected_logits))))
    assert float(loss) == pytest.approx(expected, rel=1e-5)

    def loss_with_labels(kernel):
        out, _ = head.stateless_call(
            [kernel], [keras.ops.convert_to_tensor(lam, "float32")], x,
            labels=y, training=True,
        )  # fmt: skip
        return keras.ops.mean(_sparse_ce(reduction=None)(y, out))

    _, (expected_grad,) = gradients(loss_with_labels, kernel)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(grad)) > 1e-4


def _trained(kind, builder="sequential", seed=5):
    keras.utils.set_random_seed(seed)
    x, y = _data(seed=4)
    model = BUILDERS[builder](kind)
    model.compile(keras.optimizers.Adam(0.01), _sparse_ce(), metrics=["accuracy"])
    model.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    return model, x, y


def _continue(model, x, y):
    logs = model.fit(x, y, batch_size=16, shuffle=False, verbose=0).history
    return [_np(v) for v in model.weights], logs


@pytest.mark.parametrize("kind", WORKFLOW_KINDS)
def test_keras_file_round_trip(kind, tmp_path):
    model, x, y = _trained(kind, "functional")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects
    head = loaded.get_layer("head")
    assert type(head) is type(model.get_layer("head"))
    assert head.get_config() == model.get_layer("head").get_config()
    assert type(head).from_config(head.get_config()).get_config() == (
        head.get_config()
    )
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    weights, logs = _continue(model, x, y)
    loaded_weights, loaded_logs = _continue(loaded, x, y)
    for a, b in zip(loaded_weights, weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(loaded_logs["loss"], logs["loss"], rtol=1e-6)
    assert loaded_logs["lsoftmax_lambda"] == logs["lsoftmax_lambda"]


@pytest.mark.tensorflow
@pytest.mark.jax
@pytest.mark.parametrize("kind", WORKFLOW_KINDS)
def test_export_serves_plain_logits(kind, tmp_path):
    import tensorflow as tf

    model, x, _ = _trained(kind)
    path = str(tmp_path / "exported")
    model.export(path, verbose=False)
    reloaded = tf.saved_model.load(path)  # kept: it owns the variables
    served = reloaded.serve(x).numpy()
    np.testing.assert_allclose(served, model.predict(x, verbose=0), atol=1e-5)
    np.testing.assert_allclose(served, _head_logits(kind, model, x), atol=1e-4)


@pytest.mark.parametrize("kind", WORKFLOW_KINDS)
def test_mixed_float16(kind):
    x, y = _data(n=48, seed=5)
    with dtype_policy("mixed_float16"):
        keras.utils.set_random_seed(6)
        model = _sequential(kind)
        model.compile(keras.optimizers.SGD(0.1), _sparse_ce())
        head = model.get_layer("head")
        before = _np(head.kernel)
        logs = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history
        assert model.get_layer("hidden").compute_dtype == "float16"
        assert head.kernel.dtype == "float32"
        features = model.get_layer("hidden")(x)
        margin = head(features, labels=y, training=True)
        predicted = model.predict(x, verbose=0)
    assert keras.mixed_precision.global_policy().name == "float32"
    assert np.all(np.isfinite(logs["loss"]))
    assert np.max(np.abs(_np(head.kernel) - before)) > 1e-4
    assert predicted.dtype == np.float32
    # The margin is computed in float32 from the float16 features.
    assert keras.backend.standardize_dtype(margin.dtype) == "float32"
    expected = ref.head_ref(
        _np(features), _np(head.kernel), y, lam=float(head.lambda_),
        **HEAD_FORMULA[kind],
    )  # fmt: skip
    np.testing.assert_allclose(
        _np(margin), expected, rtol=0, atol=1e-5 * np.max(np.abs(expected))
    )


# jit_compile=True is XLA on TensorFlow and jax.jit on JAX (the same code
# as jit_compile=False there is eager); torch.compile takes minutes on CPU.
@pytest.mark.tensorflow
@pytest.mark.jax
@pytest.mark.parametrize("kind", WORKFLOW_KINDS)
def test_jit_compile_matches_eager(kind):
    runs = []
    for mode in ({"jit_compile": True}, {"run_eagerly": True}):
        keras.utils.set_random_seed(7)
        x, y = _data(n=48, seed=6)
        model = _sequential(kind)
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), _sparse_ce(), **mode)
        logs = model.fit(x, y, batch_size=16, shuffle=False, verbose=0).history
        runs.append(([_np(w) for w in model.weights], logs))
    (compiled, compiled_logs), (eager, eager_logs) = runs
    for a, b in zip(compiled, eager):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(compiled_logs["loss"], eager_logs["loss"], rtol=1e-5)
    assert compiled_logs["lsoftmax_lambda"] == eager_logs["lsoftmax_lambda"]


@pytest.mark.tensorflow
def test_mirrored_strategy_matches_one_device_for_every_head(tmp_path):
    out = tmp_path / "heads.json"
    # The two code paths: ψ on unit weights; scale, normalisation and
    # sub-centres (CosFace and ArcFace differ only in φ).
    kinds = ["sphereface", "arcface_k3"]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "distribute_worker.py"),
         str(out), *kinds],
        env=worker_env(), capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        result = json.load(f)
    assert sorted(result) == sorted(kinds)
    for kind, runs in result.items():
        one, two = runs["single"], runs["mirrored"]
        assert (one["replicas"], two["replicas"]) == (1, 2)
        diff = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(one["weights"], two["weights"])
        )
        assert diff <= 1e-5, kind
        assert one["max_update"] > 1e-3, kind
        np.testing.assert_allclose(
            two["batch_losses"], one["batch_losses"], rtol=1e-5, atol=1e-6
        )
        expected = two["expected_lambda"]
        assert two["lambda_per_replica"] == [expected, expected]


# The two code paths by default, as for MirroredStrategy; `-m slow` adds
# the other heads.
@pytest.mark.jax
@pytest.mark.parametrize(
    "kinds",
    [
        ["sphereface", "arcface_k3"],
        pytest.param(["cosface", "arcface"], marks=pytest.mark.slow),
    ],
    ids="-".join,
)
def test_jax_data_parallel_matches_one_device_for_every_head(kinds):
    result = subprocess.run(
        [sys.executable, "-m", "tests.data_parallel_worker", *kinds],
        capture_output=True, text=True, timeout=200, cwd=ROOT,
        env=worker_env(
            KERAS_BACKEND="jax",
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
        ),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reports = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(reports) == sorted(kinds)
    for kind, report in reports.items():
        assert report["devices"] == 2
        assert report["max_weight_diff"] <= 1e-5, kind
        for name, value in report["single"].items():
            assert report["data_parallel"][name] == pytest.approx(
                value, rel=1e-6, abs=1e-5
            )


# ------------------------------------------------------ defaults that train

DEFAULT_HEADS = {
    "sphereface": lambda: SphereFaceDense(BLOB_CLASSES),
    "cosface": lambda: CosFaceDense(BLOB_CLASSES),
    "arcface": lambda: ArcFaceDense(BLOB_CLASSES),
}


@pytest.mark.parametrize("kind", list(DEFAULT_HEADS))
def test_default_arguments_train(kind):
    # The Gaussian blobs of test_models (10 classes, chance 0.1), fewer
    # samples and epochs: with the defaults (s = 64, m = 0.35 / 0.5 rad,
    # SphereFace's annealed λ) 0.95 to 0.99 on TensorFlow; runs are not
    # bit-reproducible on every backend, hence the lower bar.
    x, y = _blobs(1500, seed=0)
    x_test, y_test, x, y = x[:500], y[:500], x[500:], y[500:]
    keras.utils.set_random_seed(0)
    model = keras_lsoftmax.Sequential(
        [
            keras.Input((x.shape[1],)),
            keras.layers.Dense(32),
            keras.layers.BatchNormalization(),
            keras.layers.PReLU(),
            DEFAULT_HEADS[kind](),
        ]
    )
    model.compile("adam", _sparse_ce(), metrics=["accuracy"])
    model.fit(x, y, epochs=3, batch_size=32, verbose=0)
    accuracy = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    assert accuracy["accuracy"] > 0.8
