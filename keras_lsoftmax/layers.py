"""`MarginDense`, the class-weight layer of every head, and `LSoftmaxDense`."""

import dataclasses
import math
import threading
from typing import Any

import keras
import numpy as np

from keras_lsoftmax import ops
from keras_lsoftmax.backend import ops as backend_ops
from keras_lsoftmax.backend.common import MIN_SQUARED_NORM
from keras_lsoftmax.initializers import TransposedInitializer
from keras_lsoftmax.label_scope import HeadRecord
from keras_lsoftmax.label_scope import current_label_scope
from keras_lsoftmax.margins import AngularMargin
from keras_lsoftmax.margins import TargetMargin
from keras_lsoftmax.margins import check_nonnegative
from keras_lsoftmax.sampling import check_sample_rate
from keras_lsoftmax.sampling import check_shards
from keras_lsoftmax.sampling import kept_rows
from keras_lsoftmax.sampling import sample_classes
from keras_lsoftmax.schedules import LambdaSchedule
from keras_lsoftmax.schedules import auto_schedule

# Per thread, as the label scopes: under tf.distribute every replica calls
# the layers in a thread of its own.
_OWN_CALLS = threading.local()


def lambda_value(value: Any, name: str) -> float:
    """`value` as a Python float λ, or a `ValueError` naming `name`.

    Accepts a Python or NumPy number, an array or eager tensor holding one
    number, or a Keras variable; the value must be finite and >= 0.
    """
    message = (
        f"Received an invalid value for `{name}`, expected a finite float "
        f">= 0 (a number, or an array or tensor holding one). Received: "
        f"{name}={value!r}"
    )
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(message)
    try:
        array = np.asarray(keras.ops.convert_to_numpy(value))
    except Exception as error:  # symbolic tensors, strings, objects
        raise ValueError(message) from error
    if array.size != 1 or array.dtype.kind not in "iuf":
        raise ValueError(message)
    number = float(array.reshape(()))
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(message)
    return number


@keras.saving.register_keras_serializable(package="keras_lsoftmax")
class MarginDense(keras.layers.Layer):
    """Class weights whose labelled logit gets a margin: the family's head.

    Every head of the package is a `MarginDense` that states its formula:
    features x and class weights w_j, normalised where the formula says so
    (`scale`, `normalize_weights`), give the plain logits
    ‖x‖‖w_j‖cos θ_j; in training, given labels, the logit of each sample's
    labelled class y becomes

        f_y = ‖x‖‖w_y‖·(λ·cos θ_y + φ(cos θ_y)) / (1 + λ)

    for the head's `target_margin` φ (a `keras_lsoftmax.margins.
    TargetMargin`). Otherwise (inference, evaluation, or no labels) the
    layer returns the plain logits, so `predict` needs no labels. Feed its
    output to a softmax cross-entropy with `from_logits=True`. The gradient
    is exact (see `keras_lsoftmax.ops`).

    The kernel holds one row of class weights per class, shape
    (units · sub_centers, input_dim), as in the authors' Caffe layer and
    `torch.nn.Linear` (`keras.layers.Dense` stores the transpose); with
    sub-centres, rows k·… of class j are rows j·K to j·K + K − 1. A training
    step then reads and updates only the B contiguous rows of the labelled
    classes. An initializer sees the shape of a Dense kernel,
    (input_dim, rows), so its fan-in and fan-out mean what they mean for
    Dense; a constraint or regularizer sees the stored kernel, so
    `keras.constraints.UnitNorm(axis=1)` keeps each class weight at unit
    norm. The layer has no bias.

    λ (`lambda_`) is a float32, non-trainable variable. Each train step of
    the margin-aware models sets it from `lambda_schedule`, evaluated at
    the step counter of the optimizer (as Keras evaluates a learning-rate
    schedule). A `keras_lsoftmax.LambdaScheduler` overrides the layer's
    schedule, and `set_lambda` replaces it with a constant; changing a
    constant λ never retraces. The math always runs in float32 (float64 for
    float64 inputs), and the logits come out in that dtype, also under a
    mixed-precision policy.

    Labels outside [0, units) raise an error wherever the backend checks at
    run time: TensorFlow in eager and graph mode (`InvalidArgumentError`),
    PyTorch in eager mode and JAX outside `jit` (`ValueError`). Compiled
    steps do not report them (TensorFlow under XLA, `jit_compile=True`, the
    Keras default on GPU; JAX under `jit`, the Keras default on JAX, where
    the gather clamps them; `torch.compile`): check them in the input
    pipeline, or debug with `run_eagerly=True`.

    Labels reach the layer either as the `labels` call argument or, inside
    `keras_lsoftmax.Sequential` / `keras_lsoftmax.Model` training, from the
    `label_scope` their `train_step` opens (which routes each output's labels
    to the head call that gives it, and passes the `ignore_class` of a
    compiled `SparseCategoricalCrossentropy`: rows with that label get no
    margin and no range check). Wrapped in `keras.layers.TimeDistributed`,
    which runs it one time step at a time, the layer cannot match a scope's
    labels to its rows: it raises in training and in `evaluate`, and infers
    as usual.

    With `sample_rate=r` < 1 (Partial FC, see `docs/partial-fc.md`), each
    training step with labels keeps the classes labelled in the batch plus
    random negatives, S = min(C, max(int(r·C), B)) classes in all (under
    data parallelism, the classes of the global batch, on every replica), and
    returns logits (B, S) over those classes only; the margin-aware
    models hand the loss and the training metrics the labels' positions
    among them. Only the kept rows of the kernel get a gradient. Inference
    and evaluation use all classes. Sparse labels only.

    Args:
        units: positive int, the number of classes C.
        target_margin: a `keras_lsoftmax.margins.TargetMargin`, the φ of
            the target cosine.
        scale: float > 0 or None. If set, the features are normalised and
            multiplied by `scale` (the s of CosFace and ArcFace), so the
            plain logits are s·cos θ_j (times ‖w_j‖).
        normalize_weights: bool. If True, the class weights are scaled to
            unit norm inside the forward pass, with the exact gradient
            through that scaling; the stored kernel is never changed in
            place.
        sub_centers: positive int K, the weights kept per class: a class's
            logit is that of its closest sub-centre, and the margin applies
            to the closest sub-centre of the labelled class.
        lambda_schedule: what the train steps compute λ from, as
            `keras.optimizers.Optimizer` takes a learning-rate schedule:
            a float ≥ 0 for a constant λ (default 0: the margin φ itself),
            a `keras_lsoftmax.schedules.LambdaSchedule` evaluated at
            `optimizer.iterations + 1`, or `"auto"`, which becomes, when
            `fit` of `keras_lsoftmax.Sequential` / `Model` starts, the
            annealing of `keras_lsoftmax.schedules.auto_schedule` fitted to
            the length of that run (floored at `auto_lambda_minimum`); the
            layer then keeps and saves that schedule, so a later `fit` or a
            model loaded from a `.keras` file continues it. A custom loop
            must open `label_scope(y, step=optimizer.iterations)` for a
            schedule to know the step.
        initial_lambda: float ≥ 0 or None, a constant λ: with
            `lambda_schedule="auto"` it stands for
            `lambda_schedule=initial_lambda`. It must equal a constant
            `lambda_schedule`, and cannot go with a `LambdaSchedule`.
        lambda_minimum: float ≥ 0 or None, the floor of λ under
            `lambda_schedule="auto"` (None: the head's default,
            `default_lambda_minimum()`). Only with `"auto"`: any other schedule
            states its own floor.
        kernel_initializer: initializer for the kernel, called with the
            Dense shape (input_dim, rows); its result is stored transposed.
        kernel_regularizer: regularizer for the kernel (rows, input_dim).
        kernel_constraint: constraint for the kernel (rows, input_dim).
        sample_rate: float in (0, 1], the Partial-FC sample rate r
            (default 1: every class, no sampling). Train a sampling head
            with `keras_lsoftmax.optimizers.LazyAdam` or `LazySGD`, which
            update the kept rows only (docs/partial-fc.md).
        seed: optional int, the seed of the layer's
            `keras.random.SeedGenerator` for the sampled negatives (with
            None, drawn from Keras's global seed, which
            `keras.utils.set_random_seed` sets). Used when
            `sample_rate` < 1.
        **kwargs: other `keras.layers.Layer` arguments (`name`, `dtype`,
            `trainable`, ...).

    Call arguments:
        inputs: float tensor (B, D), the features.
        labels: optional labels for the margin, sparse (B,) or (B, 1)
            integers, or one-hot (B, units) (not with `sample_rate` < 1).
        training: bool. The margin applies only when True and labels are
            known.

    Returns:
        Logits of shape (B, units); (B, S) in training with labels and
        `sample_rate` < 1.

    Example:

    ```python
    # insightface's combined margin s·(cos(θ + 0.3) − 0.2) with s = 30 is
    # a margin of its own; here ArcFace with a smaller scale.
    head = keras_lsoftmax.MarginDense(
        10, target_margin=keras_lsoftmax.margins.ArcMargin(0.3), scale=30.0,
        normalize_weights=True,
    )
    ```
    """

    def __init__(
        self,
        units: int,
        target_margin: TargetMargin,
        scale: float | None = None,
        normalize_weights: bool = False,
        sub_centers: int = 1,
        lambda_schedule: Any = 0.0,
        initial_lambda: float | None = None,
        lambda_minimum: float | None = None,
        kernel_initializer: Any = "glorot_uniform",
        kernel_regularizer: Any = None,
        kernel_constraint: Any = None,
        sample_rate: float = 1.0,
        seed: int | None = None,
        **kwargs: Any,
    ):
        _check_positive_int(units, "units")
        sample_rate = check_sample_rate(sample_rate)
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int)
        ):
            raise ValueError(
                "Received an invalid value for `seed`, expected an int or "
                f"None. Received: seed={seed!r}"
            )
        if isinstance(target_margin, dict):
            target_margin = keras.saving.deserialize_keras_object(target_margin)
        if not isinstance(target_margin, TargetMargin):
            raise ValueError(
                "Received an invalid value for `target_margin`, expected a "
                "keras_lsoftmax.margins.TargetMargin. Received: "
                f"target_margin={target_margin!r}"
            )
        if scale is not None:
            scale = check_nonnegative(scale, "scale")
            if scale == 0.0:
                raise ValueError(
                    "Received an invalid value for `scale`, expected a "
                    f"float > 0 or None. Received: scale={scale!r}"
                )
        if not isinstance(normalize_weights, bool):
            raise ValueError(
                "Received an invalid value for `normalize_weights`, expected "
                f"a bool. Received: normalize_weights={normalize_weights!r}"
            )
        _check_positive_int(sub_centers, "sub_centers")
        if initial_lambda is not None:
            initial_lambda = lambda_value(initial_lambda, "initial_lambda")
        schedule = _own_schedule(lambda_schedule, initial_lambda)
        if lambda_minimum is not None:
            lambda_minimum = _auto_floor(lambda_minimum, schedule)
        # The layer casts for itself: the margin needs float32 even when the
        # policy computes in float16, and the kernel must not be autocast.
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        self.units = units
        self.target_margin = target_margin
        self.scale = scale
        self.normalize_weights = normalize_weights
        self.sub_centers = sub_centers
        self.sample_rate = sample_rate
        self.seed = seed
        # Only a sampling head has the generator (a variable of its own),
        # so the variables of a head with sample_rate=1 are unchanged.
        self.seed_generator = (
            keras.random.SeedGenerator(seed) if sample_rate < 1 else None
        )
        self.initial_lambda = schedule if isinstance(schedule, float) else 0.0
        self.lambda_minimum = lambda_minimum
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.input_spec = keras.layers.InputSpec(ndim=2)
        # λ exists before `build` so a scheduler can set it at any time.
        self.lambda_ = self.add_weight(
            name="lambda",
            shape=(),
            dtype="float32",
            initializer=keras.initializers.Constant(self.initial_lambda),
            trainable=False,
            autocast=False,
            aggregation="only_first_replica",
        )
        # A float (constant λ, held in `lambda_`), a LambdaSchedule, or
        # "auto" until a run resolves it (`resolve_auto_schedule`).
        self._own_schedule = schedule
        self._lambda_schedule = None

    @property
    def auto_lambda_minimum(self) -> float:
        """The floor of λ under `lambda_schedule="auto"`.

        `lambda_minimum` when given, else the head's default for its
        `units` (`default_lambda_minimum`).
        """
        if self.lambda_minimum is not None:
            return self.lambda_minimum
        return self.default_lambda_minimum()

    def default_lambda_minimum(self) -> float:
        """The floor of the `"auto"` schedule without `lambda_minimum`: 2."""
        return 2.0

    @property
    def needs_lambda_annealing(self) -> bool:
        """Whether a constant small λ keeps this head from training.

        True for the multiplicative angular margin ψ with m > 1 (L-Softmax,
        SphereFace): from λ < 1 at the first step the features shrink into
        the saddle of ψ at θ = 90°. `fit` warns about such a start.
        """
        margin = self.target_margin
        return isinstance(margin, AngularMargin) and margin.m > 1

    def build(self, input_shape: tuple) -> None:
        if len(input_shape) != 2 or input_shape[-1] is None:
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape (batch_size, "
                "features) with a known feature size. Received: inputs with "
                "shape "
                f"{tuple(input_shape)}"
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.units * self.sub_centers, input_shape[-1]),
            initializer=TransposedInitializer(self.kernel_initializer),
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
            autocast=False,
        )
        self.input_spec = keras.layers.InputSpec(
            ndim=2, axes={-1: input_shape[-1]}
        )

    def set_lambda(self, value: Any) -> None:
        """Assigns λ after checking that it is a finite float ≥ 0.

        Replaces the layer's `lambda_schedule` by the constant `value` and
        detaches a schedule attached by `LambdaScheduler`, so λ stays at
        `value` in the next training steps.

        Args:
            value: a Python or NumPy number, or an array or eager tensor
                holding one number (what a `LambdaSchedule` returns). On an
                invalid value, λ keeps its previous value.
        """
        value = lambda_value(value, "value")
        self.lambda_.assign(value)
        self._own_schedule = value
        self._lambda_schedule = None

    def call(
        self, inputs: Any, labels: Any = None, training: bool | None = None
    ) -> Any:
        scope = current_label_scope()
        if scope is not None and not (training or scope.inference_labels):
            # Inference needs no labels, and may run on another batch than
            # the one the scope holds labels for.
            scope = None
        ignore_class = None
        if labels is None and scope is not None:
            self._check_own_call()
            labels, ignore_class = scope.labels_for(self, inputs)
        if labels is None and training:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' was called with "
                "training=True but without labels, so it cannot apply "
                "the margin. Train it inside keras_lsoftmax.Sequential "
                "or keras_lsoftmax.Model (their train_step passes the "
                "labels), call it with labels=..., or open a "
                "keras_lsoftmax.label_scope(labels) in a custom loop."
            )
        # Outside training only a label_scope wants the per-sample records.
        if labels is None or (not training and scope is None):
            inputs, kernel = self._operands(inputs, self.kernel)
            logits = ops.plain_logits(inputs, kernel)
            if self.normalize_weights:
                logits = logits * _inverse_norms(kernel)[None, :]
            return self._per_class(logits)
        sampling = bool(training) and self.sample_rate < 1
        labels, valid = self._sparse_labels(labels, ignore_class, sampling)
        labels = ops.check_labels(labels, self.units, inputs)
        kernel, sampled = self.kernel, None
        if sampling:
            shards = self._row_shards()
            check_shards(self.units, shards, self.name)
            sampled = sample_classes(
                labels,
                self.units,
                self.sample_rate,
                self.seed_generator,
                self.sub_centers,
                shards,
            )
            # Only the kept rows enter the step, so only they get a gradient.
            kernel = kept_rows(kernel, sampled.rows, shards)
            labels = sampled.labels
        inputs, kernel = self._operands(inputs, kernel)
        if training:
            margin, lam = self.target_margin, self._training_lambda(scope)
        else:
            margin, lam = 1, self.lambda_
        rows = self._target_rows(inputs, kernel, labels)
        outputs, plain_target, cos = ops.margin_logits(
            inputs, kernel, rows, margin, lam, valid, self.normalize_weights
        )
        outputs = self._per_class(outputs, labels, rows)
        if scope is not None:
            scope.record(
                HeadRecord(
                    self,
                    outputs,
                    labels,
                    plain_target,
                    cos,
                    valid,
                    keras.ops.convert_to_tensor(lam),
                    *_sampled_targets(sampled, labels, valid, ignore_class),
                )
            )
        return outputs

    def _row_shards(self) -> int:
        """The devices the current Keras distribution splits the kernel's
        rows over (1 without one, or with the rows replicated)."""
        distribution = keras.distribution.distribution()
        if distribution is None:
            return 1
        layout = distribution.get_variable_layout(self.kernel)
        axis = layout.axes[0] if layout is not None else None
        if axis is None:
            return 1
        mesh = layout.device_mesh
        return int(mesh.shape[mesh.axis_names.index(axis)])

    def _operands(self, inputs: Any, kernel: Any) -> tuple[Any, Any]:
        """The features and class weights (rows of `kernel`) the op
        multiplies.

        The features are normalised and scaled as the head's formula says.
        Normalised class weights are not computed here: the op scales the
        logits' columns by 1/‖w_j‖ (`normalize_weights`), B·C products
        instead of a normalised copy of the (C, D) kernel. With either
        normalisation both are cast to the op's compute dtype, so that the
        norms are exact under a mixed-precision policy too.
        """
        kernel = keras.ops.convert_to_tensor(kernel)
        if self.scale is None and not self.normalize_weights:
            return inputs, kernel
        dtype = ops.compute_dtype(inputs.dtype, kernel.dtype)
        inputs = keras.ops.cast(inputs, dtype)
        kernel = keras.ops.cast(kernel, dtype)
        if self.scale is not None:
            inputs = _unit_rows(inputs) * self.scale
        return inputs, kernel

    def _target_rows(self, inputs: Any, kernel: Any, labels: Any) -> Any:
        """The kernel row of each label: its closest sub-centre.

        With one centre per class, the labels themselves. With K
        sub-centres, row y·K + k of the sub-centre k of class y whose logit
        (so whose cosine) is the largest.
        """
        if self.sub_centers == 1:
            return labels
        k = self.sub_centers
        centres = keras.ops.take(
            keras.ops.reshape(
                keras.ops.stop_gradient(kernel), (-1, k, kernel.shape[-1])
            ),
            labels,
            axis=0,
        )
        if self.normalize_weights:
            centres = _unit_rows(centres)
        logits = keras.ops.einsum(
            "bd,bkd->bk", keras.ops.stop_gradient(inputs), centres
        )
        closest = keras.ops.cast(keras.ops.argmax(logits, axis=-1), "int32")
        return labels * k + closest

    def _per_class(
        self, logits: Any, labels: Any = None, rows: Any = None
    ) -> Any:
        """Logits per class from the logits of every kernel row.

        With K sub-centres, each class takes its largest sub-centre logit,
        except the labelled class, which takes the (margin) logit of the
        sub-centre in `rows`. The classes are those of the kernel rows the
        op saw: all of them, or the kept ones of a sampling step. On
        TensorFlow and PyTorch a training step gathers the logits at each
        class's chosen sub-centre, so the gradient reaches that one (the
        first of equal ones); `max` would share it among equal ones. On
        JAX it is `max` (see `GATHER_SUB_CENTRES` in the backend's ops).
        """
        if self.sub_centers == 1:
            return logits
        k = self.sub_centers
        classes = keras.ops.shape(logits)[1] // k
        grouped = keras.ops.reshape(logits, (-1, classes, k))
        if labels is None:
            return keras.ops.max(grouped, axis=-1)
        ids = keras.ops.arange(classes, dtype=labels.dtype)
        is_label = keras.ops.equal(ids[None, :], labels[:, None])
        if not backend_ops.GATHER_SUB_CENTRES:
            best = keras.ops.max(grouped, axis=-1)
            target = keras.ops.take_along_axis(logits, rows[:, None], axis=1)
            return keras.ops.where(is_label, target, best)
        # 64-bit: Keras's argmax is int32, and the flat index below reaches
        # B·C·K, which can pass 2³¹ (and would wrap to other logits).
        chosen = keras.ops.cast(
            keras.ops.argmax(keras.ops.stop_gradient(grouped), axis=-1),
            "int64",
        )
        labelled = keras.ops.cast(rows - labels * k, chosen.dtype)
        chosen = keras.ops.where(is_label, labelled[:, None], chosen)
        # A gather, whose gradient is one scatter, in place of `max`, whose
        # gradient takes some five passes over the (B, C, K) logits, and of
        # a `where` for the labelled class. At C = 10 000, K = 3 on 2 CPU
        # cores a step takes 0.99-1.29 times a Dense step with the same
        # (C·K, D) kernel on PyTorch and under XLA, against 1.09-2.04 with
        # `max`; TensorFlow without XLA, 1.08-1.43 against 1.18-1.34. A
        # flat gather: TensorFlow's `take_along_axis` is slower.
        columns = keras.ops.arange(classes, dtype=chosen.dtype)[None, :] * k
        batch = keras.ops.shape(logits)[0]
        starts = keras.ops.arange(batch, dtype=chosen.dtype) * (classes * k)
        flat = starts[:, None] + columns + chosen
        return keras.ops.take(keras.ops.reshape(logits, (-1,)), flat)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._own_call(super().__call__, *args, **kwargs)

    def stateless_call(self, *args: Any, **kwargs: Any) -> Any:
        return self._own_call(super().stateless_call, *args, **kwargs)

    def _own_call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        """`method(*args, **kwargs)`, marked as a call of this layer itself."""
        calls = _own_calls()
        calls.append(id(self))
        try:
            return method(*args, **kwargs)
        finally:
            calls.pop()

    def _check_own_call(self) -> None:
        """Raises if another layer runs `call` (as `TimeDistributed` does).

        Such a wrapper calls `call` on slices of its inputs, one time step
        at a time, so the rows of the scope's labels are not those of the
        inputs: labels (batch, time) would be read as one-hot when
        time == units.
        """
        if id(self) not in _own_calls():
            raise ValueError(
                f"{type(self).__name__} '{self.name}' was run through its "
                "`call` "
                "method by another layer (as keras.layers.TimeDistributed "
                "does, one time step at a time), so the labels of the "
                "label_scope (or of fit and evaluate) do not match its "
                "inputs row for row. To give every time step its own label, "
                "apply the head to the features reshaped to "
                "(batch * time, features), with the labels reshaped to "
                "(batch * time,)."
            )

    def _training_lambda(self, scope: Any) -> Any:
        """λ for this training step, from the schedule in force.

        A schedule attached by `LambdaScheduler` wins over the layer's own
        `lambda_schedule`. The step computes λ = schedule(step + 1) itself
        from the step the label scope carries (the optimizer's counter in a
        train step), so nothing waits on the host; without one, an attached
        schedule reads the counter attached with it, and the layer's own
        schedule raises, since no counter is known. Called with `labels=`
        outside a label scope, the layer's own schedule is not evaluated:
        λ is `lambda_` (`initial_lambda` until a step or `set_lambda` sets
        it). A value that is not >= 0 (NaN included) leaves λ unchanged;
        `LambdaScheduler` reports it at the end of the epoch. λ = ∞ is
        allowed: it gives the plain logits.
        """
        attached = self._lambda_schedule
        own = self._own_schedule
        # With margin 1 the layer is Dense whatever λ is.
        if self.target_margin.is_identity or (
            attached is None and isinstance(own, float)
        ):
            return self.lambda_
        step = getattr(scope, "step", None)
        if attached is not None:
            schedule = attached.schedule
            if step is None:
                step = attached.iterations
        elif scope is None:
            # Called with `labels=` outside any train step or label_scope.
            return self.lambda_
        else:
            if step is None:
                raise ValueError(
                    f"{type(self).__name__} '{self.name}' computes λ from its "
                    f"lambda_schedule={own!r} at the optimizer's step, but "
                    "the label_scope gives no step. Open it as "
                    "`keras_lsoftmax.label_scope(y, step=optimizer."
                    "iterations)`, or give the layer a constant λ "
                    "(`lambda_schedule=<float>` or `set_lambda`)."
                )
            schedule = self.resolve_auto_schedule(None)
        value = schedule(keras.ops.cast(step, "int32") + 1)
        value = keras.ops.cast(value, "float32")
        value = keras.ops.where(
            value >= 0.0, value, keras.ops.convert_to_tensor(self.lambda_)
        )
        self.lambda_.assign(value)
        return value

    def resolve_auto_schedule(self, total_steps: int | None) -> Any:
        """Fixes `lambda_schedule="auto"` for a run of `total_steps` steps.

        The margin-aware models' `fit` calls it when training starts, with
        epochs × steps per epoch (in optimizer updates), or None when the
        length is unknown; a train step outside `fit` resolves it with None.
        Once resolved, the concrete schedule is what the layer uses, saves
        and continues in later runs; a resolved or explicit schedule is
        left as it is.

        Args:
            total_steps: int ≥ 1, or None (see
                `keras_lsoftmax.schedules.auto_schedule`).

        Returns:
            The layer's own schedule after resolution: a `LambdaSchedule`,
            or a float for a constant λ.
        """
        if isinstance(self._own_schedule, str):
            self._own_schedule = auto_schedule(
                total_steps, minimum=self.auto_lambda_minimum
            )
        return self._own_schedule

    def attach_lambda_schedule(self, schedule: Any, iterations: Any) -> None:
        """Makes each training step set λ = `schedule(iterations + 1)`.

        Called by `keras_lsoftmax.LambdaScheduler`; `set_lambda` detaches
        the schedule. A train function traced before the change must be
        rebuilt to see it (the margin-aware models do so by themselves).

        Args:
            schedule: a `keras_lsoftmax.schedules.LambdaSchedule`, or None
                to detach.
            iterations: the optimizer's step counter variable (ignored when
                `schedule` is None).
        """
        self._lambda_schedule = (
            None if schedule is None else _AttachedSchedule(schedule, iterations)
        )

    @property
    def lambda_schedule(self) -> Any:
        """What the training steps compute λ from.

        The `LambdaSchedule` attached by `LambdaScheduler` if any, else the
        layer's own: a `LambdaSchedule`, `"auto"` before a run resolves it,
        or None for a constant λ (the value of `lambda_`).
        """
        attached = self._lambda_schedule
        if attached is not None:
            return attached.schedule
        own = self._own_schedule
        return None if isinstance(own, float) else own

    def _sparse_labels(
        self, labels: Any, ignore_class: int | None, sampling: bool = False
    ) -> tuple[Any, Any]:
        """Sparse labels (B,) and, given `ignore_class`, the valid-row mask."""
        labels = keras.ops.convert_to_tensor(labels)
        shape = tuple(labels.shape)
        if len(shape) == 2 and shape[-1] == 1:
            labels = keras.ops.squeeze(labels, axis=-1)
        elif len(shape) == 2 and shape[-1] == self.units and sampling:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' samples classes "
                f"(sample_rate={self.sample_rate}), so its training outputs "
                "cover only the kept classes and one-hot labels over all "
                f"{self.units} classes cannot go with them. Received: labels "
                f"with shape {shape}. Train with sparse class ids (B,) and "
                "keras.losses.SparseCategoricalCrossentropy."
            )
        elif len(shape) == 2 and shape[-1] == self.units:
            labels = keras.ops.cast(keras.ops.argmax(labels, axis=-1), "int32")
        elif len(shape) != 1:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' expects labels of shape "
                f"(batch_size,) or (batch_size, 1) with class ids, or "
                f"(batch_size, {self.units}) one-hot. Received: labels with "
                f"shape {shape}"
            )
        if "float" in keras.backend.standardize_dtype(labels.dtype):
            labels = keras.ops.cast(labels, "int32")
        if ignore_class is None:
            return labels, None
        # As Keras's sparse cross-entropy does: an ignored row takes class
        # 0, and its 0 in `valid` removes its margin.
        ignored = keras.ops.equal(labels, ignore_class)
        labels = keras.ops.where(ignored, keras.ops.zeros_like(labels), labels)
        return labels, 1.0 - keras.ops.cast(ignored, "float32")

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (*tuple(input_shape)[:-1], self.units)

    def compute_output_spec(
        self, inputs: Any, labels: Any = None, training: bool | None = None
    ) -> keras.KerasTensor:
        dtype = ops.compute_dtype(inputs.dtype, self.variable_dtype)
        return keras.KerasTensor((inputs.shape[0], self.units), dtype)

    def get_config(self) -> dict[str, Any]:
        own = self._own_schedule
        if isinstance(own, LambdaSchedule):
            own = keras.saving.serialize_keras_object(own)
        config = {
            "units": self.units,
            **self._formula_config(),
            "lambda_schedule": own,
            # Once "auto" is resolved, its schedule holds the floor.
            "lambda_minimum": (
                self.lambda_minimum if isinstance(own, str) else None
            ),
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer
            ),
            "kernel_regularizer": keras.regularizers.serialize(
                self.kernel_regularizer
            ),
            "kernel_constraint": keras.constraints.serialize(
                self.kernel_constraint
            ),
            "sample_rate": self.sample_rate,
            "seed": self.seed,
        }
        return {**super().get_config(), **config}

    def _formula_config(self) -> dict[str, Any]:
        """The constructor arguments that state the head's formula."""
        return {
            "target_margin": keras.saving.serialize_keras_object(
                self.target_margin
            ),
            "scale": self.scale,
            "normalize_weights": self.normalize_weights,
            "sub_centers": self.sub_centers,
        }


@keras.saving.register_keras_serializable(package="keras_lsoftmax")
class LSoftmaxDense(MarginDense):
    """Dense class weights whose labelled logit gets the L-Softmax margin.

    In training, given labels, the logit of each sample's labelled class y
    becomes the margin logit

        f_y = (λ·x·w_y + ‖x‖‖w_y‖·ψ(θ)) / (1 + λ),   cos θ = x·w_y / (‖x‖‖w_y‖)

    with ψ(θ) = (−1)^k cos(mθ) − 2k for θ ∈ [kπ/m, (k+1)π/m]; every other
    logit stays `x @ kernelᵀ`. Otherwise (inference, evaluation, or no
    labels) it returns the plain logits `x @ kernelᵀ`, so `predict` needs no
    labels.
    Feed its output to a softmax cross-entropy with `from_logits=True`.

    The layer has no bias, as in the paper. By default
    (`lambda_schedule="auto"`) λ anneals as in the authors' code, from about
    1000 (near plain softmax) to a floor over the first 30% of the run: 2 up
    to 10 classes, 10 for more (see `keras_lsoftmax.schedules.auto_schedule`
    and `default_lambda_minimum`); a constant small λ from
    the first step does not train (the features shrink into the saddle of ψ
    at θ = 90° and the loss stays near log C), and `fit` warns about it.
    Labels, λ, the kernel layout, dtypes and label checks work as described
    in `keras_lsoftmax.MarginDense`.

    Args:
        units: positive int, the number of classes C.
        margin: positive int, the paper's m. 1 is plain softmax; the paper
            uses 2, 3 and 4.
        initial_lambda: float ≥ 0 or None, a constant λ: with the default
            `lambda_schedule="auto"` it stands for
            `lambda_schedule=initial_lambda` (0 is the pure L-Softmax; large
            values approach plain softmax). It must equal a constant
            `lambda_schedule`, and cannot go with a `LambdaSchedule`.
        normalize_weights: bool. If True, the class weights are scaled to
            unit norm inside the forward pass (the A-Softmax / SphereFace
            variant; `keras_lsoftmax.SphereFaceDense` is that head with its
            authors' λ floor) and the gradient is the exact one through
            that scaling; the stored kernel is never changed in place.
        kernel_initializer: initializer for the kernel, called with the
            Dense shape (input_dim, units); its result is stored transposed.
        kernel_regularizer: regularizer for the kernel (units, input_dim).
        kernel_constraint: constraint for the kernel (units, input_dim).
        lambda_schedule: `"auto"` (default), a float ≥ 0 for a constant λ,
            or a `keras_lsoftmax.schedules.LambdaSchedule` (see
            `keras_lsoftmax.MarginDense`). Ignored when `margin=1`.
        lambda_minimum: float ≥ 0 or None, the floor of the `"auto"`
            schedule (None: 2 up to 10 classes, 10 for more). Beyond 10
            classes the margin at λ = 2 can be more than the features
            meet, and the logits shrink to 0 (see
            docs/choosing-m-and-lambda.md).
        **kwargs: `sample_rate` and `seed` (Partial-FC class sampling, as
            for `keras_lsoftmax.MarginDense`) and the other
            `keras.layers.Layer` arguments (`name`, `dtype`, `trainable`,
            ...).

    Call arguments:
        inputs: float tensor (B, D), the features.
        labels: optional labels for the margin, sparse (B,) or (B, 1)
            integers, or one-hot (B, units).
        training: bool. The margin applies only when True and labels are
            known.

    Returns:
        Logits of shape (B, units).

    Example:

    ```python
    model = keras_lsoftmax.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(128, activation="relu"),
        keras_lsoftmax.LSoftmaxDense(10, margin=4),
    ])
    ```

    Reference:
        Liu, Wen, Yu, Yang, "Large-Margin Softmax Loss for Convolutional
        Neural Networks", ICML 2016, https://arxiv.org/abs/1612.02295;
        Liu et al., "SphereFace", CVPR 2017, https://arxiv.org/abs/1704.08063
        for `normalize_weights`.
    """

    def __init__(
        self,
        units: int,
        margin: int = 4,
        initial_lambda: float | None = None,
        normalize_weights: bool = False,
        kernel_initializer: Any = "glorot_uniform",
        kernel_regularizer: Any = None,
        kernel_constraint: Any = None,
        lambda_schedule: Any = "auto",
        lambda_minimum: float | None = None,
        **kwargs: Any,
    ):
        _check_positive_int(units, "units")
        super().__init__(
            units,
            target_margin=AngularMargin(ops.check_margin(margin)),
            normalize_weights=normalize_weights,
            lambda_schedule=lambda_schedule,
            initial_lambda=initial_lambda,
            lambda_minimum=lambda_minimum,
            kernel_initializer=kernel_initializer,
            kernel_regularizer=kernel_regularizer,
            kernel_constraint=kernel_constraint,
            **kwargs,
        )
        self.margin = margin

    def default_lambda_minimum(self) -> float:
        """The floor of the `"auto"` schedule without `lambda_minimum`.

        2 up to 10 classes, the paper's MNIST and CIFAR-10 setting; 10 for
        more classes, the authors' advice for larger data, where a floor
        of 2 lets the logits collapse (see docs/choosing-m-and-lambda.md).
        """
        return 2.0 if self.units <= 10 else 10.0

    def _formula_config(self) -> dict[str, Any]:
        return {
            "margin": self.margin,
            "normalize_weights": self.normalize_weights,
        }


def _sampled_targets(
    sampled: Any, labels: Any, valid: Any, ignore_class: int | None
) -> tuple[Any, Any]:
    """The `classes` and `targets` of a `HeadRecord` (None, None unsampled)."""
    if sampled is None:
        return None, None
    if valid is None:
        return sampled.classes, labels
    # The loss's ignore_class must still see its ignored rows.
    ignored = keras.ops.full_like(labels, ignore_class)
    return sampled.classes, keras.ops.where(valid > 0, labels, ignored)


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a positive "
            f"integer. Received: {name}={value!r}"
        )
    return value


def _own_schedule(lambda_schedule: Any, initial_lambda: float | None) -> Any:
    """The layer's own schedule: a float, a `LambdaSchedule` or "auto".

    `initial_lambda` is the constant λ of the layer before `lambda_schedule`
    existed: with `lambda_schedule="auto"` it gives that constant, and it
    must agree with a constant `lambda_schedule`.
    """
    if isinstance(lambda_schedule, dict):
        lambda_schedule = keras.saving.deserialize_keras_object(lambda_schedule)
    if isinstance(lambda_schedule, str):
        if lambda_schedule != "auto":
            raise ValueError(
                "Received an invalid value for `lambda_schedule`, expected "
                '"auto", a float >= 0 or a keras_lsoftmax.schedules.'
                f"LambdaSchedule. Received: lambda_schedule={lambda_schedule!r}"
            )
        return "auto" if initial_lambda is None else initial_lambda
    if isinstance(lambda_schedule, LambdaSchedule):
        if initial_lambda is not None:
            raise ValueError(
                "`initial_lambda` sets a constant λ, which "
                f"lambda_schedule={lambda_schedule!r} replaces: pass one of "
                f"them. Received: initial_lambda={initial_lambda!r}"
            )
        return lambda_schedule
    try:
        constant = lambda_value(lambda_schedule, "lambda_schedule")
    except ValueError as error:
        raise ValueError(
            "Received an invalid value for `lambda_schedule`, expected "
            '"auto", a finite float >= 0 or a keras_lsoftmax.schedules.'
            f"LambdaSchedule. Received: lambda_schedule={lambda_schedule!r}"
        ) from error
    if initial_lambda is not None and initial_lambda != constant:
        raise ValueError(
            "`initial_lambda` and a constant `lambda_schedule` both set λ and "
            f"disagree. Received: initial_lambda={initial_lambda!r}, "
            f"lambda_schedule={lambda_schedule!r}"
        )
    return constant


def _auto_floor(lambda_minimum: Any, schedule: Any) -> float:
    """`lambda_minimum` as a float, checked to go with an "auto" schedule."""
    floor = lambda_value(lambda_minimum, "lambda_minimum")
    if not isinstance(schedule, str):
        raise ValueError(
            '`lambda_minimum` is the floor of lambda_schedule="auto"; a '
            "constant λ or a LambdaSchedule states its own. Received: "
            f"lambda_minimum={lambda_minimum!r} with "
            f"lambda_schedule={schedule!r}"
        )
    return floor


@dataclasses.dataclass(frozen=True)
class _AttachedSchedule:
    # A plain object, so Keras does not track the optimizer's counter as a
    # variable of the layer.
    schedule: Any
    iterations: Any


def _own_calls() -> list[int]:
    """The ids of the layers whose own call is running in this thread."""
    if not hasattr(_OWN_CALLS, "ids"):
        _OWN_CALLS.ids = []
    return _OWN_CALLS.ids


def _unit_rows(kernel: Any) -> Any:
    """`kernel` with every row (last axis) scaled to unit norm (zero rows
    stay zero)."""
    squares = keras.ops.sum(keras.ops.square(kernel), axis=-1, keepdims=True)
    # clip, not maximum: on PyTorch, Keras's type promotion gives float32
    # for two float64 operands, which would round a float64 kernel's norms.
    return kernel * keras.ops.rsqrt(
        keras.ops.clip(squares, MIN_SQUARED_NORM, math.inf)
    )


@keras.ops.custom_gradient
def _inverse_norms(kernel: Any) -> Any:
    """1/‖w_j‖ of every row of `kernel` (zero rows: 1e6, as `_unit_rows`).

    The gradient, −w_j/‖w_j‖³ times the upstream, is one product with the
    kernel: autodiff of the squares, their sum and the reciprocal square
    root would make several (C, D) temporaries.
    """
    squares = keras.ops.sum(keras.ops.square(kernel), axis=1)
    # clip, not maximum: see `_unit_rows`.
    scales = keras.ops.rsqrt(
        keras.ops.clip(squares, MIN_SQUARED_NORM, math.inf)
    )

    def grad(*args: Any, upstream: Any = None) -> Any:
        if upstream is None:
            (upstream,) = args
        # Zero for clipped rows, as the clip's own gradient.
        coefficient = keras.ops.where(
            squares > MIN_SQUARED_NORM,
            -upstream * scales * scales * scales,
            keras.ops.zeros_like(scales),
        )
        return coefficient[:, None] * kernel

    return scales, grad


def find_margin_heads(root: Any) -> list[MarginDense]:
    """Every margin head (`MarginDense`) in `root`, recursively, in order.

    Models are walked through their public `layers` list; other layers
    through the layers held in their attributes (directly or in lists,
    tuples and dicts). Each layer is listed once, even if shared.

    Args:
        root: a `keras.Model` or `keras.layers.Layer`.

    Returns:
        The list of heads (`root` itself if it is one).
    """
    found: list[MarginDense] = []
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, MarginDense):
            found.append(obj)
            return
        for child in _child_layers(obj):
            visit(child)

    visit(root)
    return found


def _child_layers(obj: Any) -> list[keras.layers.Layer]:
    if isinstance(obj, keras.Model):
        return list(obj.layers)
    children: list[keras.layers.Layer] = []
    seen_containers: set[int] = set()

    def collect(value: Any) -> None:
        if isinstance(value, keras.layers.Layer):
            children.append(value)
        elif isinstance(value, (list, tuple, dict)):
            if id(value) in seen_containers:
                return
            seen_containers.add(id(value))
            items = value.values() if isinstance(value, dict) else value
            for item in items:
                collect(item)

    for value in vars(obj).values():
        collect(value)
    return children
