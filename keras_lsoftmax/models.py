"""Margin-aware `Sequential` and `Model`: `fit` hands the labels to the head."""

import math
import warnings
from typing import Any

import keras
import tensorflow as tf

from keras_lsoftmax import ops
from keras_lsoftmax.label_scope import label_scope


class MarginTrainingMixin:
    """The `train_step` / `test_step` shared by `Sequential` and `Model`.

    `train_step` runs the forward pass inside a `label_scope(y)`, so every
    `LSoftmaxDense` of the model (nested sub-models included) applies its
    margin with this step's labels. The loss uses the margin logits; the
    compiled metrics use the plain logits of the same forward pass (the
    numbers `predict` gives). The logs gain `lsoftmax_lambda`, the current λ,
    and `lsoftmax_theta`, the mean angle in degrees between each feature and
    its class weight. `predict` and serving need no labels.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lsoftmax_theta_tracker = keras.metrics.Mean(name="lsoftmax_theta")

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        _check_targets(y)
        with tf.GradientTape() as tape:
            with label_scope(y) as scope:
                y_pred = self(x, training=True)
            loss = self.compute_loss(
                x=x,
                y=y,
                y_pred=y_pred,
                sample_weight=sample_weight,
                training=True,
            )
            scaled_loss = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        gradients = tape.gradient(scaled_loss, variables)
        self.optimizer.apply(gradients, variables)
        metrics_pred = _plain_predictions(y_pred, scope)
        logs = self._update_metrics(
            x, y, metrics_pred, sample_weight, loss, scope
        )
        if scope.records:
            logs["lsoftmax_lambda"] = tf.identity(scope.records[0].layer.lambda_)
        return logs

    def test_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        _check_targets(y)
        with label_scope(y) as scope:
            y_pred = self(x, training=False)
        loss = self.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False
        )
        return self._update_metrics(x, y, y_pred, sample_weight, loss, scope)

    def _update_metrics(
        self,
        x: Any,
        y: Any,
        y_pred: Any,
        sample_weight: Any,
        loss: tf.Tensor,
        scope: label_scope,
    ) -> dict[str, Any]:
        # Keras losses divide by the number of replicas; report the true mean.
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        batch_size = tf.shape(tf.nest.flatten(x)[0])[0]
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss * replicas, sample_weight=batch_size)
        if scope.records:
            cos_theta = scope.records[0].cos_theta
            theta = tf.math.acos(cos_theta) * (180.0 / math.pi)
            self.lsoftmax_theta_tracker.update_state(theta)
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if not scope.records:
            logs.pop(self.lsoftmax_theta_tracker.name, None)  # no head, no θ
        return logs


def _check_targets(y: Any) -> None:
    if y is None:
        raise ValueError(
            "keras_lsoftmax models need the labels `y` in fit and evaluate: "
            "the LSoftmaxDense margin is computed from them. Received: y=None"
        )


def _plain_predictions(y_pred: Any, scope: label_scope) -> Any:
    # The margin changes one logit per row; putting the plain one back is an
    # O(B) scatter, not a second forward pass. Only possible when the head's
    # output is the model's output.
    if not scope.records:
        return y_pred
    record = scope.records[0]
    if y_pred is not record.outputs:
        warnings.warn(
            f"The output of LSoftmaxDense '{record.layer.name}' is not the "
            "model's output, so the training metrics are computed on the "
            "model's output, which the margin has changed; evaluate() "
            "gives the plain-logit metrics.",
            stacklevel=3,
        )
        return y_pred
    index = ops.target_index(record.labels)
    return tf.tensor_scatter_nd_update(y_pred, index, record.plain_target)


@keras.saving.register_keras_serializable(package="keras_lsoftmax")
class Sequential(MarginTrainingMixin, keras.Sequential):
    """`keras.Sequential` whose `fit` applies the `LSoftmaxDense` margin.

    A drop-in replacement: build, compile, fit, evaluate, predict, save and
    export as with `keras.Sequential`. See `MarginTrainingMixin` for what
    `train_step` adds.

    Args:
        layers: optional list of layers.
        trainable: bool.
        name: the model name.

    Example:

    ```python
    model = keras_lsoftmax.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(64, activation="relu"),
        keras_lsoftmax.LSoftmaxDense(10, margin=4),
    ])
    model.compile(
        "adam",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    ```
    """


@keras.saving.register_keras_serializable(package="keras_lsoftmax")
class Model(MarginTrainingMixin, keras.Model):
    """`keras.Model` whose `fit` applies the `LSoftmaxDense` margin.

    Use it as `keras.Model`: functionally, `Model(inputs, outputs)`, or as a
    base class with your own `call`. See `MarginTrainingMixin` for what
    `train_step` adds.

    Example:

    ```python
    inputs = keras.Input((784,))
    features = keras.layers.Dense(64, activation="relu")(inputs)
    logits = keras_lsoftmax.LSoftmaxDense(10, margin=4)(features)
    model = keras_lsoftmax.Model(inputs, logits)
    ```
    """

    # keras.Model makes a functional model by rewriting the bases of the
    # instance's class and of every class above it up to keras.Model, which
    # would turn this class functional for good and break its subclassed
    # use. Functional instances get their own class instead.
    def __new__(cls, *args: Any, **kwargs: Any) -> "Model":
        if _functional_arguments(args, kwargs):
            cls = _functional_variant(cls)
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, *args: Any, **kwargs: Any):
        if _functional_arguments(args, kwargs):
            _functional_variant(type(self))
        super().__init__(*args, **kwargs)


def _functional_arguments(args: tuple, kwargs: dict) -> bool:
    # The test keras.Model uses to tell Model(inputs, outputs) apart.
    return (
        len(args) == 2
        or (len(args) == 1 and "outputs" in kwargs)
        or ("inputs" in kwargs and "outputs" in kwargs)
    )


def _keras_functional_class() -> type:
    # Keras does not export its functional model class; a keras.Model built
    # from inputs and outputs is an instance of it.
    inputs = keras.Input((1,))
    return type(keras.Model(inputs, inputs))


@keras.saving.register_keras_serializable(package="keras_lsoftmax")
class FunctionalModel(Model, _keras_functional_class()):
    """The class of `keras_lsoftmax.Model(inputs, outputs)` instances."""


def _functional_variant(cls: type) -> type:
    """`cls` with `Model` replaced by `FunctionalModel` among its bases."""
    if cls is Model:
        return FunctionalModel
    if not issubclass(cls, Model) or issubclass(cls, FunctionalModel):
        return cls
    cls.__bases__ = tuple(_functional_variant(base) for base in cls.__bases__)
    return cls
