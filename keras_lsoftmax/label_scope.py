"""Handing the labels of a training step to the `LSoftmaxDense` layers."""

import dataclasses
import threading
from typing import Any

from keras_lsoftmax.backend import tracing

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
        valid: float mask (B,), 0 for the rows whose label is the ignored
            class (those rows get no margin), or None if no class is ignored.
        lam: the scalar λ the call used.
        classes: for a head that samples classes (`sample_rate` < 1) in
            training, the int32 ids (S,) of the classes its outputs
            (B, S) are over; `labels` are then positions in `classes`.
            None when the outputs are over all classes.
        targets: with `classes`, the labels the loss and metrics take for
            these outputs: `labels`, with the ignored class in the rows
            that have it. None otherwise.
    """

    layer: Any
    outputs: Any
    labels: Any
    plain_target: Any
    cos_theta: Any
    valid: Any = None
    lam: Any = None
    classes: Any = None
    targets: Any = None


class label_scope:  # noqa: N801 (used like a function, as tf.name_scope)
    """Hands `labels` to every `LSoftmaxDense` called inside it.

    The margin-aware models open one in `train_step` and `test_step`. Open one
    yourself in a custom training loop. It holds for the current thread only,
    and explicit `labels=` arguments take precedence.

    Args:
        labels: the batch's labels, in any form `LSoftmaxDense` accepts.
        ignore_class: optional int, a label value that gets no margin and no
            range check, as `keras.losses.SparseCategoricalCrossentropy(
            ignore_class=...)` ignores it in the loss.
        step: optional integer scalar, the number of optimizer steps taken
            so far (`optimizer.iterations`). A layer whose λ follows a
            schedule computes λ = schedule(step + 1). Without it, a schedule
            attached by `keras_lsoftmax.LambdaScheduler` reads the counter
            attached with it, and a layer's own `lambda_schedule` (the
            default `"auto"` included) raises a `ValueError` in training
            mode, since it cannot know the step.

    Example:

    ```python
    with keras_lsoftmax.label_scope(y, step=optimizer.iterations) as scope:
        logits = model(x, training=True)  # margin logits
    ```

    After the block, `scope.records` lists a `HeadRecord` per layer call made
    in the graph (or eager context) the scope was opened in; calls that Keras
    traces elsewhere, such as the scratch graph in which it builds a model on
    first use, still get the labels but leave no record.

    Inference calls (`training=False` or unset) ignore the scope: they return
    the plain logits and leave no record, also on a batch of another size.
    """

    # Whether inference calls take the labels and leave records. Only the
    # scope of the models' test step does, for the θ that `evaluate` logs;
    # there the labels are the batch's.
    inference_labels: bool = False

    def __init__(
        self, labels: Any, ignore_class: int | None = None, step: Any = None
    ):
        if labels is None:
            raise ValueError("Expected `labels` to be a tensor. Received: None")
        if ignore_class is not None and (
            isinstance(ignore_class, bool) or not isinstance(ignore_class, int)
        ):
            raise ValueError(
                "Received an invalid value for `ignore_class`, expected an "
                f"int or None. Received: ignore_class={ignore_class!r}"
            )
        self.labels = labels
        self.ignore_class = ignore_class
        self.step = step
        self.records: list[HeadRecord] = []
        self._graph: Any = None

    def labels_for(self, layer: Any, inputs: Any) -> tuple[Any, int | None]:
        """The labels and the ignored class that `layer` uses on `inputs`."""
        del layer, inputs  # every layer gets the same labels
        return self.labels, self.ignore_class

    def record(self, record: HeadRecord) -> None:
        """Keeps `record` if it was made where this scope was opened."""
        # A record traced in another TensorFlow graph cannot be read by the
        # step that opened the scope (InaccessibleTensorError).
        if current_graph() is self._graph:
            self.records.append(record)

    def __enter__(self) -> "label_scope":
        self._graph = current_graph()
        _stack().append(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        _stack().pop()


def current_label_scope() -> label_scope | None:
    """The innermost `label_scope` open in this thread, or None."""
    stack = _stack()
    return stack[-1] if stack else None


# The TensorFlow graph being traced, or None (eager, JAX, PyTorch): only
# TensorFlow traces in graphs of its own; on JAX and PyTorch the models
# build before their step runs, so every record is the step's.
current_graph = tracing.current_graph


def _stack() -> list[label_scope]:
    if not hasattr(_STATE, "stack"):
        _STATE.stack = []
    return _STATE.stack
