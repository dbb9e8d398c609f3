"""Precision and compilation: mixed precision policies and XLA.

Mixed precision (`mixed_float16`, `mixed_bfloat16`): the margin is computed
in float32 from the half-precision features, the loss is scaled under
`mixed_float16`, and a 200-step MNIST run that anneals λ to ~0 at m = 4 stays
finite and reaches the accuracy of the same run in float32.

Compilation: the op and the layer under TensorFlow's XLA, and `fit` with
`jit_compile=True` (XLA on TensorFlow, `jax.jit` on JAX, `torch.compile` on
PyTorch), give the results of the uncompiled code.

Every test that changes the global dtype policy restores "float32".
"""

import contextlib
import os

import keras
import numpy as np
import pytest

import keras_lsoftmax
from keras_lsoftmax import LSoftmaxDense
from keras_lsoftmax import ops
from keras_lsoftmax import schedules
from tests import numpy_reference as ref
from tests.backend_utils import gradients
from tests.datasets import MNIST_PATH as MNIST
from tests.datasets import random_classification

BACKEND = keras.backend.backend()
POLICIES = ["mixed_float16", "mixed_bfloat16"]
HALF = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}
D, H, C = 20, 16, 5  # features, hidden units, classes
MARGIN = 4


@contextlib.contextmanager
def dtype_policy(name):
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(autouse=True)
def _policy_is_restored():
    yield
    assert keras.mixed_precision.global_policy().name == "float32"


def _data(n=32, seed=0):
    return random_classification(n, D, C, seed)


def _initial_weights(seed=1):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(scale=0.4, size=(D, H)).astype("float32"),
        rng.normal(scale=0.1, size=(H,)).astype("float32"),
        rng.normal(scale=0.4, size=(C, H)).astype("float32"),
    )


def _model(initial_lambda=0.0):
    model = keras_lsoftmax.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(H, activation="relu", name="hidden"),
            LSoftmaxDense(
                C, margin=MARGIN, initial_lambda=initial_lambda, name="head"
            ),
        ]
    )
    w1, b1, kernel = _initial_weights()
    model.get_layer("hidden").set_weights([w1, b1])
    model.get_layer("head").kernel.assign(kernel)
    return model


def _max_rel(got, expected):
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


# ------------------------------------------------------- mixed precision


def _margin_logits_and_kernel_gradient(model, x, y, standalone):
    """Margin logits of the model's head and the kernel gradient of their sum.

    Returns the dtype of the features the head gets, those features as
    float32 (which holds half-precision values exactly), the logits and the
    gradient, as NumPy arrays.
    """
    hidden, head = model.get_layer("hidden"), model.get_layer("head")
    features = hidden(x)
    half = keras.backend.standardize_dtype(features.dtype)
    features = keras.ops.convert_to_numpy(keras.ops.cast(features, "float32"))

    # Stateless calls, so the backend's autodiff sees the kernel as an input.
    def head_logits(kernel):
        if standalone:  # the layer called on its own, on half features
            logits, _ = head.stateless_call(
                [kernel],
                [head.lambda_.value],
                keras.ops.cast(features, half),
                labels=y,
                training=True,
            )
        else:  # inside the model, as in `fit`
            trainable = [
                kernel if v is head.kernel else v.value
                for v in model.trainable_variables
            ]
            non_trainable = [v.value for v in model.non_trainable_variables]
            with keras_lsoftmax.label_scope(y):
                logits, _ = model.stateless_call(
                    trainable, non_trainable, x, training=True
                )
        return logits

    kernel = keras.ops.convert_to_numpy(head.kernel)
    logits, (grad_kernel,) = gradients(head_logits, kernel)
    return half, features, logits, grad_kernel


def _check_float32_margin(policy, standalone):
    x, y = _data()
    with dtype_policy(policy):
        model = _model(initial_lambda=0.0)  # λ = 0: the full margin
        hidden, head = model.get_layer("hidden"), model.get_layer("head")
        assert hidden.compute_dtype == HALF[policy]
        assert head.kernel.dtype == "float32"
        half, rounded, logits, grad_kernel = (
            _margin_logits_and_kernel_gradient(model, x, y, standalone)
        )
        assert model.predict(x, verbose=0).dtype == np.float32
    assert half == HALF[policy]
    assert logits.dtype == np.float32
    # The kernel gets a float32 gradient.
    assert grad_kernel.dtype == np.float32
    assert np.all(np.isfinite(grad_kernel))
    # The paper's formula in float64 on the same half-rounded features and
    # the float32 kernel: equal up to float32 rounding. (Computing the margin
    # or reading the kernel in float16 is off by ~1e-3, bfloat16 by ~1e-2.)
    kernel = keras.ops.convert_to_numpy(head.kernel)
    expected = ref.lsoftmax_ref(rounded, kernel, y, MARGIN, 0.0)
    error = _max_rel(logits, expected)
    print(f"\n{policy}: relative error of the margin logits {error:.3g}")
    assert error <= 1e-5
    # The margin changed the target logits (the check is not vacuous).
    assert _max_rel(expected, rounded.astype(np.float64) @ kernel.T) > 0.1


@pytest.mark.parametrize("policy", POLICIES)
def test_margin_is_computed_in_float32_in_the_model(policy):
    _check_float32_margin(policy, standalone=False)


@pytest.mark.parametrize("policy", POLICIES)
def test_margin_is_computed_in_float32_standalone(policy):
    _check_float32_margin(policy, standalone=True)


@pytest.mark.parametrize("policy", POLICIES)
def test_symbolic_output_dtype_is_float32(policy):
    with dtype_policy(policy):
        model = _model()
    assert model.outputs[0].dtype == "float32"


@pytest.mark.parametrize("policy", POLICIES)
def test_one_step_matches_float32_and_mixed_float16_scales_the_loss(policy):
    x, y = _data(n=64, seed=2)

    def one_step(policy_name):
        with dtype_policy(policy_name):
            model = _model(initial_lambda=0.5)
            model.compile(
                keras.optimizers.SGD(0.1),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
            before = [w.numpy() for w in model.trainable_weights]
            model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
            after = [w.numpy() for w in model.trainable_weights]
        return model, [a - b for a, b in zip(after, before)]

    _, reference = one_step("float32")
    model, deltas = one_step(policy)
    if policy == "mixed_float16":
        optimizer = model.optimizer
        assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        # The step was taken (not skipped as an overflow) at full scale.
        assert float(optimizer.dynamic_scale.numpy()) == 2.0**15
    else:  # bfloat16 has float32's range: no loss scaling.
        assert not isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert int(model.optimizer.iterations.numpy()) == 1
    # Unscaled gradients would make the step 2^15 times too small, and a
    # double scaling 2^15 times too large; half-precision rounding of the
    # features moves it by well under 5 %.
    tolerance = {"mixed_float16": 5e-3, "mixed_bfloat16": 5e-2}[policy]
    errors = [_max_rel(d, e) for d, e in zip(deltas, reference)]
    print(f"\n{policy}: relative error of the first step {errors}")
    assert max(errors) <= tolerance


# 200 steps of batch 64 (one pass over 12,800 training images), λ from ~1000
# at step 1 to 0.0077 at step 200, m = 4; accuracy on the 10,000 test images.
MNIST_STEPS, MNIST_BATCH = 200, 64
ANNEAL = schedules.InverseDecay(base=1000.0, gamma=0.002, power=35.0)


class _BatchLosses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


@pytest.fixture(scope="module")
def mnist():
    if not os.path.exists(MNIST):
        pytest.skip(f"{MNIST} not found")
    with np.load(MNIST) as data:
        n = MNIST_STEPS * MNIST_BATCH
        x = data["x_train"][:n].reshape(n, -1).astype("float32") / 255.0
        y = data["y_train"][:n].astype("int32")
        x_test = data["x_test"].reshape(-1, 28 * 28).astype("float32") / 255.0
        y_test = data["y_test"].astype("int32")
    return x, y, x_test, y_test


def _train_mnist(data, policy):
    x, y, x_test, y_test = data
    with dtype_policy(policy):
        keras.utils.set_random_seed(0)
        model = keras_lsoftmax.Sequential(
            [
                keras.Input((28 * 28,)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(16),  # signed features: angles up to π
                LSoftmaxDense(10, margin=4, name="head"),
            ]
        )
        # Adam with a cosine learning-rate decay: the end of the run, where
        # λ ≈ 0 and the margin gradients are largest, takes small steps, so
        # the final accuracy does not hinge on the last few updates.
        learning_rate = keras.optimizers.schedules.CosineDecay(3e-3, MNIST_STEPS)
        model.compile(
            keras.optimizers.Adam(learning_rate),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        losses = _BatchLosses()
        model.fit(
            x,
            y,
            batch_size=MNIST_BATCH,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[keras_lsoftmax.LambdaScheduler(ANNEAL), losses],
        )
        logits = model.predict(x_test, batch_size=1000, verbose=0)
    return {
        "model": model,
        "losses": np.array(losses.losses),
        "accuracy": float(np.mean(np.argmax(logits, axis=1) == y_test)),
        "logits_dtype": logits.dtype,
        "lambda": float(model.get_layer("head").lambda_.numpy()),
    }


@pytest.fixture(scope="module")
def float32_mnist_run(mnist):
    return _train_mnist(mnist, "float32")


@pytest.mark.parametrize("policy", POLICIES)
def test_annealed_mnist_run_is_finite_and_as_accurate(
    policy, mnist, float32_mnist_run
):
    run = _train_mnist(mnist, policy)
    base = float32_mnist_run
    print(
        f"\n{policy}: test accuracy {run['accuracy']:.4f} "
        f"(float32 {base['accuracy']:.4f}), last running loss "
        f"{run['losses'][-1]:.4f} (float32 {base['losses'][-1]:.4f}), "
        f"λ {run['lambda']:.3g}"
    )
    model = run["model"]
    assert int(model.optimizer.iterations.numpy()) == MNIST_STEPS
    assert run["lambda"] == float(ANNEAL(MNIST_STEPS)) < 0.01
    assert len(run["losses"]) == MNIST_STEPS
    assert np.all(np.isfinite(run["losses"]))
    for weight in model.weights:
        assert np.all(np.isfinite(weight.numpy()))
    assert run["logits_dtype"] == np.float32
    # Trained, not collapsed: well above chance, like float32 ...
    assert base["accuracy"] > 0.8
    # ... and within 1 point of it.
    assert abs(run["accuracy"] - base["accuracy"]) <= 0.01


# ------------------------------------------------------------ compilation


def _op_step(x, w, labels, lam, upstream, margin):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch([x, w])
        out = ops.lsoftmax_logits(x, w, labels, margin, lam)
        loss = tf.reduce_sum(out * upstream)
    dx, dw = tape.gradient(loss, [x, w])
    return out, dx, dw


@pytest.mark.tensorflow  # tf.function(jit_compile=True) and its HLO
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("margin", [2, 4])
def test_op_forward_and_gradient_under_xla(margin, dtype, tol):
    import tensorflow as tf

    rng = np.random.default_rng(margin)
    x = tf.constant(rng.normal(size=(32, 12)).astype(dtype))
    w = tf.constant(rng.normal(size=(6, 12)).astype(dtype))
    labels = tf.constant(rng.integers(0, 6, size=32), tf.int32)
    upstream = tf.constant(rng.normal(size=(32, 6)).astype(dtype))
    lam = tf.Variable(0.25, dtype=dtype)

    compiled = tf.function(_op_step, jit_compile=True)
    # It really compiles with XLA: the HLO of the whole step exists.
    hlo = compiled.experimental_get_compiler_ir(
        x, w, labels, lam, upstream, margin
    )(stage="hlo")
    assert "ENTRY" in hlo
    for value in (0.25, 0.0):  # λ is read at run time under XLA too
        lam.assign(value)
        eager = _op_step(x, w, labels, lam, upstream, margin)
        xla = compiled(x, w, labels, lam, upstream, margin)
        for got, expected in zip(xla, eager):
            np.testing.assert_allclose(
                got, expected, rtol=tol, atol=tol * np.max(np.abs(expected))
            )


@pytest.mark.tensorflow  # tf.function(jit_compile=True)
def test_layer_forward_and_gradient_under_xla():
    import tensorflow as tf

    x, y = _data(n=24, seed=4)
    layer = LSoftmaxDense(
        C,
        margin=MARGIN,
        initial_lambda=0.25,
        kernel_initializer=keras.initializers.GlorotUniform(seed=4),
    )
    layer.build((None, D))
    upstream = tf.constant(np.random.default_rng(5).normal(size=(24, C)), tf.float32)

    def step(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            margin_logits = layer(x, labels=y, training=True)
            loss = tf.reduce_sum(margin_logits * upstream)
        dx, dkernel = tape.gradient(loss, [x, layer.kernel.value])
        # Labels through a label_scope, as in train_step; and inference.
        with keras_lsoftmax.label_scope(y):
            scoped = layer(x, training=True)
        plain = layer(x)
        return margin_logits, dx, dkernel, scoped, plain

    x, y = tf.constant(x), tf.constant(y)
    eager = step(x, y)
    xla = tf.function(step, jit_compile=True)(x, y)
    for got, expected in zip(xla, eager):
        np.testing.assert_allclose(
            got, expected, rtol=1e-5, atol=1e-5 * np.max(np.abs(expected))
        )
    margin_logits, _, _, scoped, plain = eager
    np.testing.assert_array_equal(scoped, margin_logits)
    assert _max_rel(margin_logits, plain) > 0.01  # the margin is applied


def _fit_few_steps(jit_compile, policy="float32"):
    x, y = _data(n=96, seed=6)
    with dtype_policy(policy):
        model = _model()
        model.compile(
            keras.optimizers.SGD(0.05, momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=jit_compile,
        )
        history = model.fit(
            x,
            y,
            batch_size=16,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[
                # λ changes at every step: a value frozen at trace time shows.
                keras_lsoftmax.LambdaScheduler(schedules.InverseDecay(10.0, 0.5, 1.0))
            ],
        )
    assert model.jit_compile is jit_compile
    return [w.numpy() for w in model.weights], history.history


# On PyTorch, jit_compile=True is torch.compile, whose compilation takes over
# a minute on CPU: there the test runs only with `-m slow`.
@pytest.mark.parametrize(
    "policy",
    [
        pytest.param(
            name, marks=[pytest.mark.slow] if BACKEND == "torch" else []
        )
        for name in ("float32", "mixed_float16")
    ],
)
def test_fit_with_jit_compile_matches_without(policy):
    # Compiled float16 code (XLA, inductor) fuses ops and skips the float16
    # rounding between them that op-by-op execution does, and CPUs with
    # native float16 arithmetic (AVX512-FP16, AMX) round differently again:
    # |Δweights| up to ~1e-4, a few float16 ulps of the weights.
    tol = 5e-4 if policy == "mixed_float16" else 1e-5
    weights, logs = _fit_few_steps(jit_compile=False, policy=policy)
    xla_weights, xla_logs = _fit_few_steps(jit_compile=True, policy=policy)
    initial = _initial_weights()
    diff = max(np.max(np.abs(a - b)) for a, b in zip(xla_weights, weights))
    print(f"\n{policy}: max |Δweights| jit_compile=True vs False {diff:.3g}")
    for got, expected in zip(xla_weights, weights):
        np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)
    # Losses of order 1: the atol is only a floor.
    np.testing.assert_allclose(xla_logs["loss"], logs["loss"], rtol=tol, atol=1e-6)
    assert xla_logs["lsoftmax_lambda"] == logs["lsoftmax_lambda"]
    assert logs["lsoftmax_lambda"] == [float(schedules.InverseDecay(10.0, 0.5, 1.0)(6))]
    # Six steps moved the weights far more than the tolerance.
    moved = np.max(np.abs(weights[0] - initial[0]))
    assert moved > 100 * tol
