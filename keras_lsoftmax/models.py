"""Margin-aware `Sequential` and `Model`: `fit` hands the labels to the head."""

import inspect
from typing import Any

import keras

from keras_lsoftmax.backend import MarginTrainer
from keras_lsoftmax.callbacks import LambdaScheduler
from keras_lsoftmax.callbacks import RunLambdaSchedules
from keras_lsoftmax.layers import find_margin_heads
from keras_lsoftmax.margin_step import LatestValue
from keras_lsoftmax.margin_step import check_targets


_MARGIN_LOGS = ("lsoftmax_lambda", "lsoftmax_theta")


class MarginTrainingMixin(MarginTrainer):
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
        self.lsoftmax_lambda_tracker = LatestValue(name="lsoftmax_lambda")
        self.lsoftmax_theta_tracker = keras.metrics.Mean(name="lsoftmax_theta")
        self._traced_lambda_schedules: frozenset | None = None

    def make_train_function(self, force: bool = False) -> Any:
        # The train function computes λ from the schedules attached to the
        # heads when it is traced; attaching or detaching one (through
        # LambdaScheduler or set_lambda) needs a new one.
        schedules = frozenset(
            (id(layer), layer.lambda_schedule)
            for layer in find_margin_heads(self)
        )
        force = force or schedules != self._traced_lambda_schedules
        self._traced_lambda_schedules = schedules
        return super().make_train_function(force=force)

    def fit(self, *args: Any, **kwargs: Any) -> keras.callbacks.History:
        """`keras.Model.fit`, with the heads' λ schedules fitted to the run.

        Takes the arguments of `keras.Model.fit`. When training starts, the
        `lambda_schedule="auto"` of every `LSoftmaxDense` with margin > 1
        becomes the annealing fitted to this run's length (see
        `RunLambdaSchedules`), and a head whose λ starts below 1 gets a
        warning. With a `keras.callbacks.CallbackList` for `callbacks`, the
        first train step resolves "auto" for a run of unknown length, and
        nothing warns.
        """
        bound = inspect.signature(super().fit).bind(*args, **kwargs)
        callbacks = bound.arguments.get("callbacks")
        if not isinstance(callbacks, keras.callbacks.CallbackList):
            callbacks = list(callbacks or [])
            scheduled = any(isinstance(c, LambdaScheduler) for c in callbacks)
            # Last, so that it sees the schedules LambdaScheduler attached.
            callbacks.append(RunLambdaSchedules(scheduled))
            bound.arguments["callbacks"] = callbacks
        return super().fit(*bound.args, **bound.kwargs)

    # Keras builds the compiled loss and metrics on a first batch before the
    # first step (also under a tf.distribute strategy); without labels it
    # would fail there with an error of its own, not one that says what is
    # missing.
    def compute_loss(
        self, x: Any = None, y: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        check_targets(y)
        return super().compute_loss(x, y, *args, **kwargs)

    def compute_metrics(self, x: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
        check_targets(y)
        return super().compute_metrics(x, y, *args, **kwargs)

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        metrics = super().metrics
        if find_margin_heads(self):
            return metrics
        return [m for m in metrics if not self._is_margin_tracker(m)]

    @property
    def metrics_names(self) -> list[str]:
        return [m.name for m in self.metrics if not self._is_margin_tracker(m)]

    def _is_margin_tracker(self, metric: keras.metrics.Metric) -> bool:
        trackers = (self.lsoftmax_lambda_tracker, self.lsoftmax_theta_tracker)
        return any(metric is tracker for tracker in trackers)

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
    # Keras does not export its functional model class; keras.Model given
    # inputs and outputs makes an instance of it. Only its `__new__` runs:
    # building a model here would fix Keras's global dtype policy at import.
    return type(keras.Model.__new__(keras.Model, None, None))


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
