"""Tests for `keras_lsoftmax.Sequential` and `keras_lsoftmax.Model`.

The central check: one `fit` step (the whole data as one batch, plain SGD)
moves the weights exactly as a hand-written step on the loss of
`ops.lsoftmax_logits` does, and measurably unlike a plain softmax step.
The hand-written steps use `keras.ops` and `tests.backend_utils.gradients`,
so every test runs under each Keras backend unless it is marked.
"""

import os

import keras
import numpy as np
import pytest

import keras_lsoftmax
from keras_lsoftmax import LSoftmaxDense
from keras_lsoftmax import ops
from tests.backend_utils import BACKEND
from tests.backend_utils import gradients
from tests.datasets import MNIST_PATH as MNIST
from tests.datasets import random_classification

D, H, C = 20, 16, 5  # features, hidden units, classes
MARGIN = 4


def _data(n=32, seed=0):
    return random_classification(n, D, C, seed)


def _layers(lam):
    return [
        keras.layers.Dense(H, activation="relu", name="hidden"),
        LSoftmaxDense(C, margin=MARGIN, initial_lambda=lam, name="head"),
    ]


def _sequential(lam=0.0):
    return keras_lsoftmax.Sequential(
        [keras.Input((D,), name="features"), *_layers(lam)]
    )


def _functional(lam=0.0):
    inputs = keras.Input((D,), name="features")
    hidden, head = _layers(lam)
    return keras_lsoftmax.Model(inputs, head(hidden(inputs)))


class SubclassedNet(keras_lsoftmax.Model):
    def __init__(self, lam=0.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden, self.head = _layers(lam)

    def call(self, inputs, training=None):
        return self.head(self.hidden(inputs), training=training)


def _subclassed(lam=0.0):
    model = SubclassedNet(lam)
    model(np.zeros((1, D), "float32"))  # build
    return model


def _nested(lam=0.0):
    # A plain keras.Sequential (backbone + head) as one layer of the model.
    inner = keras.Sequential([keras.Input((D,)), *_layers(lam)], name="inner")
    return keras_lsoftmax.Sequential([keras.Input((D,), name="features"), inner])


BUILDERS = {
    "sequential": _sequential,
    "functional": _functional,
    "subclassed": _subclassed,
    "nested": _nested,
}


def _head(model):
    for layer in model.layers:
        if isinstance(layer, LSoftmaxDense):
            return layer
        if isinstance(layer, keras.Model):
            return _head(layer)
    raise AssertionError("no LSoftmaxDense in the model")


def _sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _numpy(tensor):
    return keras.ops.convert_to_numpy(tensor)


def _weights(model):
    weights = [_numpy(v) for v in model.trainable_variables]
    assert [w.shape for w in weights] == [(D, H), (H,), (C, H)]
    return weights


def _features(weights, x):
    w1, b1 = weights[:2]
    return np.maximum(x @ w1 + b1, 0.0)


def _hand_step(weights, x, y, lr, margin, lam, sample_weight=None):
    """One SGD step on the mean (sample-weighted) cross-entropy of the
    L-Softmax logits; returns the new weights and the loss before it."""

    def loss_fn(w1, b1, kernel):
        features = keras.ops.relu(keras.ops.matmul(x, w1) + b1)
        logits = ops.lsoftmax_logits(features, kernel, y, margin, lam)
        per_sample = keras.ops.sparse_categorical_crossentropy(
            y, logits, from_logits=True
        )
        if sample_weight is not None:
            per_sample = keras.ops.multiply(per_sample, sample_weight)
        # Keras' "sum_over_batch_size": divide by the batch size.
        return keras.ops.sum(per_sample) / len(y)

    loss, grads = gradients(loss_fn, *weights)
    return [w - lr * g for w, g in zip(weights, grads)], float(loss)


def _assert_weights_close(actual, expected, atol):
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=0, atol=atol)


def _max_diff(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))


# With gradient accumulation, two half batches make the one step: their
# mean gradient is the full batch's, and both see the same weights.
@pytest.mark.parametrize("accumulation", [None, 2])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_one_fit_step_is_the_margin_step(kind, accumulation):
    keras.utils.set_random_seed(11)
    x, y = _data()
    lr, lam = 0.5, 1.0
    model = BUILDERS[kind](lam)
    before = _weights(model)
    model.compile(
        optimizer=keras.optimizers.SGD(
            lr, gradient_accumulation_steps=accumulation
        ),
        loss=_sparse_ce(),
    )
    batch_size = len(x) // (accumulation or 1)
    history = model.fit(
        x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0
    )
    after = _weights(model)
    assert int(_numpy(model.optimizer.iterations)) == 1

    expected, loss = _hand_step(before, x, y, lr, MARGIN, lam)
    plain, plain_loss = _hand_step(before, x, y, lr, 1, lam)
    _assert_weights_close(after, expected, atol=1e-6)
    assert history.history["loss"][0] == pytest.approx(loss, rel=1e-6, abs=1e-6)
    # The check can fail: a plain softmax step lands elsewhere.
    assert _max_diff(after, plain) > 1e-3
    assert loss > plain_loss + 0.1


def _train_in_mode(**compile_kwargs):
    x, y = _data(n=48, seed=1)
    keras.utils.set_random_seed(7)
    model = _sequential(lam=0.5)
    initial = _weights(model)
    model.compile(
        optimizer=keras.optimizers.SGD(0.2, momentum=0.9),
        loss=_sparse_ce(),
        metrics=["accuracy"],
        **compile_kwargs,
    )
    history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return initial, _weights(model), history.history


@pytest.fixture(scope="module")
def eager_run():
    return _train_in_mode(run_eagerly=True)


# jit_compile=False is tf.function on TensorFlow, plain Python on JAX and
# PyTorch; jit_compile=True is XLA on TensorFlow, jax.jit (the default) on
# JAX and torch.compile on PyTorch.
@pytest.mark.parametrize(
    "mode",
    [
        # On JAX and PyTorch this is the eager reference itself.
        pytest.param(
            {"jit_compile": False},
            id="jit_compile=False",
            marks=pytest.mark.tensorflow,
        ),
        pytest.param(
            {"jit_compile": True},
            id="jit_compile=True",
            # On CPU torch.compile takes about a minute to compile the step
            # (with graph breaks at backward(), as in Keras' own step).
            marks=pytest.mark.slow if BACKEND == "torch" else (),
        ),
        pytest.param(
            {"steps_per_execution": 3},
            id="steps_per_execution=3",
            marks=pytest.mark.skipif(
                BACKEND == "torch",
                reason="Keras on PyTorch accepts steps_per_execution=1 only",
            ),
        ),
    ],
)
def test_execution_modes_agree(mode, eager_run):
    initial, reference, reference_logs = eager_run
    same_initial, weights, logs = _train_in_mode(**mode)
    _assert_weights_close(same_initial, initial, atol=0)
    _assert_weights_close(weights, reference, atol=1e-5)
    np.testing.assert_allclose(
        logs["loss"], reference_logs["loss"], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        logs["lsoftmax_theta"], reference_logs["lsoftmax_theta"], rtol=1e-5, atol=1e-5
    )
    assert logs["accuracy"] == reference_logs["accuracy"]
    # Six steps of SGD with momentum moved the weights.
    assert _max_diff(weights, initial) > 1e-2


def _one_hot(y):
    return np.eye(C, dtype="float32")[y]


@pytest.mark.parametrize(
    "labels, loss",
    [
        (lambda y: y, _sparse_ce),
        (lambda y: y[:, None], _sparse_ce),
        # JAX (without x64) gets int64 arrays as int32, as in "sparse".
        pytest.param(
            lambda y: y.astype("int64"),
            _sparse_ce,
            marks=[pytest.mark.tensorflow, pytest.mark.torch],
        ),
        (
            _one_hot,
            lambda: keras.losses.CategoricalCrossentropy(from_logits=True),
        ),
    ],
    ids=["sparse", "column", "int64", "one_hot"],
)
def test_label_formats_give_the_sparse_step(labels, loss):
    keras.utils.set_random_seed(12)
    x, y = _data(seed=2)
    model = _sequential()
    before = _weights(model)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss())
    model.fit(x, labels(y), batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    expected, _ = _hand_step(before, x, y, 0.5, MARGIN, 0.0)
    _assert_weights_close(_weights(model), expected, atol=1e-6)


def test_sample_weight_step():
    keras.utils.set_random_seed(13)
    x, y = _data(seed=3)
    sample_weight = np.random.default_rng(3).uniform(0, 2, len(y))
    sample_weight = sample_weight.astype("float32")
    model = _sequential()
    before = _weights(model)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=_sparse_ce())
    history = model.fit(
        x,
        y,
        sample_weight=sample_weight,
        batch_size=len(x),
        shuffle=False,
        verbose=0,
    )
    expected, loss = _hand_step(
        before, x, y, 0.5, MARGIN, 0.0, sample_weight=sample_weight
    )
    unweighted, _ = _hand_step(before, x, y, 0.5, MARGIN, 0.0)
    _assert_weights_close(_weights(model), expected, atol=1e-6)
    assert history.history["loss"][0] == pytest.approx(loss, rel=1e-6, abs=1e-6)
    assert _max_diff(_weights(model), unweighted) > 1e-3


def test_class_weight_step():
    keras.utils.set_random_seed(14)
    x, y = _data(seed=4)
    class_weight = {0: 2.0, 1: 0.5, 2: 1.0, 3: 0.0, 4: 3.0}
    model = _functional()
    before = _weights(model)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=_sparse_ce())
    history = model.fit(
        x,
        y,
        class_weight=class_weight,
        batch_size=len(x),
        shuffle=False,
        verbose=0,
    )
    sample_weight = np.array([class_weight[c] for c in y], "float32")
    expected, loss = _hand_step(
        before, x, y, 0.5, MARGIN, 0.0, sample_weight=sample_weight
    )
    _assert_weights_close(_weights(model), expected, atol=1e-6)
    assert history.history["loss"][0] == pytest.approx(loss, rel=1e-6, abs=1e-6)


def test_subclassing_works_after_functional_use():
    # Keras turns a Model subclass used functionally into a Functional
    # subclass; that must not break later subclasses with their own `call`.
    keras.utils.set_random_seed(18)
    _functional()
    model = _subclassed()
    assert isinstance(model, keras_lsoftmax.Model)
    x, y = _data(n=8)
    model.compile(keras.optimizers.SGD(0.1), _sparse_ce())
    model.fit(x, y, verbose=0)
    assert isinstance(_functional(), keras_lsoftmax.Model)


def _cross_entropy(logits, y):
    return _numpy(
        keras.ops.sparse_categorical_crossentropy(y, logits, from_logits=True)
    )


def _mean_theta_degrees(features, kernel, y):
    w_y = kernel[y]
    cos = np.sum(features * w_y, axis=1) / (
        np.linalg.norm(features, axis=1) * np.linalg.norm(w_y, axis=1)
    )
    return float(np.mean(np.degrees(np.arccos(np.clip(cos, -1, 1)))))


@pytest.fixture(scope="module")
def mnist():
    if not os.path.exists(MNIST):
        pytest.skip(f"{MNIST} is not available")
    with np.load(MNIST) as data:
        x = data["x_train"][:1000].reshape(-1, 784).astype("float32") / 255
        y = data["y_train"][:1000].astype("int32")
    return x, y


def test_fit_reports_plain_logit_metrics_and_margin_loss(mnist):
    x, y = mnist
    keras.utils.set_random_seed(0)
    model = keras_lsoftmax.Sequential(
        [
            keras.Input((784,), name="features"),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            LSoftmaxDense(10, margin=4, name="head"),
        ]
    )
    # A short, almost plain warm-up (λ = 1000): accuracy well above chance.
    model.layers[-1].set_lambda(1000.0)
    model.compile(keras.optimizers.SGD(0.5), _sparse_ce())
    model.fit(x, y, batch_size=50, epochs=1, verbose=0)
    model.layers[-1].set_lambda(0.0)

    # lr = 0: the weights the fit metrics see are the weights evaluate sees.
    model.compile(
        keras.optimizers.SGD(learning_rate=0.0),
        _sparse_ce(),
        metrics=["accuracy"],
    )
    logs = model.fit(x, y, batch_size=100, shuffle=False, verbose=0).history
    results = model.evaluate(x, y, batch_size=100, verbose=0, return_dict=True)

    hidden, head = model.layers
    features = _numpy(hidden(x))
    kernel = _numpy(head.kernel)
    plain = features @ kernel.T
    margin = _numpy(ops.lsoftmax_logits(features, kernel, y, 4, 0.0))
    plain_accuracy = np.mean(np.argmax(plain, axis=1) == y)
    margin_accuracy = np.mean(np.argmax(margin, axis=1) == y)
    assert plain_accuracy > 0.5
    assert plain_accuracy - margin_accuracy > 0.05  # the data tells them apart

    assert logs["accuracy"][0] == results["accuracy"]
    assert logs["accuracy"][0] == pytest.approx(plain_accuracy, abs=1e-6)
    assert logs["loss"][0] == pytest.approx(
        _cross_entropy(margin, y).mean(), rel=1e-5, abs=1e-6
    )
    assert results["loss"] == pytest.approx(
        _cross_entropy(plain, y).mean(), rel=1e-5, abs=1e-6
    )
    assert logs["loss"][0] > results["loss"] + 0.1


# The steps are the same code for every kind of model; JAX and PyTorch run
# the two kinds whose heads the step finds least directly.
@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("sequential", marks=pytest.mark.tensorflow),
        pytest.param("functional", marks=pytest.mark.tensorflow),
        "subclassed",
        "nested",
    ],
)
def test_logs_and_metrics_with_a_frozen_model(kind):
    keras.utils.set_random_seed(15)
    # lr = 0: fit's logs can be recomputed by hand from the final weights.
    x, y = _data(n=40, seed=5)
    model = BUILDERS[kind]()
    _head(model).set_lambda(3.5)
    model.compile(keras.optimizers.SGD(0.0), _sparse_ce(), metrics=["accuracy"])
    logs = model.fit(x, y, batch_size=16, verbose=0).history
    results = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)

    weights = _weights(model)
    features = _features(weights, x)
    theta = _mean_theta_degrees(features, weights[2], y)
    assert 0.0 < theta < 180.0
    assert logs["lsoftmax_lambda"] == [3.5]
    assert logs["lsoftmax_theta"][0] == pytest.approx(theta, rel=1e-5, abs=1e-5)
    assert results["lsoftmax_theta"] == pytest.approx(theta, rel=1e-5, abs=1e-5)

    # Accuracy on the plain logits, in fit as in evaluate.
    plain = features @ weights[2].T
    margin = _numpy(ops.lsoftmax_logits(features, weights[2], y, MARGIN, 3.5))
    plain_accuracy = np.mean(np.argmax(plain, axis=1) == y)
    assert np.mean(np.argmax(margin, axis=1) == y) != plain_accuracy
    assert logs["accuracy"][0] == results["accuracy"]
    assert results["accuracy"] == pytest.approx(plain_accuracy, abs=1e-6)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_predict_returns_plain_logits(kind):
    keras.utils.set_random_seed(16)
    x, _ = _data(n=24, seed=6)
    model = BUILDERS[kind]()
    weights = _weights(model)
    logits = model.predict(x, batch_size=8, verbose=0)
    assert logits.shape == (24, C)
    np.testing.assert_allclose(
        logits, _features(weights, x) @ weights[2].T, rtol=1e-5, atol=1e-6
    )


def test_head_in_a_plain_keras_model_points_to_keras_lsoftmax():
    keras.utils.set_random_seed(19)
    x, y = _data()
    model = keras.Sequential([keras.Input((D,)), *_layers(0.0)])
    model.compile("sgd", _sparse_ce())
    with pytest.raises(ValueError, match=r"keras_lsoftmax\.Sequential"):
        model.fit(x, y, verbose=0)


# With metrics, JAX and PyTorch first meet the missing labels when Keras
# builds the compiled metrics, before the loss.
@pytest.mark.parametrize("metrics", [None, ["accuracy"]], ids=["loss", "metrics"])
def test_fit_and_evaluate_without_labels_raise(metrics):
    keras.utils.set_random_seed(20)
    x, _ = _data()
    model = _sequential()
    model.compile("sgd", _sparse_ce(), metrics=metrics)
    with pytest.raises(ValueError, match=r"need the labels `y`"):
        model.fit(x, verbose=0)
    with pytest.raises(ValueError, match=r"need the labels `y`"):
        model.evaluate(x, verbose=0)


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_float16(mixed_float16):
    keras.utils.set_random_seed(17)
    x, y = _data(n=48, seed=8)
    model = _sequential()
    hidden, head = model.layers
    assert hidden.compute_dtype == "float16"
    model.compile(keras.optimizers.SGD(0.1), _sparse_ce(), metrics=["accuracy"])
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    before = _numpy(head.kernel)
    logs = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history
    assert np.all(np.isfinite(logs["loss"]))
    assert np.all(np.isfinite(logs["lsoftmax_theta"]))
    assert int(_numpy(model.optimizer.iterations)) == 6
    assert head.kernel.dtype == "float32"
    assert np.max(np.abs(_numpy(head.kernel) - before)) > 1e-4
    assert keras.backend.standardize_dtype(model(x).dtype) == "float32"
    assert model.predict(x, verbose=0).dtype == np.float32


def test_model_without_head_logs_no_theta():
    keras.utils.set_random_seed(21)
    x, y = _data()
    model = keras_lsoftmax.Sequential(
        [keras.Input((D,)), keras.layers.Dense(C, use_bias=False)]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=_sparse_ce())
    history = model.fit(x, y, batch_size=len(x), verbose=0)
    assert "lsoftmax_theta" not in history.history
    assert "lsoftmax_lambda" not in history.history
    assert "lsoftmax_theta" not in model.evaluate(x, y, return_dict=True, verbose=0)


def test_layer_after_head_warns_and_uses_model_output():
    keras.utils.set_random_seed(22)
    x, y = _data()
    model = keras_lsoftmax.Sequential(
        [keras.Input((D,)), *_layers(0.0), keras.layers.Activation("softmax")]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    with pytest.warns(UserWarning, match="not a model output"):
        model.fit(x, y, batch_size=len(x), verbose=0)


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_unbuilt_subclassed_model_trains(run_eagerly):
    x, y = _data(seed=9)
    keras.utils.set_random_seed(4)
    model = SubclassedNet(1.0)  # never called before fit
    model.compile(
        keras.optimizers.SGD(0.5), _sparse_ce(), run_eagerly=run_eagerly
    )
    model.fit(x, y, batch_size=len(x), shuffle=False, verbose=0)
    keras.utils.set_random_seed(4)
    reference = _subclassed(1.0)  # the same initial weights, built by a call
    expected, _ = _hand_step(_weights(reference), x, y, 0.5, MARGIN, 1.0)
    _assert_weights_close(_weights(model), expected, atol=1e-6)


def _plain_twin(model):
    """A keras.Sequential computing the same plain logits as `model`."""
    twin = keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(H, activation="relu"),
            keras.layers.Dense(C, use_bias=False),
        ]
    )
    w1, b1, kernel = _weights(model)
    twin.set_weights([w1, b1, kernel.T])
    return twin


COMPILE_METRICS = {
    "none": lambda: None,
    "accuracy": lambda: ["accuracy"],
    "two": lambda: [
        "accuracy",
        keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="xent"),
    ],
}


# One compiled metric returns lists as two do: JAX and PyTorch skip it.
@pytest.mark.parametrize(
    "metrics",
    ["none", pytest.param("accuracy", marks=pytest.mark.tensorflow), "two"],
)
def test_return_types_are_those_of_keras(metrics):
    keras.utils.set_random_seed(5)
    x, y = _data(n=40, seed=10)
    model = _sequential(lam=1e6)  # λ → ∞: margin logits ≈ plain logits
    twin = _plain_twin(model)
    for m in (model, twin):
        m.compile(
            keras.optimizers.SGD(0.0), _sparse_ce(), metrics=COMPILE_METRICS[metrics]()
        )
    ours, theirs = model.evaluate(x, y, verbose=0), twin.evaluate(x, y, verbose=0)
    assert type(ours) is type(theirs)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert model.metrics_names == twin.metrics_names
    for method in ("train_on_batch", "test_on_batch"):
        ours = getattr(model, method)(x, y)
        theirs = getattr(twin, method)(x, y)
        assert type(ours) is type(theirs)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    results = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(results) == set(
        twin.evaluate(x, y, verbose=0, return_dict=True)
    ) | {"lsoftmax_lambda", "lsoftmax_theta"}


def test_evaluate_formats_as_a_float_without_metrics():
    keras.utils.set_random_seed(23)
    x, y = _data(seed=11)
    model = _sequential()
    model.compile("sgd", _sparse_ce())
    assert isinstance(model.evaluate(x, y, verbose=0), float)
    assert f"{model.evaluate(x, y, verbose=0):.3f}"
    assert model.metrics_names == ["loss"]


def test_plain_crossentropy_metric_compares_train_and_validation():
    # The training loss is the margin loss; a compiled cross-entropy metric
    # is on the plain logits in training and validation, like val_loss.
    keras.utils.set_random_seed(6)
    x, y = _data(n=32, seed=12)
    model = _sequential(lam=0.0)
    model.compile(
        keras.optimizers.SGD(0.0),
        _sparse_ce(),
        metrics=[
            keras.metrics.SparseCategoricalCrossentropy(
                from_logits=True, name="plain_loss"
            )
        ],
    )
    logs = model.fit(
        x, y, batch_size=8, validation_data=(x, y), shuffle=False, verbose=0
    ).history
    val_loss = pytest.approx(logs["val_loss"][0], rel=1e-5, abs=1e-6)
    assert logs["plain_loss"][0] == val_loss
    assert logs["val_plain_loss"][0] == val_loss
    assert logs["loss"][0] > logs["val_loss"][0] + 0.5


# ------------------------------------------------------- default λ schedule

# A seeded problem on which λ = 0 from the first step (the old default)
# collapses (test accuracy 0.80-0.94 on the three backends) while annealing
# reaches 1.000. Training is not bit-reproducible on every backend (threaded
# reductions), so the classes are far enough apart that every run of a
# working default lands at 1.000: at a spread of 1.5, runs varied by 3 points.
BLOB_FEATURES, BLOB_CLASSES, BLOB_EPOCHS, BLOB_BATCH = 20, 10, 8, 32


def _blobs(n, seed):
    """`n` points around 10 Gaussian class centres (spread 2.5 per axis)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(BLOB_CLASSES, BLOB_FEATURES)) * 2.5
    y = rng.integers(0, BLOB_CLASSES, size=n).astype("int32")
    x = (centres[y] + rng.normal(size=(n, BLOB_FEATURES))).astype("float32")
    return x, y


def _train_blobs(head, callbacks=()):
    """Test accuracy and mean test angle (degrees) to the class weight."""
    x, y = _blobs(3000, seed=0)
    x_test, y_test, x, y = x[:1000], y[:1000], x[1000:], y[1000:]
    keras.utils.set_random_seed(0)
    model = keras_lsoftmax.Sequential(
        [
            keras.Input((BLOB_FEATURES,)),
            keras.layers.Dense(32),
            keras.layers.BatchNormalization(),
            keras.layers.PReLU(),
            head,
        ]
    )
    model.compile("adam", _sparse_ce(), metrics=["accuracy"])
    model.fit(
        x,
        y,
        epochs=BLOB_EPOCHS,
        batch_size=BLOB_BATCH,
        callbacks=list(callbacks),
        verbose=0,
    )
    accuracy = model.evaluate(x_test, y_test, verbose=0, return_dict=True)[
        "accuracy"
    ]
    features = keras.Model(model.inputs, model.layers[-2].output).predict(
        x_test, verbose=0
    )
    weights = keras.ops.convert_to_numpy(head.kernel)[y_test]
    cos = np.sum(features * weights, axis=1) / (
        np.linalg.norm(features, axis=1) * np.linalg.norm(weights, axis=1)
    )
    return accuracy, float(np.degrees(np.arccos(np.clip(cos, -1, 1))).mean())


def test_default_arguments_train_with_the_margin():
    accuracy, angle = _train_blobs(LSoftmaxDense(BLOB_CLASSES, margin=4))
    # A well-annealed run: the authors' schedule shape, driven by the
    # callback, reaching λ = 1 at half of the run.
    steps = BLOB_EPOCHS * 2000 // BLOB_BATCH
    annealed = keras_lsoftmax.schedules.InverseDecay(
        1000.0, (1000.0 ** (1 / 35) - 1) / (0.5 * steps), 35.0, minimum=1.0
    )
    annealed_accuracy, annealed_angle = _train_blobs(
        LSoftmaxDense(BLOB_CLASSES, margin=4),
        [keras_lsoftmax.LambdaScheduler(annealed)],
    )
    softmax_accuracy, softmax_angle = _train_blobs(
        LSoftmaxDense(BLOB_CLASSES, margin=1)
    )
    assert accuracy >= annealed_accuracy - 0.01
    assert annealed_accuracy > 0.98 and softmax_accuracy > 0.98
    # The margin acts: about 18° against about 56° for plain softmax.
    assert angle < softmax_angle - 20.0
    assert abs(angle - annealed_angle) < 10.0


def test_auto_schedule_follows_the_run_and_a_second_fit_continues_it():
    x, y = _data(n=32, seed=13)
    model = _sequential_default()
    model.compile("sgd", _sparse_ce())
    head = _head(model)
    assert head.lambda_schedule == "auto"
    logs = model.fit(x, y, batch_size=8, epochs=2, verbose=0).history
    # 2 epochs of 4 steps: λ crosses 1 (before the floor) at step 2.4.
    expected = keras_lsoftmax.schedules.auto_schedule(8)
    assert head.lambda_schedule.get_config() == expected.get_config()
    assert logs["lsoftmax_lambda"] == pytest.approx(
        [float(expected(4)), float(expected(8))], rel=1e-6
    )
    logs = model.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    assert head.lambda_schedule.get_config() == expected.get_config()
    assert logs["lsoftmax_lambda"] == pytest.approx([float(expected(12))], rel=1e-6)


def test_auto_schedule_counts_accumulated_updates():
    x, y = _data(n=32, seed=14)
    model = _sequential_default()
    model.compile(keras.optimizers.SGD(gradient_accumulation_steps=2), _sparse_ce())
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    expected = keras_lsoftmax.schedules.auto_schedule(4)
    assert _head(model).lambda_schedule.get_config() == expected.get_config()


def test_auto_schedule_of_a_run_of_unknown_length():
    def endless():
        x, y = _data(n=8, seed=15)
        while True:
            yield x, y

    model = _sequential_default()
    model.compile("sgd", _sparse_ce())
    model.fit(endless(), epochs=1, steps_per_epoch=2, verbose=0)
    expected = keras_lsoftmax.schedules.auto_schedule(2)
    assert _head(model).lambda_schedule.get_config() == expected.get_config()
    model = _sequential_default()
    model.compile("sgd", _sparse_ce())
    model.train_on_batch(*_data(n=8, seed=15))
    expected = keras_lsoftmax.schedules.auto_schedule(None)
    assert _head(model).lambda_schedule.get_config() == expected.get_config()


def _sequential_default():
    return keras_lsoftmax.Sequential(
        [
            keras.Input((D,), name="features"),
            keras.layers.Dense(H, activation="relu", name="hidden"),
            LSoftmaxDense(C, margin=MARGIN, name="head"),
        ]
    )
