"""Tracing a model call for its structure only, on TensorFlow."""

from typing import Any

import tensorflow as tf


def trace_only(fn: Any, x: Any, variables: list) -> None:
    """Traces `fn(x)` in a scratch graph without running it.

    `variables` are read as they are: the trace needs no values.
    """
    del variables
    tf.function(fn, autograph=False).get_concrete_function(x)
