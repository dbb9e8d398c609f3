"""The margin train and test steps on TensorFlow (`tf.GradientTape`)."""

from typing import Any

import keras
import tensorflow as tf

from keras_lsoftmax.label_routing import model_label_scope
from keras_lsoftmax.margin_step import check_targets
from keras_lsoftmax.margin_step import margin_values
from keras_lsoftmax.margin_step import optimizer_step
from keras_lsoftmax.margin_step import plain_predictions
from keras_lsoftmax.margin_step import sampled_targets
from keras_lsoftmax.margin_step import update_metrics


class MarginTrainer:
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


def _true_mean(loss: tf.Tensor) -> tf.Tensor:
    # Keras losses divide by the number of replicas; report the true mean.
    return loss * tf.distribute.get_replica_context().num_replicas_in_sync


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
