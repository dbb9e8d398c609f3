"""Handing the labels of a training step to the `LSoftmaxDense` layers."""

import dataclasses
import threading
from typing import Any

import tensorflow as tf

# One stack per thread: under `tf.distribute.MirroredStrategy` every replica
# runs its step in a thread of its own, with labels of its own.
_STATE = threading.local()


@dataclasses.dataclass(frozen=True)
class HeadRecord:
    """What one `LSoftmaxDense` call inside a `label_scope` computed.

    Attributes:
        layer: the layer.
        outputs: the logits it returned, (B, C).
        labels: the sparse int32 labels it used, (B,).
        plain_target: the plain logit `x @ kernel` of each labelled class,
            (B,), without gradient.
        cos_theta: cos θ between each feature and its class weight, (B,),
            without gradient.
    """

    layer: Any
    outputs: tf.Tensor
    labels: tf.Tensor
    plain_target: tf.Tensor
    cos_theta: tf.Tensor


class label_scope:  # noqa: N801 (used like a function, as tf.name_scope)
    """Hands `labels` to every `LSoftmaxDense` called inside it.

    The margin-aware models open one in `train_step` and `test_step`. Open one
    yourself in a custom training loop. It holds for the current thread only,
    and explicit `labels=` arguments take precedence.

    Args:
        labels: the batch's labels, in any form `LSoftmaxDense` accepts.

    Example:

    ```python
    with keras_lsoftmax.label_scope(y) as scope:
        logits = model(x, training=True)  # margin logits
    ```

    After the block, `scope.records` lists a `HeadRecord` per layer call.
    """

    def __init__(self, labels: Any):
        if labels is None:
            raise ValueError("Expected `labels` to be a tensor. Received: None")
        self.labels = labels
        self.records: list[HeadRecord] = []

    def __enter__(self) -> "label_scope":
        _stack().append(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        _stack().pop()


def current_label_scope() -> label_scope | None:
    """The innermost `label_scope` open in this thread, or None."""
    stack = _stack()
    return stack[-1] if stack else None


def _stack() -> list[label_scope]:
    if not hasattr(_STATE, "stack"):
        _STATE.stack = []
    return _STATE.stack
