"""The margin train and test steps on PyTorch (`loss.backward()`)."""

import warnings
from typing import Any

import keras
import torch

from keras_lsoftmax.backend.torch.compat import public_optimizers
from keras_lsoftmax.label_routing import model_label_scope
from keras_lsoftmax.margin_step import check_targets
from keras_lsoftmax.margin_step import margin_values
from keras_lsoftmax.margin_step import optimizer_step
from keras_lsoftmax.margin_step import plain_predictions
from keras_lsoftmax.margin_step import sampled_targets
from keras_lsoftmax.margin_step import update_metrics


class TorchMarginTrainer:
    """`train_step` and `test_step` of `MarginTrainingMixin` on PyTorch."""

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        check_targets(y)
        scope = model_label_scope(self, x, y, optimizer_step(self))
        with scope:
            y_pred = self(x, training=True)
        y = sampled_targets(y, y_pred, scope.records)
        self.zero_grad()
        loss = self.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        scaled_loss = self.optimizer.scale_loss(loss)
        variables = self.trainable_weights[:]
        if variables:
            scaled_loss.backward()
            with torch.no_grad():
                self.optimizer.apply(
                    [v.value.grad for v in variables], variables
                )
        else:
            warnings.warn("The model does not have any trainable weights.")
        # After backward nothing needs the logits' graph any more.
        with torch.no_grad():
            metrics_pred = plain_predictions(y_pred, scope.records)
            return update_metrics(
                self,
                x,
                y,
                metrics_pred,
                sample_weight,
                loss.detach(),
                margin_values(self, scope.records),
            )

    def test_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        check_targets(y)
        with model_label_scope(self, x, y) as scope:
            y_pred = self(x, training=False)
        loss = self.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False
        )
        return update_metrics(
            self,
            x,
            y,
            y_pred,
            sample_weight,
            loss,
            margin_values(self, scope.records),
        )

    def get_compile_config(self) -> dict[str, Any] | None:
        """Keras's compile config, with optimizers named by public class.

        Keras saves an optimizer of the PyTorch backend under its backend
        module, so loading the file on another backend would import PyTorch
        there (see `compat.public_optimizers`). The public class
        (`keras.optimizers.Adam`) has the same config.
        """
        config = super().get_compile_config()
        return None if config is None else public_optimizers(config)
