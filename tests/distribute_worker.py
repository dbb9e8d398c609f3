"""Subprocess half of `tests/test_distribute.py`: one MirroredStrategy run.

TensorFlow fixes its logical devices when its runtime starts, so the two
logical CPUs that `tf.distribute.MirroredStrategy` needs on a CPU-only machine
must be configured in a fresh process before any op runs. The test starts this
script with `python tests/distribute_worker.py OUT.json`; it

1. splits the physical CPU into two logical devices (before TF initialises);
2. trains a tiny `keras_lsoftmax.Sequential` (features → Dense → LSoftmaxDense
   with m = 4) for a few SGD steps on one device, with the default strategy;
3. trains the same model, from the same initial weights on the same batches,
   under `MirroredStrategy(["CPU:0", "CPU:1"])`, with the same global batch;
4. writes both runs' final weights, History losses, per-batch losses, and λ as
   read on every replica, to OUT.json, for the test to compare;
5. runs one epoch of 61 samples in global batches of 16 (the last batch splits
   unevenly) with a `keras_lsoftmax.Sequential` and with a `keras.Sequential`,
   and writes their History, `get_metrics_result()` and exact accuracy.

Both runs use `keras_lsoftmax.LambdaScheduler(InverseDecay(...))` with
`unit="step"`, `shuffle=False` and a global batch of `GLOBAL_BATCH`.

`python tests/distribute_worker.py OUT.json KIND...` runs steps 2 to 4 only,
once per head of the family named (`tests.family_heads.HEADS`), and writes
{KIND: {"single": ..., "mirrored": ...}}.

`python tests/distribute_worker.py OUT.json sampled` trains a
`CosFaceDense(SAMPLED_CLASSES, sample_rate=SAMPLED_RATE)` head for two steps
on one device and on the two replicas, with plain SGD and with
`keras_lsoftmax.optimizers.LazyAdam`, and writes each run's kernel, losses
and the rows each step moved, plus the error that the SGD training raises
under `jit_compile=True` on the replicas.

`python tests/distribute_worker.py OUT.json multi_worker_sampled` trains the
same sampling head, with SGD and with LazyAdam, under
`MultiWorkerMirroredStrategy` when `TF_CONFIG` names a cluster (one replica
per worker, the batch split between the workers), and on this process alone
without it; it writes {"sgd": ..., "lazy": ...} and the number of replicas.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# Must run before anything creates a tensor.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
)

import keras  # noqa: E402

import keras_lsoftmax  # noqa: E402

# Run as a script: the repository root is on PYTHONPATH.
from tests.family_heads import HEADS  # noqa: E402

FEATURES = 8
HIDDEN = 16
CLASSES = 4
MARGIN = 4
GLOBAL_BATCH = 32
STEPS = 4
LEARNING_RATE = 0.1
# Global batch 32, 50 kept classes: with the replicas' labels not gathered,
# each replica would keep its own 16 rows' classes and the union of the
# replicas' kept rows would be larger than 50.
SAMPLED_CLASSES = 200
SAMPLED_RATE = 0.25
# λ = 10 / (1 + 0.5 t): 6.67 at t = 1, 3.33 at t = 4, so the margin matters.
SCHEDULE = dict(base=10.0, gamma=0.5, power=1.0)


def make_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * GLOBAL_BATCH, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, size=STEPS * GLOBAL_BATCH).astype("int32")
    return x, y


def initial_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [
        rng.normal(scale=0.5, size=(FEATURES, HIDDEN)).astype("float32"),
        rng.normal(scale=0.1, size=(HIDDEN,)).astype("float32"),
        rng.normal(scale=0.5, size=(CLASSES, HIDDEN)).astype("float32"),
    ]


def build_model(kind: str | None = None) -> keras_lsoftmax.Sequential:
    """The model with an `LSoftmaxDense` head, or the family head `kind`."""
    head = (
        keras_lsoftmax.LSoftmaxDense(CLASSES, margin=MARGIN, name="head")
        if kind is None
        else HEADS[kind](CLASSES, "head")
    )
    model = keras_lsoftmax.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(HIDDEN, activation="relu", name="hidden"),
            head,
        ]
    )
    w1, b1, kernel = initial_weights()
    model.get_layer("hidden").set_weights([w1, b1])
    rows = head.kernel.shape[0] // CLASSES
    if rows > 1:  # sub-centres: each class's row, moved apart
        kernel = np.repeat(kernel, rows, axis=0)
        noise = np.random.default_rng(2).normal(scale=0.1, size=kernel.shape)
        kernel = (kernel + noise).astype("float32")
    head.kernel.assign(kernel)
    model.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


class BatchLosses(keras.callbacks.Callback):
    """Records `logs["loss"]` (the running mean) after every batch."""

    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


class RowsMoved(keras.callbacks.Callback):
    """Records how many rows of `head`'s kernel each batch changed."""

    def __init__(self, head):
        super().__init__()
        self.head, self.moved = head, []

    def on_train_batch_begin(self, batch, logs=None):
        self.before = keras.ops.convert_to_numpy(self.head.kernel)

    def on_train_batch_end(self, batch, logs=None):
        after = keras.ops.convert_to_numpy(self.head.kernel)
        self.moved.append(int(np.sum(np.any(after != self.before, axis=1))))


def replica_lambdas(strategy, layer) -> tuple[list[float], list[float], list[str]]:
    """λ as each replica sees it, read two ways."""
    variable = layer.lambda_.value  # the tf variable behind the Keras one
    components = getattr(variable, "values", (variable,))
    from_components = [float(v.numpy()) for v in components]
    devices = [v.device for v in components]
    per_replica = strategy.run(lambda: tf.identity(layer.lambda_.value))
    from_run = [
        float(t.numpy()) for t in strategy.experimental_local_results(per_replica)
    ]
    return from_components, from_run, devices


def train(strategy, kind: str | None = None) -> dict:
    keras.utils.clear_session()
    x, y = make_data()
    with strategy.scope():
        model = build_model(kind)
    initial = [np.array(w) for w in model.get_weights()]
    losses = BatchLosses()
    schedule = keras_lsoftmax.schedules.InverseDecay(**SCHEDULE)
    history = model.fit(
        x,
        y,
        batch_size=GLOBAL_BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[keras_lsoftmax.LambdaScheduler(schedule), losses],
    )
    head = model.get_layer("head")
    components, from_run, devices = replica_lambdas(strategy, head)
    return {
        "replicas": strategy.num_replicas_in_sync,
        "weights": [w.tolist() for w in model.get_weights()],
        "max_update": max(
            float(np.max(np.abs(w - w0))) for w, w0 in zip(model.get_weights(), initial)
        ),
        "history_loss": history.history["loss"],
        "history_lambda": history.history.get("lsoftmax_lambda"),
        "batch_losses": losses.losses,
        "iterations": int(model.optimizer.iterations.numpy()),
        "lambda_components": components,
        "lambda_per_replica": from_run,
        "lambda_devices": devices,
        "expected_lambda": float(schedule(STEPS)),
    }


def first_batch_loss() -> float:
    """The margin loss of batch 0 at the initial weights, computed directly."""
    x, y = make_data()
    w1, b1, kernel = initial_weights()
    xb, yb = x[:GLOBAL_BATCH], y[:GLOBAL_BATCH]
    features = np.maximum(xb @ w1 + b1, 0.0)
    lam = float(keras_lsoftmax.schedules.InverseDecay(**SCHEDULE)(1))
    logits = keras_lsoftmax.ops.lsoftmax_logits(features, kernel, yb, MARGIN, lam)
    per_sample = tf.nn.sparse_softmax_cross_entropy_with_logits(yb, logits)
    return float(tf.reduce_mean(per_sample))


def uneven_epoch(model_class, strategy) -> dict:
    """One epoch of 61 samples in global batches of 16 (the last splits
    unevenly over the replicas), with learning rate 0 so that the exact
    epoch accuracy can be counted afterwards."""
    keras.utils.clear_session()
    keras.utils.set_random_seed(3)
    x = np.random.default_rng(5).normal(size=(61, FEATURES)).astype("float32")
    y = np.random.default_rng(6).integers(0, CLASSES, 61).astype("int32")
    with strategy.scope():
        head = (
            keras_lsoftmax.LSoftmaxDense(CLASSES, margin=MARGIN)
            if model_class is keras_lsoftmax.Sequential
            else keras.layers.Dense(CLASSES, use_bias=False)
        )
        model = model_class([keras.Input((FEATURES,)), head])
        model.compile(
            keras.optimizers.SGD(0.0),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    history = model.fit(x, y, batch_size=16, shuffle=False, verbose=0).history
    predicted = np.argmax(model.predict(x, verbose=0), axis=1)
    return {
        "history": {k: v[0] for k, v in history.items()},
        "metrics_result": {
            k: float(v) for k, v in model.get_metrics_result().items()
        },
        "exact_accuracy": float(np.mean(predicted == y)),
    }


def sampled(strategy, jit_compile: bool = False, lazy: bool = False) -> dict:
    """Two steps of a sampling CosFace head; see the module docstring."""
    keras.utils.clear_session()
    x = make_data()[0][: 2 * GLOBAL_BATCH]
    y = np.random.default_rng(4).integers(0, SAMPLED_CLASSES, len(x))
    y = y.astype("int32")
    kernel = np.random.default_rng(5).normal(size=(SAMPLED_CLASSES, FEATURES))
    with strategy.scope():
        head = keras_lsoftmax.CosFaceDense(
            SAMPLED_CLASSES, scale=16.0, sample_rate=SAMPLED_RATE, seed=3
        )
        model = keras_lsoftmax.Sequential([keras.Input((FEATURES,)), head])
        head.kernel.assign(kernel.astype("float32"))
        optimizer = (
            keras_lsoftmax.optimizers.LazyAdam(LEARNING_RATE)
            if lazy
            else keras.optimizers.SGD(LEARNING_RATE)
        )
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile,
        )
    rows, losses = RowsMoved(head), BatchLosses()
    # fit, not train_on_batch: Keras's train_on_batch hands every replica
    # the whole batch instead of splitting it.
    try:
        model.fit(
            x,
            y,
            batch_size=GLOBAL_BATCH,
            shuffle=False,
            verbose=0,
            callbacks=[rows, losses],
        )
    except ValueError as error:
        return {"error": str(error)}
    return {
        "kernel": keras.ops.convert_to_numpy(head.kernel).tolist(),
        "rows_moved": rows.moved,
        "labelled": [len(set(y[:GLOBAL_BATCH])), len(set(y[GLOBAL_BATCH:]))],
        "losses": losses.losses,
    }


def multi_worker_sampled(out_path: str) -> None:
    """The `multi_worker_sampled` mode; see the module docstring."""
    if "TF_CONFIG" in os.environ:
        # Created before any other strategy, as the workers must agree on
        # their collective keys.
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=tf.distribute.experimental.CommunicationImplementation.RING
            )
        )
    else:
        strategy = tf.distribute.get_strategy()
    result = {
        "replicas": strategy.num_replicas_in_sync,
        "sgd": sampled(strategy),
        "lazy": sampled(strategy, lazy=True),
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


def main(out_path: str, kinds: list[str]) -> None:
    if kinds == ["multi_worker_sampled"]:
        multi_worker_sampled(out_path)
        return
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    # One strategy for every run: a second MirroredStrategy in the same
    # process would reuse the collective keys of the first.
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    if kinds == ["sampled"]:
        result = {
            "single": sampled(tf.distribute.get_strategy()),
            "mirrored": sampled(strategy),
            "mirrored_xla": sampled(strategy, jit_compile=True),
            "single_lazy": sampled(tf.distribute.get_strategy(), lazy=True),
            "mirrored_lazy": sampled(strategy, lazy=True),
        }
        with open(out_path, "w") as f:
            json.dump(result, f)
        return
    if kinds:
        result = {
            kind: {
                "single": train(tf.distribute.get_strategy(), kind),
                "mirrored": train(strategy, kind),
            }
            for kind in kinds
        }
        with open(out_path, "w") as f:
            json.dump(result, f)
        return
    single = train(tf.distribute.get_strategy())
    mirrored = train(strategy)
    uneven = uneven_epoch(keras_lsoftmax.Sequential, strategy)
    uneven_keras = uneven_epoch(keras.Sequential, strategy)
    result = {
        "uneven": uneven,
        "uneven_keras": uneven_keras,
        "logical_cpus": devices,
        "single": single,
        "mirrored": mirrored,
        "first_batch_loss": first_batch_loss(),
        "steps": STEPS,
        "global_batch": GLOBAL_BATCH,
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
