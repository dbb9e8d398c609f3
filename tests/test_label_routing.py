"""Tests of which labels each head gets in `fit`: `label_routing.py`.

Each training test takes one SGD step on the whole data and compares the
weights with a hand-written step on the intended loss, so a head that got
another output's labels (or none) fails it.
"""

import keras
import numpy as np
import pytest

import keras_lsoftmax
from keras_lsoftmax import LSoftmaxDense
from keras_lsoftmax import ops
from tests.backend_utils import BACKEND
from tests.backend_utils import gradients
from tests.datasets import random_classification

D, H, C, C_AUX = 12, 8, 5, 3
MARGIN, LAM, LR = 3, 0.5, 0.5


def _data(n=32, seed=0):
    x, y = random_classification(n, D, C, seed)
    y_aux = np.random.default_rng(seed + 100).integers(0, C_AUX, n)
    return x, y, y_aux.astype("int32")


def _ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _mean_ce(labels, logits):
    return keras.ops.mean(
        keras.ops.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    )


def _numpy(tensor):
    return keras.ops.convert_to_numpy(tensor)


def _short_name(variable):
    # "two_head_net/hidden/kernel" (subclassed) and "hidden/kernel" alike.
    return "/".join(variable.path.split("/")[-2:])


def _two_output_model(as_dict, second_head=False):
    keras.utils.set_random_seed(7)
    inputs = keras.Input((D,), name="features")
    hidden = keras.layers.Dense(H, activation="relu", name="hidden")(inputs)
    if second_head:
        aux = LSoftmaxDense(C_AUX, margin=2, initial_lambda=LAM, name="aux")
    else:
        aux = keras.layers.Dense(C_AUX, name="aux")
    main = LSoftmaxDense(C, margin=MARGIN, initial_lambda=LAM, name="main")
    outputs = [aux(hidden), main(hidden)]
    if as_dict:
        outputs = {"aux": outputs[0], "main": outputs[1]}
    return keras_lsoftmax.Model(inputs, outputs)


def _hand_step(model, x, y, y_aux):
    """SGD on CE(aux) + CE(main), each head with its own labels."""
    names = [_short_name(v) for v in model.trainable_variables]
    weights = [_numpy(v) for v in model.trainable_variables]

    def loss_fn(*variables):
        by_name = dict(zip(names, variables))
        features = keras.ops.relu(
            keras.ops.matmul(x, by_name["hidden/kernel"]) + by_name["hidden/bias"]
        )
        if "aux/bias" in by_name:
            aux = keras.ops.matmul(features, by_name["aux/kernel"])
            aux = aux + by_name["aux/bias"]
        else:
            aux = ops.lsoftmax_logits(features, by_name["aux/kernel"], y_aux, 2, LAM)
        main = ops.lsoftmax_logits(features, by_name["main/kernel"], y, MARGIN, LAM)
        return _mean_ce(y_aux, aux) + _mean_ce(y, main)

    _, grads = gradients(loss_fn, *weights)
    return {n: w - LR * g for n, w, g in zip(names, weights, grads)}


def _assert_step(model, expected):
    for variable in model.trainable_variables:
        np.testing.assert_allclose(
            _numpy(variable), expected[_short_name(variable)], rtol=1e-5, atol=1e-6
        )


def _fit_one_step(model, x, y, **compile_kwargs):
    model.compile(keras.optimizers.SGD(LR), **compile_kwargs)
    return model.fit(x, y, batch_size=len(x), shuffle=False, verbose=0).history


class _OneBatch(keras.utils.PyDataset):
    """The whole data as one batch, as a `keras.utils.PyDataset`."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return self.x, self.y


def _tf_dataset(x, y):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x))


@pytest.mark.parametrize("second_head", [False, True])
@pytest.mark.parametrize(
    "form",
    [
        "list",
        # Keras treats tuples as lists: JAX and PyTorch skip it.
        pytest.param("tuple", marks=pytest.mark.tensorflow),
        "dict",
        "py_dataset",
        pytest.param("tf_dataset", marks=pytest.mark.tensorflow),
    ],
)
def test_each_head_gets_the_labels_of_its_output(form, second_head):
    x, y, y_aux = _data()
    model = _two_output_model(as_dict=False, second_head=second_head)
    expected = _hand_step(model, x, y, y_aux)
    labels = {
        "list": [y_aux, y],
        "tuple": (y_aux, y),
        "dict": {"aux": y_aux, "main": y},
    }
    model.compile(keras.optimizers.SGD(LR), loss=[_ce(), _ce()])
    if form in labels:
        model.fit(x, labels[form], batch_size=len(x), shuffle=False, verbose=0)
    else:
        dataset = _OneBatch if form == "py_dataset" else _tf_dataset
        model.fit(dataset(x, labels["dict"]), shuffle=False, verbose=0)
    _assert_step(model, expected)


def test_dict_outputs_match_by_name_whatever_the_key_order():
    x, y, y_aux = _data(seed=1)
    model = _two_output_model(as_dict=True, second_head=True)
    expected = _hand_step(model, x, y, y_aux)
    logs = _fit_one_step(
        model,
        x,
        {"main": y, "aux": y_aux},
        loss={"main": _ce(), "aux": _ce()},
        metrics={"main": ["accuracy"], "aux": ["accuracy"]},
    )
    _assert_step(model, expected)
    assert {"aux_loss", "main_loss", "lsoftmax_theta", "lsoftmax_lambda"} <= set(logs)


def test_wrong_pairing_is_detected():
    # The check can fail: the main head trained on the aux labels lands
    # elsewhere than the hand step.
    x, y, y_aux = _data(seed=2)
    model = _two_output_model(as_dict=False, second_head=True)
    expected = _hand_step(model, x, y, y_aux)
    _fit_one_step(model, x, [y_aux, y_aux], loss=[_ce(), _ce()])
    kernel = _numpy(model.get_layer("main").kernel)
    assert np.max(np.abs(kernel - expected["main/kernel"])) > 1e-4


def test_each_output_metric_sees_plain_logits():
    # lr = 0: the training metrics equal evaluate's, which has no margin.
    x, y, y_aux = _data(n=40, seed=3)
    model = _two_output_model(as_dict=True, second_head=True)
    model.get_layer("main").set_lambda(0.0)
    model.compile(
        keras.optimizers.SGD(0.0),
        loss={"aux": _ce(), "main": _ce()},
        metrics={"aux": ["accuracy"], "main": ["accuracy"]},
    )
    y_dict = {"aux": y_aux, "main": y}
    logs = model.fit(x, y_dict, batch_size=8, verbose=0).history
    results = model.evaluate(x, y_dict, batch_size=8, verbose=0, return_dict=True)
    predicted = model.predict(x, verbose=0)
    for name, labels in y_dict.items():
        plain = np.mean(np.argmax(predicted[name], axis=1) == labels)
        assert logs[f"{name}_accuracy"][0] == pytest.approx(plain, abs=1e-6)
        assert results[f"{name}_accuracy"] == pytest.approx(plain, abs=1e-6)


def test_single_output_with_dict_labels():
    x, y, _ = _data(seed=4)
    keras.utils.set_random_seed(3)
    inputs = keras.Input((D,))
    head = LSoftmaxDense(C, margin=MARGIN, initial_lambda=LAM, name="main")
    model = keras_lsoftmax.Model(inputs, {"main": head(inputs)})
    kernel = _numpy(model.get_layer("main").kernel)
    _, (grad,) = gradients(
        lambda k: _mean_ce(y, ops.lsoftmax_logits(x, k, y, MARGIN, LAM)), kernel
    )
    expected = kernel - LR * grad
    _fit_one_step(model, x, {"main": y}, loss={"main": _ce()})
    np.testing.assert_allclose(
        _numpy(model.get_layer("main").kernel), expected, rtol=1e-5, atol=1e-6
    )


def test_dict_labels_for_an_unnamed_single_output_fail_as_in_keras():
    # Keras 3.15's compiled loss cannot match {"main": y} to a single
    # output that is not a dict; the margin models raise the same error.
    x, y, _ = _data(seed=4)
    keras.utils.set_random_seed(4)
    errors = []
    for model_class, head in [
        (keras.Model, keras.layers.Dense(C, name="main")),
        (keras_lsoftmax.Model, LSoftmaxDense(C, name="main")),
    ]:
        inputs = keras.Input((D,))
        model = model_class(inputs, head(inputs))
        model.compile("sgd", loss={"main": _ce()})
        with pytest.raises(Exception) as error:
            model.fit(x, {"main": y}, verbose=0)
        errors.append((type(error.value), str(error.value)))
    assert errors[0] == errors[1]


class TwoHeadNet(keras_lsoftmax.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(H, activation="relu", name="hidden")
        self.aux = keras.layers.Dense(C_AUX, name="aux")
        self.main = LSoftmaxDense(C, margin=MARGIN, initial_lambda=LAM, name="main")

    def call(self, inputs):
        features = self.hidden(inputs)
        return {"aux": self.aux(features), "main": self.main(features)}


# TwoHeadNet.call takes no `training` argument. On JAX, Keras' stateless
# forward pass then runs the layers with training=None, and the head trains
# on plain logits.
def test_unbuilt_subclassed_model_with_dict_outputs():
    x, y, y_aux = _data(seed=5)
    keras.utils.set_random_seed(11)
    model = TwoHeadNet()
    logs = _fit_one_step(
        model, x, {"aux": y_aux, "main": y}, loss={"aux": _ce(), "main": _ce()}
    )
    assert np.isfinite(logs["loss"][0]) and 0 < logs["lsoftmax_theta"][0] < 180
    keras.utils.set_random_seed(11)
    reference = TwoHeadNet()
    reference(x[:1])
    expected = _hand_step(reference, x, y, y_aux)
    _assert_step(model, expected)


def test_head_that_is_not_an_output_with_several_labels_raises():
    x, y, y_aux = _data(seed=6)
    keras.utils.set_random_seed(6)
    inputs = keras.Input((D,))
    head = LSoftmaxDense(C, margin=MARGIN, name="inner_head")(inputs)
    outputs = [
        keras.layers.Dense(C_AUX, name="aux")(inputs),
        keras.layers.Rescaling(2.0, name="main")(head),
    ]
    model = keras_lsoftmax.Model(inputs, outputs)
    model.compile("sgd", loss=[_ce(), _ce()])
    before = _numpy(model.get_layer("inner_head").kernel)
    with pytest.raises(ValueError, match=r"LSoftmaxDense 'inner_head'.*labels="):
        model.fit(x, [y_aux, y], verbose=0)
    # When the first step of fit raises, Keras 3.15 on JAX leaves the
    # variables empty (their values were moved into the step's state), so
    # there is nothing to read back; its stateless step changed nothing.
    if BACKEND != "jax":
        kernel = _numpy(model.get_layer("inner_head").kernel)
        np.testing.assert_array_equal(kernel, before)


def test_head_that_is_not_an_output_with_one_label_tensor_gets_it():
    x, y, _ = _data(seed=7)
    keras.utils.set_random_seed(7)
    inputs = keras.Input((D,))
    head = LSoftmaxDense(C, margin=MARGIN, name="inner_head")(inputs)
    outputs = {"main": keras.layers.Rescaling(2.0, name="main")(head)}
    model = keras_lsoftmax.Model(inputs, outputs)
    model.compile("sgd", loss={"main": _ce()})
    with pytest.warns(UserWarning, match="not a model output"):
        logs = model.fit(x, {"main": y}, verbose=0).history
    assert 0 < logs["lsoftmax_theta"][0] < 180


def test_ignore_class_rows_get_no_margin_and_no_error():
    x, y, _ = _data(n=24, seed=8)
    y = y.copy()
    y[::4] = -1  # ignored
    keras.utils.set_random_seed(5)
    inputs = keras.Input((D,))
    model = keras_lsoftmax.Model(
        inputs, LSoftmaxDense(C, margin=MARGIN, initial_lambda=LAM, name="main")(inputs)
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)
    kernel = _numpy(model.get_layer("main").kernel)
    valid = y != -1

    def loss_fn(kernel):
        margin = ops.lsoftmax_logits(x, kernel, np.where(valid, y, 0), MARGIN, LAM)
        plain = keras.ops.matmul(x, keras.ops.transpose(kernel))
        return loss(y, keras.ops.where(valid[:, None], margin, plain))

    expected_loss, (grad,) = gradients(loss_fn, kernel)
    expected = kernel - LR * grad
    logs = _fit_one_step(model, x, y, loss=loss)
    np.testing.assert_allclose(
        _numpy(model.get_layer("main").kernel), expected, rtol=1e-5, atol=1e-6
    )
    assert logs["loss"][0] == pytest.approx(float(expected_loss), rel=1e-5, abs=1e-6)

    # Other labels outside [0, C) still get the clear error. It is checked
    # at run time: in TensorFlow's graph, in eager PyTorch and outside jit on
    # JAX (under jit the op's gathers clamp the labels unchecked).
    y[1] = C + 2
    model.compile(keras.optimizers.SGD(LR), loss=loss, run_eagerly=BACKEND == "jax")
    with pytest.raises(_label_range_error(), match=r"labels` in \[0, 5\)"):
        model.fit(x, y, batch_size=len(x), verbose=0)


def _label_range_error():
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.errors.InvalidArgumentError
    return ValueError


def test_shared_head_gets_the_labels_of_each_output():
    # One head on two inputs gives both outputs; each call must see the
    # labels of the output it gives, not those of the other.
    x, y, _ = _data(seed=9)
    x_other, y_other, _ = _data(seed=10)
    keras.utils.set_random_seed(9)
    first, second = keras.Input((D,)), keras.Input((D,))
    head = LSoftmaxDense(C, margin=MARGIN, initial_lambda=LAM, name="head")
    model = keras_lsoftmax.Model([first, second], [head(first), head(second)])
    kernel = _numpy(head.kernel)

    def loss_fn(kernel):
        margin = ops.lsoftmax_logits(x, kernel, y, MARGIN, LAM)
        margin_other = ops.lsoftmax_logits(x_other, kernel, y_other, MARGIN, LAM)
        return _mean_ce(y, margin) + _mean_ce(y_other, margin_other)

    expected_loss, (grad,) = gradients(loss_fn, kernel)
    model.compile(keras.optimizers.SGD(LR), loss=[_ce(), _ce()])
    logs = model.fit(
        [x, x_other], [y, y_other], batch_size=len(x), shuffle=False, verbose=0
    ).history
    np.testing.assert_allclose(
        _numpy(head.kernel), kernel - LR * grad, rtol=1e-5, atol=1e-6
    )
    assert logs["loss"][0] == pytest.approx(float(expected_loss), rel=1e-5, abs=1e-6)


def test_shared_head_call_that_is_not_an_output_raises():
    x, y, y_aux = _data(seed=11)
    keras.utils.set_random_seed(11)
    inputs = keras.Input((D,))
    head = LSoftmaxDense(C, margin=MARGIN, name="shared_head")
    outputs = [head(inputs), keras.layers.Rescaling(2.0)(head(inputs))]
    model = keras_lsoftmax.Model(inputs, outputs)
    model.compile("sgd", loss=[_ce(), _ce()])
    with pytest.raises(
        ValueError, match=r"LSoftmaxDense 'shared_head'.* call number [12] of"
    ):
        model.fit(x, [y, y_aux], verbose=0)


@pytest.mark.parametrize("steps", [C, C + 2], ids=["time==units", "time!=units"])
def test_time_distributed_head_raises_in_fit(steps):
    # Labels (batch, time) with time == units would read as one-hot.
    x = np.random.default_rng(12).normal(size=(8, steps, D)).astype("float32")
    y = np.random.default_rng(13).integers(0, C, (8, steps)).astype("int32")
    model = keras_lsoftmax.Sequential(
        [
            keras.Input((steps, D)),
            keras.layers.TimeDistributed(LSoftmaxDense(C, name="step_head")),
        ]
    )
    model.compile("sgd", loss=_ce())
    with pytest.raises(
        ValueError, match=r"LSoftmaxDense 'step_head' was run through its `call`"
    ):
        model.fit(x, y, verbose=0)
