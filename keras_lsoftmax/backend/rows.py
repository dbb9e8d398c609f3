"""Row updates of an optimizer's variables: the masked path every backend has.

A lazy optimizer (`keras_lsoftmax.optimizers`) updates a variable, and its
slots, only in the rows (indices of the first axis) whose gradient is not
zero. Where the step is compiled with static shapes (JAX, XLA, and
`torch.compile`) the touched rows cannot be gathered, so every row is
computed and the untouched ones keep their values: one fused pass over the
variable. Each backend's `rows` module calls `update_masked_rows` there and
gathers the touched rows where it can.
"""

from typing import Any, Callable, Sequence

import keras


def touched_mask(gradient: Any) -> Any:
    """Whether each row of `gradient` has a non-zero entry, broadcastable to it.

    A scalar is one row; a vector's rows are its entries.
    """
    nonzero = keras.ops.not_equal(gradient, 0)
    if len(gradient.shape) < 2:
        return nonzero
    axes = tuple(range(1, len(gradient.shape)))
    return keras.ops.any(nonzero, axis=axes, keepdims=True)


def update_masked_rows(
    optimizer: keras.optimizers.Optimizer,
    step: Callable[..., Sequence[Any]],
    gradient: Any,
    variables: Sequence[keras.Variable],
) -> None:
    """Assigns `step(gradient, *variables)` to `variables` in touched rows.

    Args:
        optimizer: assigns the new values (Keras's `Optimizer.assign`).
        step: maps the gradient and the variables' values to their new
            values, row by row.
        gradient: the gradient of `variables[0]`, dense.
        variables: the variable, then its slots, all of its shape.
    """
    gradient = keras.ops.cast(gradient, variables[0].dtype)
    touched = touched_mask(gradient)
    values = [keras.ops.convert_to_tensor(v) for v in variables]
    for variable, old, new in zip(variables, values, step(gradient, *values)):
        optimizer.assign(variable, keras.ops.where(touched, new, old))
