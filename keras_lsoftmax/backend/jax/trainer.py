"""The margin train and test steps on JAX (stateless, `jax.value_and_grad`).

Everything the heads record inside the differentiated function is a tracer
of that trace, so it leaves only through the function's auxiliary output:
the plain predictions and the λ and θ values are computed inside it.
"""

from typing import Any

import jax
import keras

from keras_lsoftmax.label_routing import model_label_scope
from keras_lsoftmax.margin_step import check_targets
from keras_lsoftmax.margin_step import margin_values
from keras_lsoftmax.margin_step import plain_predictions
from keras_lsoftmax.margin_step import update_metrics


class MarginTrainer:
    """`train_step` and `test_step` of `MarginTrainingMixin` on JAX."""

    # Before the first step Keras builds the compiled loss and metrics on a
    # batch; without labels it would fail there with an error of its own
    # rather than the one that says what is missing.
    def compute_loss(
        self, x: Any = None, y: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        check_targets(y)
        return super().compute_loss(x, y, *args, **kwargs)

    def compute_metrics(
        self, x: Any, y: Any, *args: Any, **kwargs: Any
    ) -> Any:
        check_targets(y)
        return super().compute_metrics(x, y, *args, **kwargs)

    def train_step(self, state: tuple, data: Any) -> tuple[dict, tuple]:
        trainable, non_trainable, optimizer_vars, metrics_vars = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        check_targets(y)
        step = _iterations(self.optimizer, optimizer_vars)

        def loss_fn(trainable: list) -> tuple:
            with model_label_scope(self, x, y, step) as scope:
                loss, aux = self.compute_loss_and_updates(
                    trainable,
                    non_trainable,
                    metrics_vars,
                    x,
                    y,
                    sample_weight,
                    training=True,
                    optimizer_variables=optimizer_vars,
                )
            unscaled_loss, y_pred, new_non_trainable, new_metrics = aux
            extras = (
                plain_predictions(y_pred, scope.records),
                margin_values(self, scope.records),
            )
            return loss, (unscaled_loss, extras, new_non_trainable, new_metrics)

        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        unscaled_loss, (y_pred, margin), non_trainable, metrics_vars = aux
        trainable, optimizer_vars = self.optimizer.stateless_apply(
            optimizer_vars, grads, trainable
        )
        logs, metrics_vars = _stateless_metrics(
            self, metrics_vars, x, y, y_pred, sample_weight, unscaled_loss, margin
        )
        return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)

    def test_step(self, state: tuple, data: Any) -> tuple[dict, tuple]:
        trainable, non_trainable, metrics_vars = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        check_targets(y)
        with model_label_scope(self, x, y) as scope:
            _, aux = self.compute_loss_and_updates(
                trainable,
                non_trainable,
                metrics_vars,
                x,
                y,
                sample_weight,
                training=False,
            )
        unscaled_loss, y_pred, non_trainable, metrics_vars = aux
        logs, metrics_vars = _stateless_metrics(
            self,
            metrics_vars,
            x,
            y,
            y_pred,
            sample_weight,
            unscaled_loss,
            margin_values(self, scope.records),
        )
        return logs, (trainable, non_trainable, metrics_vars)


def _iterations(optimizer: Any, optimizer_vars: list) -> Any:
    """The step counter's value in this step's optimizer state."""
    for variable, value in zip(optimizer.variables, optimizer_vars):
        if variable is optimizer.iterations:
            return value
    return None


def _stateless_metrics(
    model: keras.Model,
    metrics_vars: list,
    x: Any,
    y: Any,
    y_pred: Any,
    sample_weight: Any,
    loss: Any,
    margin: tuple | None,
) -> tuple[dict, list]:
    mapping = list(zip(model.metrics_variables, metrics_vars))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        logs = update_metrics(
            model, x, y, y_pred, sample_weight, loss, margin
        )
    new_vars = []
    for variable in model.metrics_variables:
        value = scope.get_current_value(variable)
        new_vars.append(variable.value if value is None else value)
    return logs, new_vars
