"""Tracing a model call for its structure only, on JAX."""

from typing import Any

import jax
import keras


def trace_only(fn: Any, x: Any, variables: list) -> None:
    """Traces `fn(x)` for shapes only, without running it or changing state.

    During `fit` and `evaluate` Keras moves the values of `variables` into
    the step's state and leaves the variables empty, so the trace reads
    abstract zeros of their shapes instead (it needs no values).
    """

    def with_placeholders(x: Any) -> Any:
        mapping = [
            (v, jax.numpy.zeros(v.shape, v.dtype)) for v in variables
        ]
        with keras.StatelessScope(state_mapping=mapping):
            return fn(x)

    jax.eval_shape(with_placeholders, x)


def current_graph() -> None:
    """None: JAX traces in no graph of its own (see `label_scope`)."""
    return None
