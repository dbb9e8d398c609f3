"""The margin train and test steps on TensorFlow (`tf.GradientTape`)."""

from typing import Any

import keras
import tensorflow as tf

from keras_lsoftmax.backend.tensorflow.compat import LocalBatchBuild
from keras_lsoftmax.backend.tensorflow.compat import several_workers
from keras_lsoftmax.label_routing import model_label_scope
from keras_lsoftmax.margin_step import check_targets
from keras_lsoftmax.margin_step import margin_values
from keras_lsoftmax.margin_step import optimizer_step
from keras_lsoftmax.margin_step import plain_predictions
from keras_lsoftmax.margin_step import sampled_targets
from keras_lsoftmax.margin_step import update_metrics


class TensorFlowMarginTrainer(LocalBatchBuild):
    """`train_step` and `test_step` of `MarginTrainingMixin` on TensorFlow."""

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        check_targets(y)
        scope = model_label_scope(self, x, y, optimizer_step(self))
        with tf.GradientTape() as tape:
            with scope:
                y_pred = self(x, training=True)
            y = sampled_targets(y, y_pred, scope.records)
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
            metrics_pred = plain_predictions(y_pred, scope.records)
        logs = update_metrics(
            self,
            x,
            y,
            metrics_pred,
            sample_weight,
            _true_mean(loss),
            margin_values(self, scope.records),
        )
        return _reducible_logs(logs, self.distribute_strategy)

    def test_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        check_targets(y)
        with model_label_scope(self, x, y) as scope:
            y_pred = self(x, training=False)
        loss = self.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False
        )
        logs = update_metrics(
            self,
            x,
            y,
            y_pred,
            sample_weight,
            _true_mean(loss),
            margin_values(self, scope.records),
        )
        return _reducible_logs(logs, self.distribute_strategy)


def _true_mean(loss: tf.Tensor) -> tf.Tensor:
    # Keras losses divide by the number of replicas; report the true mean.
    return loss * tf.distribute.get_replica_context().num_replicas_in_sync


def _reducible_logs(logs: dict, strategy: tf.distribute.Strategy) -> dict:
    """`logs`, as one-element vectors when they are reduced across workers.

    Keras 3.15 reduces a step's logs across workers with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on scalars.
    """
    if not several_workers(strategy):
        return logs
    return {name: tf.reshape(value, [1]) for name, value in logs.items()}
