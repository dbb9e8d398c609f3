"""`LSoftmaxDense`: the class-weight layer of the L-Softmax loss."""

import dataclasses
import math
import threading
from typing import Any

import keras
import numpy as np

from keras_lsoftmax import ops
from keras_lsoftmax.backend import ops as backend_ops
from keras_lsoftmax.label_scope import HeadRecord
from keras_lsoftmax.label_scope import current_label_scope

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
class LSoftmaxDense(keras.layers.Layer):
    """Dense class weights whose labelled logit gets the L-Softmax margin.

    In training, given labels, the logit of each sample's labelled class y
    becomes the margin logit

        f_y = (λ·x·w_y + ‖x‖‖w_y‖·ψ(θ)) / (1 + λ),   cos θ = x·w_y / (‖x‖‖w_y‖)

    with ψ(θ) = (−1)^k cos(mθ) − 2k for θ ∈ [kπ/m, (k+1)π/m]; every other
    logit stays `x @ kernelᵀ`. Otherwise (inference, evaluation, or no
    labels) it returns the plain logits `x @ kernelᵀ`, so `predict` needs no
    labels.
    Feed its output to a softmax cross-entropy with `from_logits=True`.

    The kernel holds one row of class weights per class, shape
    (units, input_dim), as in the authors' Caffe layer and `torch.nn.Linear`
    (`keras.layers.Dense` stores the transpose): a training step then reads
    and updates only the B contiguous rows of the labelled classes. An
    initializer sees the shape of a Dense kernel, (input_dim, units), so its
    fan-in and fan-out mean what they mean for Dense; a constraint or
    regularizer sees the stored (units, input_dim) kernel, so
    `keras.constraints.UnitNorm(axis=1)` keeps each class weight at unit
    norm.

    The layer has no bias, as in the paper. λ (`lambda_`) is a float32,
    non-trainable variable: anneal it with `keras_lsoftmax.LambdaScheduler`
    (which attaches a schedule that the train step evaluates), or assign it
    with `set_lambda`; changing λ never retraces. The math always runs in
    float32 (float64 for float64 inputs), and the logits come out in that
    dtype, also under a mixed-precision policy.

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

    Args:
        units: positive int, the number of classes C.
        margin: positive int, the paper's m. 1 is plain softmax; the paper
            uses 2, 3 and 4.
        initial_lambda: float ≥ 0, the starting λ. 0 is the pure L-Softmax;
            large values approach plain softmax.
        normalize_weights: bool. If True, the class weights are scaled to
            unit norm inside the forward pass (the A-Softmax / SphereFace
            variant) and the gradient is the exact one through that scaling;
            the stored kernel is never changed in place.
        kernel_initializer: initializer for the kernel, called with the
            Dense shape (input_dim, units); its result is stored transposed.
        kernel_regularizer: regularizer for the kernel (units, input_dim).
        kernel_constraint: constraint for the kernel (units, input_dim).
        **kwargs: other `keras.layers.Layer` arguments (`name`, `dtype`,
            `trainable`, ...).

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
        initial_lambda: float = 0.0,
        normalize_weights: bool = False,
        kernel_initializer: Any = "glorot_uniform",
        kernel_regularizer: Any = None,
        kernel_constraint: Any = None,
        **kwargs: Any,
    ):
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(
                "Received an invalid value for `units`, expected a positive "
                f"integer. Received: units={units!r}"
            )
        ops.check_margin(margin)
        initial_lambda = lambda_value(initial_lambda, "initial_lambda")
        if not isinstance(normalize_weights, bool):
            raise ValueError(
                "Received an invalid value for `normalize_weights`, expected "
                f"a bool. Received: normalize_weights={normalize_weights!r}"
            )
        # The layer casts for itself: the margin needs float32 even when the
        # policy computes in float16, and the kernel must not be autocast.
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        self.units = units
        self.margin = margin
        self.initial_lambda = initial_lambda
        self.normalize_weights = normalize_weights
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.input_spec = keras.layers.InputSpec(ndim=2)
        # λ exists before `build` so a scheduler can set it at any time.
        self.lambda_ = self.add_weight(
            name="lambda",
            shape=(),
            dtype="float32",
            initializer=keras.initializers.Constant(initial_lambda),
            trainable=False,
            autocast=False,
            aggregation="only_first_replica",
        )
        self._lambda_schedule = None

    def build(self, input_shape: tuple) -> None:
        if len(input_shape) != 2 or input_shape[-1] is None:
            raise ValueError(
                "LSoftmaxDense expects inputs of shape (batch_size, features) "
                f"with a known feature size. Received: inputs with shape "
                f"{tuple(input_shape)}"
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.units, input_shape[-1]),
            initializer=self._transposed_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
            autocast=False,
        )
        self.input_spec = keras.layers.InputSpec(
            ndim=2, axes={-1: input_shape[-1]}
        )

    def _transposed_initializer(self, shape: tuple, dtype: Any = None) -> Any:
        units, input_dim = shape
        dense_kernel = self.kernel_initializer((input_dim, units), dtype=dtype)
        return backend_ops.row_major(keras.ops.transpose(dense_kernel))

    def set_lambda(self, value: Any) -> None:
        """Assigns λ after checking that it is a finite float ≥ 0.

        Detaches a schedule attached by `LambdaScheduler`, so λ stays at
        `value` in the next training steps.

        Args:
            value: a Python or NumPy number, or an array or eager tensor
                holding one number (what a `LambdaSchedule` returns). On an
                invalid value, λ keeps its previous value.
        """
        self.lambda_.assign(lambda_value(value, "value"))
        self._lambda_schedule = None

    def call(
        self, inputs: Any, labels: Any = None, training: bool | None = None
    ) -> Any:
        kernel = keras.ops.convert_to_tensor(self.kernel)
        if self.normalize_weights:
            kernel = _unit_rows(kernel)
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
                f"LSoftmaxDense '{self.name}' was called with "
                "training=True but without labels, so it cannot apply "
                "the margin. Train it inside keras_lsoftmax.Sequential "
                "or keras_lsoftmax.Model (their train_step passes the "
                "labels), call it with labels=..., or open a "
                "keras_lsoftmax.label_scope(labels) in a custom loop."
            )
        # Outside training only a label_scope wants the per-sample records.
        if labels is None or (not training and scope is None):
            return ops.plain_logits(inputs, kernel)
        labels, valid = self._sparse_labels(labels, ignore_class)
        labels = ops.check_labels(labels, self.units, inputs)
        if training:
            margin, lam = self.margin, self._training_lambda(scope)
        else:
            margin, lam = 1, self.lambda_
        outputs, plain_target, cos = ops.margin_logits(
            inputs, kernel, labels, margin, lam, valid
        )
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
                )
            )
        return outputs

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
                f"LSoftmaxDense '{self.name}' was run through its `call` "
                "method by another layer (as keras.layers.TimeDistributed "
                "does, one time step at a time), so the labels of the "
                "label_scope (or of fit and evaluate) do not match its "
                "inputs row for row. To give every time step its own label, "
                "apply the head to the features reshaped to "
                "(batch * time, features), with the labels reshaped to "
                "(batch * time,)."
            )

    def _training_lambda(self, scope: Any) -> Any:
        """λ for this training step: from the attached schedule, if any.

        `LambdaScheduler` attaches a schedule and the optimizer's step
        counter; the step then computes λ = schedule(step + 1) itself, so
        nothing waits on the host. A value that is not >= 0 (NaN included)
        leaves λ unchanged; the callback reports it at the end of the epoch.
        λ = ∞ is allowed: it gives the plain logits.
        """
        if self._lambda_schedule is None:
            return self.lambda_
        step = getattr(scope, "step", None)
        if step is None:
            step = self._lambda_schedule.iterations
        value = self._lambda_schedule.schedule(
            keras.ops.cast(step, "int32") + 1
        )
        value = keras.ops.cast(value, "float32")
        value = keras.ops.where(
            value >= 0.0, value, keras.ops.convert_to_tensor(self.lambda_)
        )
        self.lambda_.assign(value)
        return value

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
        """The `LambdaSchedule` the training steps compute λ from, or None."""
        attached = self._lambda_schedule
        return None if attached is None else attached.schedule

    def _sparse_labels(
        self, labels: Any, ignore_class: int | None
    ) -> tuple[Any, Any]:
        """Sparse labels (B,) and, given `ignore_class`, the valid-row mask."""
        labels = keras.ops.convert_to_tensor(labels)
        shape = tuple(labels.shape)
        if len(shape) == 2 and shape[-1] == 1:
            labels = keras.ops.squeeze(labels, axis=-1)
        elif len(shape) == 2 and shape[-1] == self.units:
            labels = keras.ops.cast(keras.ops.argmax(labels, axis=-1), "int32")
        elif len(shape) != 1:
            raise ValueError(
                f"LSoftmaxDense '{self.name}' expects labels of shape "
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
        config = {
            "units": self.units,
            "margin": self.margin,
            "initial_lambda": self.initial_lambda,
            "normalize_weights": self.normalize_weights,
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer
            ),
            "kernel_regularizer": keras.regularizers.serialize(
                self.kernel_regularizer
            ),
            "kernel_constraint": keras.constraints.serialize(
                self.kernel_constraint
            ),
        }
        return {**super().get_config(), **config}


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
    """`kernel` with every row scaled to unit norm (zero rows stay zero)."""
    squares = keras.ops.sum(keras.ops.square(kernel), axis=1, keepdims=True)
    # clip, not maximum: on PyTorch, Keras's type promotion gives float32
    # for two float64 operands, which would round a float64 kernel's norms.
    return kernel * keras.ops.rsqrt(keras.ops.clip(squares, 1e-12, math.inf))


def find_lsoftmax_layers(root: Any) -> list[LSoftmaxDense]:
    """Every `LSoftmaxDense` in `root`, found recursively, in layer order.

    Models are walked through their public `layers` list; other layers
    through the layers held in their attributes (directly or in lists,
    tuples and dicts). Each layer is listed once, even if shared.

    Args:
        root: a `keras.Model` or `keras.layers.Layer`.

    Returns:
        The list of `LSoftmaxDense` layers (`root` itself if it is one).
    """
    found: list[LSoftmaxDense] = []
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, LSoftmaxDense):
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
