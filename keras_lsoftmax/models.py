"""Margin-aware `Sequential` and `Model`: `fit` hands the labels to the head."""

import math
import warnings
from typing import Any

import keras
import tensorflow as tf

from keras_lsoftmax import ops
from keras_lsoftmax.label_routing import model_label_scope
from keras_lsoftmax.label_scope import label_scope
from keras_lsoftmax.layers import find_lsoftmax_layers


_MARGIN_LOGS = ("lsoftmax_lambda", "lsoftmax_theta")


class MarginTrainingMixin:
    """The `train_step` / `test_step` shared by `Sequential` and `Model`.

    `train_step` runs the forward pass inside a `label_scope`, so every
    `LSoftmaxDense` of the model (nested sub-models included) applies its
    margin with this step's labels. With structured labels (`y` a list,
    tuple or dict, for a model with several outputs) each head that is a
    model output gets the labels of its output, matched as Keras matches
    losses to outputs (positions for lists, output names for dicts); a head
    that is not an output gets the labels only when `y` holds a single label
    tensor, and otherwise `fit` raises an error naming it. Labels equal to
    the `ignore_class` of an output's compiled
    `keras.losses.SparseCategoricalCrossentropy` get no margin.

    The loss uses the margin logits; the compiled metrics use the plain
    logits of the same forward pass (the numbers `predict` gives). So the
    training `loss` is the margin loss, while `val_loss` and `evaluate`
    measure the plain logits, and the margin loss is the larger of the two.
    To compare like with like, compile a cross-entropy metric, such as
    `keras.metrics.SparseCategoricalCrossentropy(from_logits=True)`: it is
    computed on the plain logits in training and in validation alike.

    The logs (`History`, callbacks, `evaluate(return_dict=True)`) gain
    `lsoftmax_lambda`, λ of the first head, and `lsoftmax_theta`, the mean
    angle in degrees between each feature and its class weight over every
    head. Both are metrics of the model, so they follow the epoch and
    replica reductions of the other metrics; `evaluate()` without
    `return_dict`, `train_on_batch`, `test_on_batch` and `metrics_names`
    leave them out, and so return what `keras.Model` returns for the same
    `compile` arguments. `predict` and serving need no labels.

    A `.keras` file of these models loads after `import keras_lsoftmax`,
    which registers their classes; without it Keras reports that it
    "could not locate class" `Sequential` or `Model` of the
    `keras_lsoftmax` package.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lsoftmax_lambda_tracker = _LatestValue(name="lsoftmax_lambda")
        self.lsoftmax_theta_tracker = keras.metrics.Mean(name="lsoftmax_theta")

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        metrics = super().metrics
        if find_lsoftmax_layers(self):
            return metrics
        return [m for m in metrics if not self._is_margin_tracker(m)]

    @property
    def metrics_names(self) -> list[str]:
        return [m.name for m in self.metrics if not self._is_margin_tracker(m)]

    def _is_margin_tracker(self, metric: keras.metrics.Metric) -> bool:
        trackers = (self.lsoftmax_lambda_tracker, self.lsoftmax_theta_tracker)
        return any(metric is tracker for tracker in trackers)

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        _check_targets(y)
        scope = model_label_scope(self, x, y)
        with tf.GradientTape() as tape:
            with scope:
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
        # After the loss and its gradient, nothing else holds the logits,
        # so the plain targets go back into them in place.
        with tf.control_dependencies([loss]):
            metrics_pred = _plain_predictions(y_pred, scope)
        logs = self._update_metrics(
            x, y, metrics_pred, sample_weight, loss, scope
        )
        return _reducible_logs(logs, self.distribute_strategy)

    def test_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        _check_targets(y)
        with model_label_scope(self, x, y) as scope:
            y_pred = self(x, training=False)
        loss = self.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False
        )
        logs = self._update_metrics(x, y, y_pred, sample_weight, loss, scope)
        return _reducible_logs(logs, self.distribute_strategy)

    def _maybe_symbolic_build(
        self, iterator: Any = None, data_batch: Any = None
    ) -> None:
        # Keras 3.15 builds a distributed model from a first batch averaged
        # over the replicas, a reduction that fails across workers
        # (keras-team/keras#20585, tensorflow/tensorflow#72388); the build
        # needs only shapes and dtypes, which one worker's batch has.
        strategy = self.distribute_strategy
        if iterator is None or not _several_workers(strategy):
            return super()._maybe_symbolic_build(iterator, data_batch)
        for _, _, batches in iterator:
            data_batch = keras.tree.map_structure(
                lambda v: strategy.experimental_local_results(v)[0],
                next(batches),
            )
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def evaluate(
        self,
        x: Any = None,
        y: Any = None,
        batch_size: int | None = None,
        verbose: Any = "auto",
        sample_weight: Any = None,
        steps: int | None = None,
        callbacks: Any = None,
        return_dict: bool = False,
        **kwargs: Any,
    ) -> Any:
        logs = super().evaluate(
            x,
            y,
            batch_size=batch_size,
            verbose=verbose,
            sample_weight=sample_weight,
            steps=steps,
            callbacks=callbacks,
            return_dict=True,
            **kwargs,
        )
        return logs if return_dict else _keras_results(self, logs)

    def train_on_batch(
        self,
        x: Any,
        y: Any = None,
        sample_weight: Any = None,
        class_weight: Any = None,
        return_dict: bool = False,
    ) -> Any:
        logs = super().train_on_batch(
            x, y, sample_weight, class_weight, return_dict=True
        )
        return logs if return_dict else _keras_results(self, logs)

    def test_on_batch(
        self,
        x: Any,
        y: Any = None,
        sample_weight: Any = None,
        return_dict: bool = False,
    ) -> Any:
        logs = super().test_on_batch(x, y, sample_weight, return_dict=True)
        return logs if return_dict else _keras_results(self, logs)

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
        heads = find_lsoftmax_layers(self)
        if heads:
            self.lsoftmax_lambda_tracker.update_state(heads[0].lambda_)
        if scope.records:
            theta, weights = _theta_degrees(scope.records)
            self.lsoftmax_theta_tracker.update_state(theta, weights)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _several_workers(strategy: tf.distribute.Strategy) -> bool:
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    cluster = strategy.cluster_resolver.cluster_spec()
    return bool(cluster.jobs) and cluster.num_tasks("worker") > 1


def _reducible_logs(logs: dict, strategy: tf.distribute.Strategy) -> dict:
    """`logs`, as one-element vectors when they are reduced across workers.

    Keras 3.15 reduces a step's logs across workers with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on scalars.
    """
    if not _several_workers(strategy):
        return logs
    return {name: tf.reshape(value, [1]) for name, value in logs.items()}


class _LatestValue(keras.metrics.Metric):
    """A metric whose result is the last value it was given (λ)."""

    def __init__(self, name: str, dtype: str = "float32"):
        super().__init__(name=name, dtype=dtype)
        self.value = self.add_variable(
            shape=(), initializer="zeros", dtype=dtype, aggregation="mean",
            name="value",
        )

    def update_state(self, value: Any) -> None:
        self.value.assign(keras.ops.cast(value, self.dtype))

    def result(self) -> tf.Tensor:
        # keras.ops.convert_to_tensor returns a TF variable itself.
        return tf.convert_to_tensor(self.value)


def _keras_results(model: keras.Model, logs: dict[str, Any]) -> Any:
    """`logs` as `keras.Model.evaluate` returns them without `return_dict`.

    Keras lists the metrics in the order of `model.metrics` (compiled
    metrics one by one), then any other logs by name; the margin logs are
    left out.
    """
    names = [k for k in model.get_metrics_result() if k in logs]
    names += sorted(k for k in logs if k not in names)
    results = [logs[k] for k in names if k not in _MARGIN_LOGS]
    return results[0] if len(results) == 1 else results


def _theta_degrees(records: list) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-sample θ of every head, in degrees, and their weights."""
    cos = tf.concat([r.cos_theta for r in records], axis=0)
    weights = tf.concat(
        [
            tf.ones_like(r.cos_theta) if r.valid is None else r.valid
            for r in records
        ],
        axis=0,
    )
    return tf.math.acos(cos) * (180.0 / math.pi), weights


def _check_targets(y: Any) -> None:
    if y is None:
        raise ValueError(
            "keras_lsoftmax models need the labels `y` in fit and evaluate: "
            "the LSoftmaxDense margin is computed from them. Received: y=None"
        )


def _plain_predictions(y_pred: Any, scope: label_scope) -> Any:
    """`y_pred` with the margin of every head that is a model output undone.

    The margin changes one logit per row; putting the plain one back is an
    O(B) update, not a second forward pass.
    """
    leaves = keras.tree.flatten(y_pred)
    for record in scope.records:
        position = next(
            (i for i, leaf in enumerate(leaves) if leaf is record.outputs),
            None,
        )
        if position is None:
            warnings.warn(
                f"The output of LSoftmaxDense '{record.layer.name}' is not "
                "a model output, so the training metrics of the output it "
                "feeds see the margin; evaluate() gives the plain-logit "
                "metrics.",
                stacklevel=3,
            )
            continue
        leaves[position] = ops.with_plain_targets(
            record.outputs, record.labels, record.plain_target
        )
    return keras.tree.pack_sequence_as(y_pred, leaves)


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
