"""Tracing a model call for its structure only, on TensorFlow."""

from typing import Any

import tensorflow as tf


def trace_only(fn: Any, x: Any, variables: list) -> None:
    """Traces `fn(x)` in a scratch graph without running it.

    `variables` are read as they are: the trace needs no values.
    """
    del variables
    tf.function(fn, autograph=False).get_concrete_function(x)


def current_graph() -> tf.Graph | None:
    """The graph being traced, or None in eager mode."""
    if tf.executing_eagerly():
        return None
    return tf.compat.v1.get_default_graph()
