"""Tests of which labels each head gets in `fit`: `label_routing.py`.

Each training test takes one SGD step on the whole data and compares the
weights with a hand-written step on the intended loss, so a head that got
another output's labels (or none) fails it.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_lsoftmax
from keras_lsoftmax import LSoftmaxDense
from keras_lsoftmax import ops
from tests.datasets import random_classification

D, H, C, C_AUX = 12, 8, 5, 3
MARGIN, LAM, LR = 3, 0.5, 0.5


def _data(n=32, seed=0):
    x, y = random_classification(n, D, C, seed)
    y_aux = np.random.default_rng(seed + 100).integers(0, C_AUX, n)
    return x, y, y_aux.astype("int32")


def _ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


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
    variables = [tf.Variable(v.numpy()) for v in model.trainable_variables]
    # "two_head_net/hidden/kernel" (subclassed) and "hidden/kernel" alike.
    names = ["/".join(v.path.split("/")[-2:]) for v in model.trainable_variables]
    by_name = dict(zip(names, variables))
    with tf.GradientTape() as tape:
        features = tf.nn.relu(
            x @ by_name["hidden/kernel"] + by_name["hidden/bias"]
        )
        if "aux/bias" in by_name:
            aux = features @ by_name["aux/kernel"] + by_name["aux/bias"]
        else:
            aux = ops.lsoftmax_logits(features, by_name["aux/kernel"], y_aux, 2, LAM)
        main = ops.lsoftmax_logits(features, by_name["main/kernel"], y, MARGIN, LAM)
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(y_aux, aux)
        ) + tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, main))
    grads = tape.gradient(loss, variables)
    return {n: v.numpy() - LR * g.numpy() for n, v, g in zip(names, variables, grads)}


def _assert_step(model, expected):
    for variable in model.trainable_variables:
        name = "/".join(variable.path.split("/")[-2:])
        np.testing.assert_allclose(
            variable.numpy(), expected[name], rtol=1e-5, atol=1e-6
        )


def _fit_one_step(model, x, y, **compile_kwargs):
    model.compile(keras.optimizers.SGD(LR), **compile_kwargs)
    return model.fit(x, y, batch_size=len(x), shuffle=False, verbose=0).history


@pytest.mark.parametrize("second_head", [False, True])
@pytest.mark.parametrize("form", ["list", "tuple", "dict", "dataset"])
def test_each_head_gets_the_labels_of_its_output(form, second_head):
    x, y, y_aux = _data()
    model = _two_output_model(as_dict=False, second_head=second_head)
    expected = _hand_step(model, x, y, y_aux)
    labels = {
        "list": [y_aux, y],
        "tuple": (y_aux, y),
        "dict": {"aux": y_aux, "main": y},
    }.get(form)
    if form == "dataset":
        data = tf.data.Dataset.from_tensor_slices(
            (x, {"aux": y_aux, "main": y})
        ).batch(len(x))
        model.compile(keras.optimizers.SGD(LR), loss=[_ce(), _ce()])
        model.fit(data, shuffle=False, verbose=0)
    else:
        _fit_one_step(model, x, labels, loss=[_ce(), _ce()])
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
    kernel = model.get_layer("main").kernel.numpy()
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
    kernel = tf.Variable(model.get_layer("main").kernel.numpy())
    with tf.GradientTape() as tape:
        logits = ops.lsoftmax_logits(x, kernel, y, MARGIN, LAM)
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
        )
    expected = kernel.numpy() - LR * tape.gradient(loss, kernel).numpy()
    _fit_one_step(model, x, {"main": y}, loss={"main": _ce()})
    np.testing.assert_allclose(
        model.get_layer("main").kernel.numpy(), expected, rtol=1e-5, atol=1e-6
    )


def test_dict_labels_for_an_unnamed_single_output_fail_as_in_keras():
    # Keras 3.15's compiled loss cannot match {"main": y} to a single
    # output that is not a dict; the margin models raise the same error.
    x, y, _ = _data(seed=4)
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
    inputs = keras.Input((D,))
    head = LSoftmaxDense(C, margin=MARGIN, name="inner_head")(inputs)
    outputs = [
        keras.layers.Dense(C_AUX, name="aux")(inputs),
        keras.layers.Rescaling(2.0, name="main")(head),
    ]
    model = keras_lsoftmax.Model(inputs, outputs)
    model.compile("sgd", loss=[_ce(), _ce()])
    before = model.get_layer("inner_head").kernel.numpy()
    with pytest.raises(ValueError, match=r"LSoftmaxDense 'inner_head'.*labels="):
        model.fit(x, [y_aux, y], verbose=0)
    np.testing.assert_array_equal(model.get_layer("inner_head").kernel.numpy(), before)


def test_head_that_is_not_an_output_with_one_label_tensor_gets_it():
    x, y, _ = _data(seed=7)
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
    kernel = tf.Variable(model.get_layer("main").kernel.numpy())
    valid = y != -1
    with tf.GradientTape() as tape:
        margin = ops.lsoftmax_logits(x, kernel, np.where(valid, y, 0), MARGIN, LAM)
        plain = tf.matmul(x, kernel, transpose_b=True)
        logits = tf.where(valid[:, None], margin, plain)
        expected_loss = loss(y, logits)
    expected = kernel.numpy() - LR * tape.gradient(expected_loss, kernel).numpy()
    logs = _fit_one_step(model, x, y, loss=loss)
    np.testing.assert_allclose(
        model.get_layer("main").kernel.numpy(), expected, rtol=1e-5, atol=1e-6
    )
    assert logs["loss"][0] == pytest.approx(float(expected_loss), rel=1e-5)

    # Other labels outside [0, C) still get the clear error.
    y[1] = C + 2
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"labels` in \[0, 5\)"):
        model.fit(x, y, batch_size=len(x), verbose=0)
