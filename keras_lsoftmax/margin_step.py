"""What the train and test steps of every backend share.

A backend's step (`keras_lsoftmax/backend/<backend>/trainer.py`) runs the
forward pass inside `label_routing.model_label_scope`, computes the loss on
the margin logits and its gradient its own way, then calls these helpers:
the compiled metrics see the plain logits, and the λ and θ trackers get the
values the heads recorded. Each train step hands its label scope the step
counter of the optimizer it applies (`optimizer_step`), so a λ schedule
follows that optimizer.
"""

import math
import warnings
from typing import Any

import keras

from keras_lsoftmax import ops
from keras_lsoftmax.layers import find_margin_heads


def check_targets(y: Any) -> None:
    """Raises if `fit` or `evaluate` got no labels."""
    if y is None:
        raise ValueError(
            "keras_lsoftmax models need the labels `y` in fit and evaluate: "
            "the LSoftmaxDense margin is computed from them. Received: y=None"
        )


def optimizer_step(model: keras.Model) -> Any:
    """The number of updates applied by `model.optimizer`, as a tensor.

    A train step reads it from the optimizer it applies, so after a
    recompile or a restore λ follows the new optimizer, not the counter that
    `LambdaScheduler` attached to the heads. It is the public
    `optimizer.iterations`, which with `gradient_accumulation_steps` counts
    the applied updates, not the batches. On JAX, call it inside the
    `keras.StatelessScope` that maps the optimizer's variables to this
    step's state.
    """
    return keras.ops.convert_to_tensor(model.optimizer.iterations)


def plain_predictions(y_pred: Any, records: list) -> Any:
    """`y_pred` with the margin of every head that is a model output undone.

    The margin changes one logit per row; putting the plain one back is an
    O(B) update, not a second forward pass.
    """
    leaves = keras.tree.flatten(y_pred)
    for record in records:
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


def sampled_targets(y: Any, y_pred: Any, records: list) -> Any:
    """`y` with the labels of each class-sampling head's output replaced.

    A head with `sample_rate` < 1 returns logits over the S classes it kept
    in this step; the loss and the training metrics of its output then take
    the labels' positions among those classes (`HeadRecord.targets`). `y`
    is returned as it is when no head sampled.
    """
    sampled = [record for record in records if record.targets is not None]
    if not sampled:
        return y
    outputs = keras.tree.flatten(y_pred)
    nested = keras.tree.is_nested(y)
    leaves = keras.tree.flatten(y) if nested else [y]
    if len(leaves) != len(outputs) or (
        nested and isinstance(y, dict) != isinstance(y_pred, dict)
    ):
        raise ValueError(
            "A head with sample_rate < 1 needs `y` to hold one label tensor "
            "per model output, in the structure of the outputs, so that its "
            f"output's labels can be replaced. Received {len(leaves)} label "
            f"tensors for {len(outputs)} outputs."
        )
    for record in sampled:
        position = next(
            (i for i, leaf in enumerate(outputs) if leaf is record.outputs),
            None,
        )
        if position is None:
            raise ValueError(
                f"{type(record.layer).__name__} '{record.layer.name}' "
                f"samples classes (sample_rate={record.layer.sample_rate}), "
                "so its training logits cover only the kept classes; its "
                "output must be a model output, whose loss then takes the "
                "labels' positions among them."
            )
        leaves[position] = record.targets
    return keras.tree.pack_sequence_as(y, leaves) if nested else leaves[0]


def margin_values(model: keras.Model, records: list) -> tuple | None:
    """(λ of the first head, θ in degrees per sample, θ weights), or None.

    Taken from the records, so they are the values the step used (on JAX
    the layer variables are not readable inside the step).
    """
    if not records:
        return None
    heads = find_margin_heads(model)
    first = next((r for r in records if heads and r.layer is heads[0]), None)
    lam = (first or records[0]).lam
    cos = keras.ops.concatenate([r.cos_theta for r in records], axis=0)
    weights = keras.ops.concatenate(
        [
            keras.ops.ones_like(r.cos_theta) if r.valid is None else r.valid
            for r in records
        ],
        axis=0,
    )
    theta = keras.ops.arccos(cos) * (180.0 / math.pi)
    return lam, theta, keras.ops.cast(weights, theta.dtype)


def update_metrics(
    model: keras.Model,
    x: Any,
    y: Any,
    y_pred: Any,
    sample_weight: Any,
    loss: Any,
    margin: tuple | None,
) -> dict[str, Any]:
    """Updates the loss, λ, θ and compiled metrics; returns the logs.

    Args:
        model: the margin-aware model (`MarginTrainingMixin`).
        x, y, sample_weight: the batch.
        y_pred: the plain predictions.
        loss: the (unscaled) loss, as the loss tracker should see it.
        margin: `margin_values(...)`, or None.
    """
    batch_size = keras.ops.shape(keras.tree.flatten(x)[0])[0]
    for metric in model.metrics:
        if metric.name == "loss":
            metric.update_state(loss, sample_weight=batch_size)
    if margin is not None:
        lam, theta, weights = margin
        model.lsoftmax_lambda_tracker.update_state(lam)
        model.lsoftmax_theta_tracker.update_state(theta, weights)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


class LatestValue(keras.metrics.Metric):
    """A metric whose result is the last value it was given (λ)."""

    def __init__(self, name: str, dtype: str = "float32"):
        super().__init__(name=name, dtype=dtype)
        self.value = self.add_variable(
            shape=(),
            initializer="zeros",
            dtype=dtype,
            aggregation="mean",
            name="value",
        )

    def update_state(self, value: Any) -> None:
        self.value.assign(keras.ops.cast(value, self.dtype))

    def result(self) -> Any:
        # A tensor, not the variable (TensorFlow's convert would keep it).
        return keras.ops.copy(self.value)
