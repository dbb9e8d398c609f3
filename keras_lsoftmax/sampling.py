"""Partial-FC class sampling: the classes a training step computes logits for.

With `sample_rate=r < 1`, a head's training step keeps every class labelled
in the batch plus random negatives, S classes in all, and computes its
logits, its margin and the loss over those S classes only, as insightface's
Partial FC (`partial_fc_v2.py`) does on one device. The draw follows
Partial FC: every class gets a uniform random score, the labelled classes a
score of 2, and the S classes with the highest scores are kept, so the
negatives are a uniform sample without replacement of the unlabelled
classes.

S is `min(C, max(int(r·C), B))` for C classes and a batch of B rows: at
least B, so that every labelled class fits (Partial FC keeps all of them
too, and then has more than r·C classes when a batch holds more distinct
labels than that).

When a Keras distribution splits the kernel's rows over N devices
(`docs/sharding.md`), the classes are sampled in N blocks, one per device:
each keeps its own labelled classes plus random negatives,
`min(C/N, max(int(r·C/N), B))` classes, as each device of Partial FC
samples its own shard, and the kept rows are gathered where they live.
"""

import dataclasses
from typing import Any

import keras

from keras_lsoftmax import backend


@dataclasses.dataclass(frozen=True)
class SampledClasses:
    """The classes one training step of a sampling head kept.

    Attributes:
        classes: int32 (S,), the kept class ids, in increasing order.
        rows: int32 (S·K,), their kernel rows (K sub-centres per class,
            class by class).
        labels: int32 (B,), each label's position in `classes`: the labels
            of the (B, S) logits (B: this replica's part of the batch).
    """

    classes: Any
    rows: Any
    labels: Any


def check_sample_rate(value: Any) -> float:
    """`value` as a float in (0, 1], or a `ValueError` naming it."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if 0.0 < value <= 1.0:
            return float(value)
    raise ValueError(
        "Received an invalid value for `sample_rate`, expected a float in "
        f"(0, 1]. Received: sample_rate={value!r}"
    )


def num_sampled(num_classes: int, rate: float, batch_size: Any) -> Any:
    """S = min(C, max(int(r·C), B)): a Python int when B is known.

    Under TensorFlow's `fit` the batch size is unknown while tracing; S is
    then a scalar tensor, which XLA resolves when it compiles the step for
    a concrete batch.
    """
    wanted = int(rate * num_classes)
    if isinstance(batch_size, int):
        return min(num_classes, max(wanted, batch_size))
    return keras.ops.minimum(num_classes, keras.ops.maximum(wanted, batch_size))


def check_shards(num_classes: int, shards: int, layer_name: str) -> None:
    """Raises a `ValueError` unless the C classes split evenly in `shards`."""
    if num_classes % shards:
        raise ValueError(
            f"Head '{layer_name}' samples classes (sample_rate < 1) and its "
            f"kernel's rows are split over {shards} devices, so its number "
            f"of classes must be a multiple of {shards}. Received: "
            f"units={num_classes}"
        )


def sample_classes(
    labels: Any,
    num_classes: int,
    rate: float,
    seed: keras.random.SeedGenerator,
    sub_centers: int = 1,
    shards: int = 1,
) -> SampledClasses:
    """Keeps the labelled classes plus random negatives, S in all.

    With the classes split in `shards` equal blocks (one per device that
    holds a block of the kernel's rows, `check_shards`), each block keeps
    its own labelled classes plus random negatives, S/shards classes, as
    each device of Partial FC samples its own classes. One block is the
    draw described in the module's docstring.

    Builds no (B, C) tensor: the scores are (C,).

    Args:
        labels: int32 (B,), class ids in [0, num_classes): this replica's
            part of the batch.
        num_classes: C.
        rate: the sample rate r in (0, 1].
        seed: the `keras.random.SeedGenerator` the negatives are drawn from.
        sub_centers: K, the kernel rows per class.
        shards: the blocks the classes are split in, each sampled alone.

    Returns:
        A `SampledClasses`.
    """
    labelled = backend.replicas.global_labels(labels)
    block = num_classes // shards
    kept = num_sampled(block, rate, keras.ops.shape(labelled)[0])
    scores = keras.random.uniform((num_classes,), seed=seed)
    # Labelled classes score 2 > any uniform draw, so top_k keeps them all;
    # a label repeated in the batch writes the same value twice.
    scores = keras.ops.scatter_update(
        scores,
        labelled[:, None],
        keras.ops.full(keras.ops.shape(labelled), 2.0, dtype=scores.dtype),
    )
    scores = keras.ops.reshape(scores, (shards, block))
    _, classes = keras.ops.top_k(scores, kept)
    offsets = keras.ops.arange(shards, dtype="int32")[:, None] * block
    classes = keras.ops.sort(keras.ops.cast(classes, "int32")) + offsets
    classes = keras.ops.reshape(classes, (-1,))
    labels = keras.ops.cast(keras.ops.searchsorted(classes, labels), "int32")
    rows = classes
    if sub_centers > 1:
        offsets = keras.ops.arange(sub_centers, dtype="int32")
        rows = keras.ops.reshape(
            classes[:, None] * sub_centers + offsets[None, :], (-1,)
        )
    return SampledClasses(classes, rows, labels)


def kept_rows(kernel: Any, rows: Any, shards: int = 1) -> Any:
    """The rows `rows` of `kernel`, (R, D), as `sample_classes` keeps them.

    With `shards` > 1 each block of R/shards rows gives its own kept rows
    from block-local indices, so that a compiler that holds one block per
    device (JAX's GSPMD) gathers each block's rows on its own device
    instead of exchanging the kernel.
    """
    if shards == 1:
        return keras.ops.take(kernel, rows, axis=0)
    block = keras.ops.shape(kernel)[0] // shards
    local = keras.ops.reshape(rows, (shards, -1))
    local = local - keras.ops.arange(shards, dtype="int32")[:, None] * block
    blocks = keras.ops.reshape(kernel, (shards, block, -1))
    kept = keras.ops.take_along_axis(blocks, local[:, :, None], axis=1)
    return keras.ops.reshape(kept, (-1, keras.ops.shape(kernel)[1]))
