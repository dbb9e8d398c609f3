"""The margin train and test steps on JAX (stateless, `jax.value_and_grad`).

The forward pass calls the model itself (`self(x, training=...)`) inside a
`keras.StatelessScope` that maps every variable to this step's state, as
Keras's own JAX step does through `stateless_call`; calling the model, not
its `call`, sets the training mode of every layer, also for a subclassed
model whose `call` takes no `training` argument.

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
from keras_lsoftmax.margin_step import optimizer_step
from keras_lsoftmax.margin_step import plain_predictions
from keras_lsoftmax.margin_step import sampled_targets
from keras_lsoftmax.margin_step import update_metrics


class JaxMarginTrainer:
    """`train_step` and `test_step` of `MarginTrainingMixin` on JAX."""

    def train_step(self, state: tuple, data: Any) -> tuple[dict, tuple]:
        trainable, non_trainable, optimizer_vars, metrics_vars = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        check_targets(y)

        def loss_fn(trainable: list) -> tuple:
            return _forward(
                self,
                (trainable, non_trainable, metrics_vars, optimizer_vars),
                x,
                y,
                sample_weight,
                training=True,
            )

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, aux), grads = grad_fn(trainable)
        loss, y_pred, margin, non_trainable, metrics_vars, y = aux
        trainable, optimizer_vars = self.optimizer.stateless_apply(
            optimizer_vars, grads, trainable
        )
        logs, metrics_vars = _stateless_metrics(
            self, metrics_vars, x, y, y_pred, sample_weight, loss, margin
        )
        return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)

    def test_step(self, state: tuple, data: Any) -> tuple[dict, tuple]:
        trainable, non_trainable, metrics_vars = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        check_targets(y)
        _, aux = _forward(
            self,
            (trainable, non_trainable, metrics_vars, None),
            x,
            y,
            sample_weight,
            training=False,
        )
        loss, y_pred, margin, non_trainable, metrics_vars, y = aux
        logs, metrics_vars = _stateless_metrics(
            self, metrics_vars, x, y, y_pred, sample_weight, loss, margin
        )
        return logs, (trainable, non_trainable, metrics_vars)


def _forward(
    model: keras.Model,
    state: tuple,
    x: Any,
    y: Any,
    sample_weight: Any,
    training: bool,
) -> tuple[Any, tuple]:
    """The (scaled) loss and, as auxiliary output, what the step reports.

    Returns `(scaled_loss, (loss, plain predictions, margin values, new
    non-trainable values, new metrics values, the labels the loss took))`.
    """
    trainable, non_trainable, metrics_vars, optimizer_vars = state
    groups = [
        (model.trainable_variables, trainable),
        (model.non_trainable_variables, non_trainable),
        (model.metrics_variables, metrics_vars),
    ]
    if optimizer_vars is not None:
        groups.append((model.optimizer.variables, optimizer_vars))
    mapping = [pair for variables, values in groups for pair in zip(variables, values)]
    with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
        step = None if optimizer_vars is None else optimizer_step(model)
        with model_label_scope(model, x, y, step) as labels:
            y_pred = model(x, training=training)
        y = sampled_targets(y, y_pred, labels.records)
        loss = model.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        scaled_loss = model.optimizer.scale_loss(loss) if training else loss
    aux = (
        loss,
        plain_predictions(y_pred, labels.records),
        margin_values(model, labels.records),
        _values(scope, model.non_trainable_variables),
        _values(scope, model.metrics_variables),
        y,
    )
    return scaled_loss, aux


def _values(scope: keras.StatelessScope, variables: list) -> list:
    """The values of `variables` at the end of `scope`."""
    values = []
    for variable in variables:
        value = scope.get_current_value(variable)
        values.append(variable.value if value is None else value)
    return values


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
        logs = update_metrics(model, x, y, y_pred, sample_weight, loss, margin)
    return logs, _values(scope, model.metrics_variables)
