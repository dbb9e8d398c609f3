"""`LambdaScheduler`: anneals λ of the `LSoftmaxDense` layers during `fit`."""

import math
import warnings
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from keras_lsoftmax.layers import LSoftmaxDense
from keras_lsoftmax.layers import find_margin_heads
from keras_lsoftmax.layers import lambda_value
from keras_lsoftmax.sampling import num_sampled
from keras_lsoftmax.schedules import LambdaSchedule

_UNITS = ("step", "epoch")


class LambdaScheduler(keras.callbacks.Callback):
    """Sets λ of the model's `LSoftmaxDense` layers from a schedule.

    λ weights the plain logit in the target logit
    f_y = (λ·x·w_y + ‖x‖‖w_y‖·ψ(θ)) / (1 + λ): a large λ is almost plain
    softmax, 0 is the full margin. The authors anneal λ from 1000 towards 0
    (`keras_lsoftmax.schedules.InverseDecay`), which the paper needs to
    converge beyond MNIST.

    With `unit="step"` every training step uses λ = `schedule(t)`, where
    t = `model.optimizer.iterations + 1` is the 1-based global step: the
    first batch of a run uses t = 1, as in the authors' Caffe code, and
    after n optimizer steps the last batch used λ = `schedule(n)`. For a
    `keras_lsoftmax.schedules.LambdaSchedule` the step computes λ itself,
    inside the compiled train function, from the optimizer's step counter
    (as Keras computes a `LearningRateSchedule`'s learning rate): nothing
    waits on the host, and this works on every backend, in `fit` as in
    custom loops that open a `label_scope`. The callback attaches the
    schedule to the layers when training starts, and it stays attached
    after `fit` (as a learning-rate schedule stays with its optimizer) until
    another `LambdaScheduler` replaces it or `set_lambda` detaches it; while
    attached it overrides the layer's own `lambda_schedule`. Any
    other callable is evaluated on the host with the step as a Python int
    before every batch, which costs a host synchronization per batch.
    The step reads t from the optimizer it applies, so λ follows a new
    optimizer after `compile` and a restored one after
    `keras.saving.load_model`. Because `optimizer.iterations` is saved with
    the model (`.keras` files, `keras.callbacks.BackupAndRestore`), a
    resumed run continues the schedule exactly.

    With `unit="epoch"` it sets λ = `schedule(epoch)` from the host at the
    start of each epoch, with the 0-based epoch index that `fit` reports (as
    `keras.callbacks.LearningRateScheduler`), so `fit(initial_epoch=...)`
    continues it too.

    λ is a variable: changing it never retraces the train function (only
    attaching or detaching a schedule does, once). The logs get
    `lsoftmax_lambda`, the λ of the last step, so it reaches `History` (and
    `keras.callbacks.TensorBoard` or `CSVLogger` when they come after this
    callback in the list).

    Notes:
        - With an optimizer's `gradient_accumulation_steps`, t counts the
          applied updates (`optimizer.iterations`), not the batches: a run
          of batch 8 with 2 accumulation steps logs the λ of the same run
          with batch 16 and no accumulation.
        - With a host-side callable and `compile(steps_per_execution=k)`,
          `fit` calls the batch hooks once per execution, so λ changes
          every k steps. A `LambdaSchedule` changes λ at every step.
        - The schedule may return a Python number, a NumPy value or a scalar
          tensor; the value must be finite and ≥ 0. The callback checks it
          on the host when training starts and at the end of every epoch
          (and, for host-side callables, before every batch): `fit` stops
          with a `ValueError`. Inside the step, an invalid value leaves λ
          at its previous value.

    Args:
        schedule: a `keras_lsoftmax.schedules.LambdaSchedule`, or any
            callable that takes the step (an int) and returns λ.
        unit: `"step"` (default) to set λ before each training batch from
            the global step, or `"epoch"` to set it at the start of each
            epoch from the epoch index.
        layer_name: the name of the one `LSoftmaxDense` to drive. By default
            (None), every `LSoftmaxDense` of the model, nested models and
            layers included, gets the same λ.
        verbose: 0 is quiet, 1 prints λ once per epoch.

    Raises:
        ValueError: when training starts, if the model has no
            `LSoftmaxDense`, if `layer_name` names none of them, or, with
            `unit="step"`, if the model has no optimizer; during training,
            if the schedule returns a value that is not a finite float ≥ 0.

    Example:

    ```python
    schedule = keras_lsoftmax.schedules.InverseDecay(
        base=1000.0, gamma=2.5e-5, power=35.0
    )
    history = model.fit(
        x, y, epochs=10,
        callbacks=[keras_lsoftmax.LambdaScheduler(schedule)],
    )
    history.history["lsoftmax_lambda"]  # λ at the end of each epoch
    ```

    Reference:
        Liu, Wen, Yu, Yang, "Large-Margin Softmax Loss for Convolutional
        Neural Networks", ICML 2016, https://arxiv.org/abs/1612.02295.
    """

    def __init__(
        self,
        schedule: Callable[[int], Any],
        unit: str = "step",
        layer_name: str | None = None,
        verbose: int = 0,
    ):
        super().__init__()
        if not callable(schedule):
            raise ValueError(
                "Received an invalid value for `schedule`, expected a "
                "LambdaSchedule or a callable `step -> float`. "
                f"Received: schedule={schedule!r}"
            )
        if unit not in _UNITS:
            raise ValueError(
                "Received an invalid value for `unit`, expected one of "
                f"{_UNITS}. Received: unit={unit!r}"
            )
        if layer_name is not None and not isinstance(layer_name, str):
            raise ValueError(
                "Received an invalid value for `layer_name`, expected a "
                f"layer name (str) or None. Received: layer_name={layer_name!r}"
            )
        if isinstance(verbose, bool) or verbose not in (0, 1):
            raise ValueError(
                "Received an invalid value for `verbose`, expected 0 or 1. "
                f"Received: verbose={verbose!r}"
            )
        self.schedule = schedule
        self.unit = unit
        self.layer_name = layer_name
        self.verbose = verbose
        self._layers: list[LSoftmaxDense] | None = None

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        self._layers = None  # found again for the new model

    def on_train_begin(self, logs: dict | None = None) -> None:
        layers = self._target_layers()
        in_step = self._in_step()
        iterations = self._optimizer().iterations if in_step else None
        changed = False
        for layer in layers:
            schedule = self.schedule if in_step else None
            changed = changed or layer.lambda_schedule is not schedule
            # Attached again at every fit, so that a custom loop that reads
            # the counter from the heads follows the optimizer compiled now
            # (the train step passes its own optimizer's counter).
            layer.attach_lambda_schedule(schedule, iterations)
        if in_step:
            first = self._global_step() + 1
            self._checked_value(self.schedule(first), first)
        # fit made its train function before this hook: remake it if it
        # was traced with other schedules.
        self.model.make_train_function(force=changed)

    def _in_step(self) -> bool:
        """Whether the step computes λ (else the callback sets it)."""
        return self.unit == "step" and isinstance(self.schedule, LambdaSchedule)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self.unit != "epoch":
            return
        value = self._set_lambda(epoch)
        if self.verbose:
            print(
                f"\nEpoch {epoch + 1}: LambdaScheduler setting lambda to "
                f"{value:.6g}."
            )

    def on_train_batch_begin(
        self, batch: int, logs: dict | None = None
    ) -> None:
        if self.unit != "step" or self._in_step():
            return
        self._set_lambda(self._global_step() + 1)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._in_step():
            step = self._global_step()
            self._checked_value(self.schedule(max(step, 1)), step)
        if logs is not None and "lsoftmax_lambda" in logs:
            value = float(np.asarray(logs["lsoftmax_lambda"]))
        else:
            value = self._current_lambda()
            if logs is not None:
                logs["lsoftmax_lambda"] = value
        if self.verbose and self.unit == "step":
            print(
                f"\nEpoch {epoch + 1}: LambdaScheduler lambda is {value:.6g} "
                f"(step {self._global_step()})."
            )

    def _target_layers(self) -> list[LSoftmaxDense]:
        """The `LSoftmaxDense` layers this callback drives (cached)."""
        if self._layers is not None:
            return self._layers
        if self.model is None:
            raise ValueError(
                "LambdaScheduler has no model: use it in `model.fit(..., "
                "callbacks=[...])` or call `set_model(model)` first."
            )
        found = find_margin_heads(self.model)
        if not found:
            raise ValueError(
                f"LambdaScheduler found no LSoftmaxDense layer in model "
                f"'{self.model.name}', so it has no λ to schedule."
            )
        if self.layer_name is not None:
            names = [layer.name for layer in found]
            selected = [
                layer for layer in found if layer.name == self.layer_name
            ]
            if not selected:
                raise ValueError(
                    f"LambdaScheduler: no LSoftmaxDense layer named "
                    f"'{self.layer_name}' in model '{self.model.name}'. "
                    f"Available LSoftmaxDense layers: {names}"
                )
            if len(selected) > 1:
                raise ValueError(
                    f"LambdaScheduler: {len(selected)} LSoftmaxDense layers "
                    f"are named '{self.layer_name}' in model "
                    f"'{self.model.name}' (in nested models); give them "
                    f"unique names. Available LSoftmaxDense layers: {names}"
                )
            found = selected
        self._layers = found
        return found

    def _optimizer(self) -> Any:
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            raise ValueError(
                "LambdaScheduler(unit='step') reads the step from "
                "`model.optimizer.iterations`, but the model has no "
                "optimizer: compile it first."
            )
        return optimizer

    def _global_step(self) -> int:
        """The number of optimizer steps taken so far."""
        iterations = self._optimizer().iterations
        return int(np.asarray(iterations))

    def _set_lambda(self, at: int) -> float:
        """Evaluates the schedule at `at`, checks it, assigns it; returns it."""
        value = self._checked_value(self.schedule(at), at)
        self._sync_state()
        for layer in self._target_layers():
            layer.set_lambda(value)
        return value

    def _checked_value(self, raw: Any, at: int) -> float:
        try:
            return lambda_value(raw, "λ")
        except ValueError as error:
            raise ValueError(
                f"The λ schedule {self.schedule!r} returned {raw!r} at "
                f"{self.unit} {at}; λ must be a finite float >= 0. λ was "
                "left unchanged."
            ) from error

    def _sync_state(self) -> keras.Model:
        # On JAX, reading `Callback.model` puts the state of the running
        # `fit` back into the variables; without it, a read of λ is stale
        # and a write to it lost.
        return self.model

    def _current_lambda(self) -> float:
        self._sync_state()
        layer = self._target_layers()[0]
        return float(np.asarray(layer.lambda_))


# The logits have collapsed when the epoch's loss is within this fraction of
# log C (every logit equal) in two epochs in a row, after an epoch at least
# `_AWAY` from it: the margin loss approaches log C from above as the logits
# shrink, and a healthy run crosses it at most once.
_COLLAPSED = 1e-3
_AWAY = 0.1


class RunLambdaSchedules(keras.callbacks.Callback):
    """Fits the heads' `lambda_schedule="auto"` to the run; warns of collapse.

    The margin-aware models' `fit` appends it to the callbacks. When
    training starts it resolves "auto" for a run of epochs × steps per
    epoch optimizer updates (divided by the optimizer's
    `gradient_accumulation_steps`), or of unknown length when `fit` does not
    know the steps per epoch. Then, unless a `LambdaScheduler` drives λ or
    the optimizer has already taken steps (a resumed or fine-tuning run), it
    warns about every head with margin > 1 whose λ at the first step is
    below 1: from there the features shrink into the saddle of ψ at
    θ = 90° and the model does not train.

    It also watches the run: when a model with one margin head (m > 1 or
    any other non-identity margin) has a training loss within 0.1% of
    log C, the loss of equal logits for every class, at the end of two
    epochs in a row, after an epoch whose loss was at least 10% away from
    it, it warns once that the logits have collapsed to 0. For a head with
    `sample_rate` r < 1 the level is log S, S = int(r·C) the classes kept
    per step (when S ≥ B; with fewer, the step keeps B and this check does
    not fire). A loss that holds more than that head's cross-entropy
    (other outputs, regularizers, sample weights) does not match either.

    Args:
        scheduled: whether the callbacks of the run include a
            `LambdaScheduler`.
    """

    def __init__(self, scheduled: bool):
        super().__init__()
        self.scheduled = scheduled
        self._moved = False
        self._near = 0

    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
        optimizer = model.optimizer
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        total = None
        if epochs and steps:
            accumulation = optimizer.gradient_accumulation_steps or 1
            total = max(1, (epochs * steps) // accumulation)
        fresh = int(np.asarray(optimizer.iterations)) == 0
        for layer in find_margin_heads(model):
            if layer.target_margin.is_identity:
                continue
            schedule = layer.resolve_auto_schedule(total)
            if self.scheduled or not fresh or not layer.needs_lambda_annealing:
                continue
            first = (
                schedule if isinstance(schedule, float) else schedule(1)
            )
            first = float(np.asarray(first))
            if first < 1.0:
                warnings.warn(
                    f"{type(layer).__name__} '{layer.name}' "
                    f"({layer.target_margin}) "
                    f"starts training with λ={first:.6g}: with λ below 1 "
                    "from the first step the features usually shrink to "
                    "θ = 90° from their class weights and the loss stays "
                    "near log C. Anneal λ from a large value instead: "
                    'leave the default lambda_schedule="auto", pass a '
                    "keras_lsoftmax.schedules.InverseDecay, or use "
                    "keras_lsoftmax.LambdaScheduler.",
                    stacklevel=2,
                )
        # fit made its train function before this hook: remake it if a
        # schedule was resolved.
        model.make_train_function()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        heads = [
            layer
            for layer in find_margin_heads(self.model)
            if not layer.target_margin.is_identity
        ]
        if len(heads) != 1 or "loss" not in logs:
            return
        head = heads[0]
        symbol, classes, kept = "C", head.units, f"C = {head.units}"
        if head.sample_rate < 1:
            # Independent of the batch size B when int(r·C) ≥ B.
            classes = num_sampled(head.units, head.sample_rate, 1)
            symbol, kept = "S", f"S = {classes} classes kept per step"
        level = math.log(classes)
        gap = abs(float(logs["loss"]) - level) / level
        self._moved = self._moved or gap >= _AWAY
        self._near = self._near + 1 if self._moved and gap <= _COLLAPSED else 0
        if self._near != 2:
            return
        theta = logs.get("lsoftmax_theta")
        angle = "" if theta is None else f", θ = {float(theta):.1f}°"
        warnings.warn(
            f"{type(head).__name__} '{head.name}' ({head.target_margin}): "
            f"the training loss has been within 0.1% of log {symbol} = "
            f"{level:.4f} ({kept}), the loss of equal logits for every "
            f"class, for 2 epochs (epoch {epoch + 1}: "
            f"{float(logs['loss']):.4f}{angle}). The logits have shrunk to "
            "about 0: the margin is more than the features meet, and "
            f"training does not recover from there. {_remedy(head)}",
            stacklevel=2,
        )


def _remedy(head: Any) -> str:
    if head.needs_lambda_annealing:
        # 10 is the floor measured to train where 2 collapsed; a head that
        # collapsed at a higher floor gets the same step up, 5 times it.
        floor = max(10.0, 5.0 * head.auto_lambda_minimum)
        return (
            f"Keep a higher λ: for instance lambda_minimum={floor:g} with "
            'the default lambda_schedule="auto", or a LambdaSchedule with '
            f"minimum={floor:g} (see docs/choosing-m-and-lambda.md)."
        )
    return "Use a smaller margin, or anneal λ from a large value."


__all__ = ["LambdaScheduler"]
