"""Lazy optimizers: they update only the rows a step's gradient touches.

With Partial-FC sampling (`sample_rate` < 1) a head's kernel gets a gradient
in the S kept rows only. Keras's `Adam`, and its `SGD` with momentum, still
move every row every step, by the momentum of earlier steps, and pass over
the whole (C, D) kernel and its slots. `LazyAdam` and `LazySGD` leave the
rows whose gradient is zero as they are, with their slots, as TensorFlow
Addons' `LazyAdam` and PyTorch's `SparseAdam` do, and as insightface's first
Partial FC updated the momentum of the sampled rows only.
"""

from typing import Any

import keras

from keras_lsoftmax import backend


@keras.saving.register_keras_serializable(package="keras_lsoftmax")
class LazyAdam(keras.optimizers.Optimizer):
    """Adam that updates only the rows (first axis) with a non-zero gradient.

    Each step, a variable's rows whose gradient is not all zero get Adam's
    update of `keras.optimizers.Adam`, with the bias correction of the
    optimizer's step count; the other rows keep their values and their
    moments. A variable whose gradient touches every row is updated as by
    `keras.optimizers.Adam`. A vector's rows are its entries.

    Where the step runs op by op (TensorFlow without XLA, PyTorch without
    `torch.compile`), the touched rows are gathered, updated and written
    back: the cost of a sampling head's update is that of its S kept rows,
    not of its C rows. Compiled (XLA, `jax.jit`, `torch.compile`), every row
    is computed in one fused pass and the untouched rows keep their values.

    Args:
        learning_rate: float, a `keras.optimizers.schedules` schedule or a
            callable; as for `keras.optimizers.Adam`.
        beta_1: float, the decay of the first moments.
        beta_2: float, the decay of the second moments.
        epsilon: float, added to the root of the second moments.
        amsgrad: bool, whether to use AMSGrad's maximum of the second
            moments (kept row by row too).
        **kwargs: the other arguments of `keras.optimizers.Optimizer`
            (`clipnorm`, `global_clipnorm`, `use_ema`, `loss_scale_factor`,
            `gradient_accumulation_steps`, `name`, ...), except
            `weight_decay`: Keras applies it to every row, which is not lazy.

    Example:

    ```python
    model = keras_lsoftmax.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(128, activation="relu"),
        keras_lsoftmax.CosFaceDense(1_000_000, sample_rate=0.1),
    ])
    model.compile(
        optimizer=keras_lsoftmax.optimizers.LazyAdam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    ```

    Reference:
        Kingma, Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015;
        An et al., "Partial FC: Training 10 Million Identities on a Single
        Machine", ICCVW 2021.
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        name: str = "lazy_adam",
        **kwargs: Any,
    ) -> None:
        _check_no_weight_decay("LazyAdam", kwargs)
        for arg, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(
                    f"Received an invalid value for `{arg}`, expected a "
                    f"float in [0, 1). Received: {arg}={value!r}"
                )
        if not _is_number(epsilon) or epsilon < 0:
            raise ValueError(
                "Received an invalid value for `epsilon`, expected a float "
                f">= 0. Received: epsilon={epsilon!r}"
            )
        if not isinstance(amsgrad, bool):
            raise ValueError(
                "Received an invalid value for `amsgrad`, expected a bool. "
                f"Received: amsgrad={amsgrad!r}"
            )
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.amsgrad = amsgrad

    def build(self, var_list: list[keras.Variable]) -> None:
        """Creates the moments of every variable, named as Adam's."""
        if self.built:
            return
        super().build(var_list)
        self.momentums, self.velocities = self.add_optimizer_variables(
            var_list, ["momentum", "velocity"]
        )
        if self.amsgrad:
            self.velocity_hats = self.add_optimizer_variables(
                var_list, "velocity_hat"
            )

    def update_step(
        self, gradient: Any, variable: keras.Variable, learning_rate: Any
    ) -> None:
        dtype = variable.dtype
        step = keras.ops.cast(self.iterations + 1, dtype)
        beta_1 = keras.ops.cast(self.beta_1, dtype)
        beta_2 = keras.ops.cast(self.beta_2, dtype)
        alpha = (
            keras.ops.cast(learning_rate, dtype)
            * keras.ops.sqrt(1 - keras.ops.power(beta_2, step))
            / (1 - keras.ops.power(beta_1, step))
        )
        # `_get_variable_index` is how `keras.optimizers.Optimizer`'s own
        # docstring finds a variable's slots (Keras 3.15.1): under a
        # `tf.distribute` update `variable` is the strategy's variable.
        index = self._get_variable_index(variable)
        slots = [self.momentums[index], self.velocities[index]]
        if self.amsgrad:
            slots.append(self.velocity_hats[index])

        def adam(g: Any, value: Any, m: Any, v: Any, *v_hat: Any) -> list:
            # Keras's Adam's arithmetic, in its order.
            m = m + (g - m) * (1 - self.beta_1)
            v = v + (keras.ops.square(g) - v) * (1 - self.beta_2)
            news = [m, v]
            if v_hat:
                v = keras.ops.maximum(v_hat[0], v)
                news.append(v)
            value = value - (m * alpha) / (keras.ops.sqrt(v) + self.epsilon)
            return [value, *news]

        backend.rows.update_rows(self, adam, gradient, [variable, *slots])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "amsgrad": self.amsgrad,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_lsoftmax")
class LazySGD(keras.optimizers.Optimizer):
    """SGD with momentum that updates only the rows with a non-zero gradient.

    Each step, a variable's rows whose gradient is not all zero get the
    update of `keras.optimizers.SGD` (with momentum, Nesterov's if asked);
    the other rows keep their values and their momentum. A variable whose
    gradient touches every row is updated as by `keras.optimizers.SGD`. A
    vector's rows are its entries. This is the update of insightface's
    first Partial FC, which trains with SGD and momentum 0.9.

    Where the step runs op by op (TensorFlow without XLA, PyTorch without
    `torch.compile`), the touched rows are gathered, updated and written
    back. Compiled (XLA, `jax.jit`, `torch.compile`), every row is computed
    in one fused pass and the untouched rows keep their values.

    Args:
        learning_rate: float, a `keras.optimizers.schedules` schedule or a
            callable; as for `keras.optimizers.SGD`.
        momentum: float in [0, 1). 0 is plain SGD, which moves only the
            rows with a gradient anyway; `LazySGD` then still saves the
            passes over the other rows where the step runs op by op.
        nesterov: bool, whether to apply Nesterov momentum.
        **kwargs: the other arguments of `keras.optimizers.Optimizer`
            (`clipnorm`, `global_clipnorm`, `use_ema`, `loss_scale_factor`,
            `gradient_accumulation_steps`, `name`, ...), except
            `weight_decay`: Keras applies it to every row, which is not lazy.

    Example:

    ```python
    model = keras_lsoftmax.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(128, activation="relu"),
        keras_lsoftmax.CosFaceDense(1_000_000, sample_rate=0.1),
    ])
    model.compile(
        optimizer=keras_lsoftmax.optimizers.LazySGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    ```

    Reference:
        An et al., "Partial FC: Training 10 Million Identities on a Single
        Machine", ICCVW 2021.
    """

    def __init__(
        self,
        learning_rate: Any = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        name: str = "lazy_sgd",
        **kwargs: Any,
    ) -> None:
        _check_no_weight_decay("LazySGD", kwargs)
        if not _is_number(momentum) or not 0.0 <= momentum < 1.0:
            raise ValueError(
                "Received an invalid value for `momentum`, expected a float "
                f"in [0, 1). Received: momentum={momentum!r}"
            )
        if not isinstance(nesterov, bool):
            raise ValueError(
                "Received an invalid value for `nesterov`, expected a bool. "
                f"Received: nesterov={nesterov!r}"
            )
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = float(momentum)
        self.nesterov = nesterov

    def build(self, var_list: list[keras.Variable]) -> None:
        """Creates the momentum of every variable (with momentum > 0), named
        as SGD's."""
        if self.built:
            return
        super().build(var_list)
        self.momentums = []
        if self.momentum != 0:
            self.momentums = self.add_optimizer_variables(var_list, "momentum")

    def update_step(
        self, gradient: Any, variable: keras.Variable, learning_rate: Any
    ) -> None:
        rate = keras.ops.cast(learning_rate, variable.dtype)
        if not self.momentums:
            backend.rows.update_rows(
                self, lambda g, value: [value - g * rate], gradient, [variable]
            )
            return
        momentum = keras.ops.cast(self.momentum, variable.dtype)

        def sgd(g: Any, value: Any, m: Any) -> list:
            # Keras's SGD's arithmetic, in its order.
            m = m * momentum - g * rate
            step = m * momentum - g * rate if self.nesterov else m
            return [value + step, m]

        # See `LazyAdam.update_step` for `_get_variable_index`.
        m = self.momentums[self._get_variable_index(variable)]
        backend.rows.update_rows(self, sgd, gradient, [variable, m])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"momentum": self.momentum, "nesterov": self.nesterov})
        return config


def _check_no_weight_decay(optimizer: str, kwargs: dict[str, Any]) -> None:
    if kwargs.get("weight_decay") is not None:
        raise ValueError(
            f"{optimizer} does not take `weight_decay`: Keras applies it to "
            "every row of a variable, also the rows a step does not update. "
            f"Received: weight_decay={kwargs['weight_decay']!r}"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["LazyAdam", "LazySGD"]
