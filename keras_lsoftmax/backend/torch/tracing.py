"""Running a model call for its structure only, on PyTorch."""

from typing import Any

import keras
import torch


def trace_only(fn: Any, x: Any, variables: list) -> None:
    """Runs `fn(x)` once without gradients or state changes.

    `variables` hold their values on PyTorch: they are read as they are.
    """
    del variables
    with torch.no_grad(), keras.StatelessScope():
        fn(x)


def current_graph() -> None:
    """None: PyTorch traces in no graph of its own (see `label_scope`)."""
    return None
