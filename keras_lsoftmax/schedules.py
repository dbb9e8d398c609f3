"""λ (annealing) schedules for `LSoftmaxDense`.

A schedule maps a training step (or an epoch index) to λ, the weight of the
plain logit in the L-Softmax target logit f_y = (λ·x·w_y + ‖x‖‖w_y‖·ψ(θ)) /
(1 + λ). Training starts with a large λ (almost plain softmax) and anneals
it towards 0 (the full margin), as in the authors' Caffe code. Drive a
schedule with `keras_lsoftmax.LambdaScheduler`.

The classes mirror `keras.optimizers.schedules.LearningRateSchedule`:
`__call__(step)` returns a scalar float32 tensor computed with `keras.ops`
(so it takes Python numbers and tensors, eagerly and inside `tf.function`),
and `get_config` / `from_config` make them serializable.
"""

import math
import numbers
from typing import Any

import keras
from keras import ops

_PACKAGE = "keras_lsoftmax"


def _check_number(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    expected: str,
) -> float:
    """Returns `value` as a float if it is a finite real in range, else raises.

    Args:
        value: the argument to check.
        name: the argument's name, for the message.
        minimum: the lower bound, or None.
        maximum: the upper bound (inclusive), or None.
        exclusive_minimum: whether `minimum` itself is excluded.
        expected: what was expected, in words, for the message.

    Returns:
        `float(value)`.

    Raises:
        ValueError: `value` is not a real number (bools are rejected), is not
            finite, or is out of range.
    """
    message = (
        f"Received an invalid value for `{name}`, expected {expected}. "
        f"Received: {name}={value!r}"
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(message)
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(message)
    if minimum is not None:
        if value < minimum or (exclusive_minimum and value == minimum):
            raise ValueError(message)
    if maximum is not None and value > maximum:
        raise ValueError(message)
    return value


def _step_to_float(step: Any) -> Any:
    """`step` (Python number or tensor of any numeric dtype) as float32."""
    return ops.cast(ops.convert_to_tensor(step), "float32")


class LambdaSchedule:
    """Base class of the λ schedules.

    A schedule is a callable `step -> λ`. Subclasses override `__call__`,
    computing with `keras.ops` so that `step` may be a Python number or a
    tensor, also inside a `tf.function`, and `get_config`, which returns the
    constructor arguments; `from_config` then rebuilds the schedule with
    `cls(**config)`. Decorate a subclass with
    `keras.saving.register_keras_serializable()` to make it serializable
    with `keras.saving.serialize_keras_object`.

    `LambdaScheduler` calls the schedule with the global training step
    (1 for the first batch) or with the epoch index, and checks that the
    result is a finite float ≥ 0.

    Example:

    ```python
    class HalveEvery(keras_lsoftmax.schedules.LambdaSchedule):
        def __init__(self, initial, steps):
            self.initial = initial
            self.steps = steps

        def __call__(self, step):
            step = keras.ops.cast(step, "float32")
            return self.initial * keras.ops.power(
                0.5, keras.ops.floor(step / self.steps)
            )

        def get_config(self):
            return {"initial": self.initial, "steps": self.steps}
    ```
    """

    def __call__(self, step: Any) -> Any:
        """Returns λ at `step`.

        Args:
            step: the training step (or epoch index), a Python number or an
                integer or float tensor.

        Returns:
            λ, a float32 tensor of the shape of `step` (a scalar for a
            scalar step).
        """
        raise NotImplementedError(
            f"λ schedule '{self.__class__.__name__}' must override "
            "`__call__(self, step)`."
        )

    def get_config(self) -> dict[str, Any]:
        """Returns the constructor arguments as a JSON-serializable dict."""
        raise NotImplementedError(
            f"λ schedule '{self.__class__.__name__}' must override "
            "`get_config()` in order to be serializable."
        )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LambdaSchedule":
        """Instantiates a schedule from its config.

        Args:
            config: the output of `get_config()`.

        Returns:
            A schedule instance.
        """
        return cls(**config)

    def __repr__(self) -> str:
        try:
            config = self.get_config()
        except NotImplementedError:
            return f"<{self.__class__.__name__}>"
        args = ", ".join(f"{key}={value!r}" for key, value in config.items())
        return f"{self.__class__.__name__}({args})"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class InverseDecay(LambdaSchedule):
    """Inverse-power decay with a floor: the authors' λ schedule.

    λ(t) = max(minimum, base · (1 + gamma · t)^(−power))

    This is the `LargeMarginInnerProduct` schedule of the authors' Caffe
    code, whose first batch uses t = 1 (`LambdaScheduler` follows that
    convention). Their settings:

    | data | base | gamma | power | minimum |
    |---|---|---|---|---|
    | MNIST | 1000 | 2.5e-5 | 35 | 0 |
    | CIFAR-10 | 1000 | 2e-5 | 45 | 0 |
    | CIFAR-10+ | 1000 | 1e-5 | 45 | 0 |
    | SphereFace (faces) | 1000 | 0.12 | 1 | 5 |

    With the MNIST setting λ is 999.1 at t = 1, 421.4 at t = 1000, 16.21 at
    t = 5000 and 0.406 at t = 10000; it crosses 1 near t = 8700. The authors
    advise a non-zero `minimum` (5 to 10) for hard data sets with many
    classes. The computation is in float32, like the Caffe GPU code.

    Args:
        base: float ≥ 0, λ at t = 0. 0 gives λ ≡ `minimum`.
        gamma: float ≥ 0, the decay speed. 0 gives λ ≡ max(minimum, base).
        power: float ≥ 0, the decay exponent.
        minimum: float ≥ 0, the floor of λ.

    Returns:
        A callable `step -> λ`, a float32 tensor.

    Example:

    ```python
    schedule = keras_lsoftmax.schedules.InverseDecay(
        base=1000.0, gamma=2.5e-5, power=35.0
    )
    float(schedule(1000))  # 421.4...
    model.fit(x, y, callbacks=[keras_lsoftmax.LambdaScheduler(schedule)])
    ```

    Reference:
        Liu, Wen, Yu, Yang, "Large-Margin Softmax Loss for Convolutional
        Neural Networks", ICML 2016, https://arxiv.org/abs/1612.02295;
        `wy1iu/LargeMargin_Softmax_Loss`,
        `src/caffe/layers/largemargin_inner_product_layer.cpp`.
    """

    def __init__(
        self,
        base: float,
        gamma: float,
        power: float,
        minimum: float = 0.0,
    ):
        self.base = _check_number(
            base, "base", minimum=0.0, expected="a finite float >= 0"
        )
        self.gamma = _check_number(
            gamma, "gamma", minimum=0.0, expected="a finite float >= 0"
        )
        self.power = _check_number(
            power, "power", minimum=0.0, expected="a finite float >= 0"
        )
        self.minimum = _check_number(
            minimum, "minimum", minimum=0.0, expected="a finite float >= 0"
        )

    def __call__(self, step: Any) -> Any:
        with keras.name_scope("InverseDecay"):
            t = _step_to_float(step)
            decayed = self.base * ops.power(
                1.0 + self.gamma * t, -self.power
            )
            return ops.maximum(ops.cast(self.minimum, "float32"), decayed)

    def get_config(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "gamma": self.gamma,
            "power": self.power,
            "minimum": self.minimum,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ExponentialDecay(LambdaSchedule):
    """Exponential decay with a floor.

    λ(t) = max(minimum, initial · decay_rate^(t / decay_steps))

    With `decay_steps=1` this is the β ← decay_rate·β per step rule of the
    PyTorch and MXNet ports (β₀ = 100 or 1000, decay_rate = 0.99), written
    as a function of the step so that a resumed run continues exactly.
    It also suits `LambdaScheduler(unit="epoch")`.

    Args:
        initial: float ≥ 0, λ at t = 0.
        decay_rate: float in (0, 1], the factor per `decay_steps` steps.
            1 keeps λ constant.
        decay_steps: float > 0, the number of steps over which λ is
            multiplied by `decay_rate`.
        minimum: float ≥ 0, the floor of λ.

    Returns:
        A callable `step -> λ`, a float32 tensor.

    Example:

    ```python
    schedule = keras_lsoftmax.schedules.ExponentialDecay(
        initial=100.0, decay_rate=0.99
    )
    float(schedule(100))  # 36.6...
    ```

    Reference:
        `amirhfarzaneh/lsoftmax-pytorch` (β₀ = 100, β ← 0.99·β) and
        `luoyetx/mx-lsoftmax` (β ← max(β_min, β·scale)).
    """

    def __init__(
        self,
        initial: float,
        decay_rate: float,
        decay_steps: float = 1,
        minimum: float = 0.0,
    ):
        self.initial = _check_number(
            initial, "initial", minimum=0.0, expected="a finite float >= 0"
        )
        self.decay_rate = _check_number(
            decay_rate,
            "decay_rate",
            minimum=0.0,
            exclusive_minimum=True,
            maximum=1.0,
            expected="a float in (0, 1]",
        )
        self.decay_steps = _check_number(
            decay_steps,
            "decay_steps",
            minimum=0.0,
            exclusive_minimum=True,
            expected="a finite number > 0",
        )
        self.minimum = _check_number(
            minimum, "minimum", minimum=0.0, expected="a finite float >= 0"
        )

    def __call__(self, step: Any) -> Any:
        with keras.name_scope("ExponentialDecay"):
            t = _step_to_float(step)
            decayed = self.initial * ops.power(
                ops.cast(self.decay_rate, "float32"), t / self.decay_steps
            )
            return ops.maximum(ops.cast(self.minimum, "float32"), decayed)

    def get_config(self) -> dict[str, Any]:
        return {
            "initial": self.initial,
            "decay_rate": self.decay_rate,
            "decay_steps": self.decay_steps,
            "minimum": self.minimum,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Constant(LambdaSchedule):
    """A constant λ.

    Useful to pin λ, for instance `Constant(0.0)` for the pure L-Softmax
    when fine-tuning from a softmax-trained model.

    Args:
        value: float ≥ 0, λ at every step.

    Returns:
        A callable `step -> value`, a float32 tensor of the shape of `step`.

    Example:

    ```python
    scheduler = keras_lsoftmax.LambdaScheduler(
        keras_lsoftmax.schedules.Constant(5.0)
    )
    ```
    """

    def __init__(self, value: float):
        self.value = _check_number(
            value, "value", minimum=0.0, expected="a finite float >= 0"
        )

    def __call__(self, step: Any) -> Any:
        with keras.name_scope("Constant"):
            return ops.full_like(_step_to_float(step), self.value)

    def get_config(self) -> dict[str, Any]:
        return {"value": self.value}


# `lambda_schedule="auto"` of `LSoftmaxDense`: the authors' InverseDecay shape
# (base 1000, power 35), its decay speed fitted to the length of the run.
AUTO_BASE = 1000.0
AUTO_POWER = 35.0
AUTO_MINIMUM = 2.0
AUTO_CROSSING = 0.3
AUTO_GAMMA = 2.5e-5


def auto_schedule(
    total_steps: int | None, minimum: float = AUTO_MINIMUM
) -> InverseDecay:
    """The schedule `LSoftmaxDense(lambda_schedule="auto")` uses in a run.

    `InverseDecay(base=1000, gamma, power=35, minimum)`, with gamma chosen
    so that the decay (without the floor) crosses λ = 1 after 30% of the
    `total_steps` optimizer steps of the run: λ is about 1000 at the first
    step, near plain softmax, and stays at the floor from about 27% of the
    run on. When the length of the run is unknown (None; for instance
    an endless dataset without `steps_per_epoch`), gamma is the authors'
    MNIST value 2.5e-5, which crosses λ = 1 near step 8700.

    Args:
        total_steps: int ≥ 1, the number of optimizer steps of the run, or
            None.
        minimum: the floor of λ (default 2). The heads pass their
            `auto_lambda_minimum`: for L-Softmax 2 up to 10 classes and 10
            for more, for SphereFace 5 (its authors' floor).

    Returns:
        An `InverseDecay`.
    """
    if total_steps is None:
        gamma = AUTO_GAMMA
    else:
        if isinstance(total_steps, bool) or not isinstance(
            total_steps, numbers.Integral
        ) or total_steps < 1:
            raise ValueError(
                "Received an invalid value for `total_steps`, expected a "
                f"positive int or None. Received: total_steps={total_steps!r}"
            )
        crossing = AUTO_BASE ** (1.0 / AUTO_POWER) - 1.0
        gamma = crossing / (AUTO_CROSSING * int(total_steps))
    return InverseDecay(AUTO_BASE, gamma, AUTO_POWER, minimum)


__all__ = [
    "Constant",
    "ExponentialDecay",
    "InverseDecay",
    "LambdaSchedule",
    "auto_schedule",
]
