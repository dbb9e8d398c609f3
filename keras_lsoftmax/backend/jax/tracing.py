"""Tracing a model call for its structure only, on JAX."""

from typing import Any

import jax
import keras


def trace_only(fn: Any, x: Any) -> None:
    """Traces `fn(x)` for shapes only, without running it or changing state."""
    with keras.StatelessScope():
        jax.eval_shape(fn, x)
