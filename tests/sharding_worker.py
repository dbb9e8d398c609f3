"""Trains a class-sharded head with `ModelParallel` and the same model on one
device, and checks what each device holds.

Run with `KERAS_BACKEND=jax` and
`XLA_FLAGS=--xla_force_host_platform_device_count=4`, with a path for the
`.keras` file and the name of a head of `HEADS` as arguments; prints, as
JSON, the shapes of the kernel's and the optimizer state's shards, the
collectives of the compiled train step and the shapes they produce, the
largest weight and loss differences between the two runs, and those between
the sharded model and its saved copy loaded with and without the
distribution.

With `sampled` instead of a head, trains a sharded Partial-FC head
(`sample_rate=0.1`) for one step, twice from the same seed, and prints the
kernel rows each device's shard changed, whether the labelled rows are
among them, the collectives of the compiled step and the difference between
the two runs; then, with `LazyAdam`, the rows each shard moves in a second
step and the shards of the kernel's slots.
"""

import json
import re
import sys

import jax
import keras
import numpy as np

import keras_lsoftmax
from tests.datasets import random_classification

C, D, BATCH, STEPS = 4000, 32, 64, 4
# The collectives of XLA's HLO text: `%name = f32[...] all-gather(...)`.
_COLLECTIVE = re.compile(
    r"= \(?([^=]*?)\)? (all-gather|all-reduce|all-to-all|collective-permute|"
    r"reduce-scatter)(?:-start)?\("
)


def sharded_distribution(devices):
    """The recipe of docs/sharding.md: the head's kernel split by class."""
    mesh = keras.distribution.DeviceMesh(
        (1, len(devices)), ["batch", "model"], devices
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*head/kernel"] = ("model", None)
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )


HEADS = {
    "lsoftmax": lambda: keras_lsoftmax.LSoftmaxDense(C, name="head"),
    "sphereface": lambda: keras_lsoftmax.SphereFaceDense(C, name="head"),
    "cosface": lambda: keras_lsoftmax.CosFaceDense(C, name="head"),
    "arcface_2_subcenters": lambda: keras_lsoftmax.ArcFaceDense(
        C, sub_centers=2, name="head"
    ),
}


# Classes each shard keeps: max(int(0.1 · C/4), BATCH).
SAMPLED = {
    "sampled": lambda: keras_lsoftmax.LSoftmaxDense(
        C, sample_rate=0.1, seed=3, name="head"
    ),
}


def _model(head, optimizer=None):
    keras.utils.set_random_seed(0)
    model = keras_lsoftmax.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(D, activation="relu"),
            {**HEADS, **SAMPLED}[head](),
        ]
    )
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(1e-2, epsilon=1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _data():
    return random_classification(BATCH * STEPS, D, C, seed=1)


def _fit(model):
    x, y = _data()
    schedule = keras_lsoftmax.schedules.InverseDecay(100.0, 0.5, 1.0)
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[keras_lsoftmax.LambdaScheduler(schedule)],
    )
    return {k: float(v[-1]) for k, v in history.history.items()}


def _shard_shapes(variable):
    return [list(s.data.shape) for s in variable.value.addressable_shards]


def _kernel_slots(model):
    kernel = model.get_layer("head").kernel
    return [
        v
        for v in model.optimizer.variables
        if tuple(v.shape) == tuple(kernel.shape)
    ]


def _compiled_step(model):
    """The HLO text of the compiled train step of one device.

    The step is `model.train_step` jitted as Keras's JAX trainer jits it:
    the state in and out with the variables' shardings.
    """
    state = tuple(
        [v.value for v in variables]
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
    )
    shardings = jax.tree.map(lambda a: a.sharding, state)
    x, y = _data()
    step = jax.jit(model.train_step, out_shardings=(None, shardings))
    return step.lower(state, (x[:BATCH], y[:BATCH])).compile().as_text()


def _collectives(hlo):
    """(op, result shapes) of each collective of `hlo`."""
    return [
        (op, re.findall(r"\w+\[[\d,]*\]", shapes))
        for shapes, op in _COLLECTIVE.findall(hlo)
    ]


def _hlo_report(hlo, rows):
    return {
        "collectives": _collectives(hlo),
        # Arrays of the whole kernel's shape, of any element type.
        "full_kernel_arrays": len(re.findall(rf"\[{rows},{D}\]", hlo)),
        "shard_arrays": len(re.findall(rf"\[{rows // 4},{D}\]", hlo)),
    }


def sampled_report():
    """One sharded Partial-FC step, twice from the same seed."""
    keras.distribution.set_distribution(sharded_distribution(jax.devices()))
    x, y = _data()
    kernels = []
    for _ in range(2):
        model = _model("sampled")
        initial = np.asarray(model.get_layer("head").kernel)
        logs = model.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, verbose=0)
        kernels.append(np.asarray(model.get_layer("head").kernel))
    # Adam moves a row in its first step only if the row has a gradient.
    changed = np.any(kernels[0] != initial, axis=1)
    return {
        **_lazy_second_step(x, y),
        "changed_rows_per_shard": changed.reshape(4, -1).sum(axis=1).tolist(),
        "labelled_rows_changed": bool(np.all(changed[y[:BATCH]])),
        "loss": float(logs.history["loss"][-1]),
        "rerun_max_diff": float(np.max(np.abs(kernels[0] - kernels[1]))),
        **_hlo_report(_compiled_step(model), C),
    }


def _lazy_second_step(x, y):
    """The rows LazyAdam moves in a second sharded sampled step."""
    optimizer = keras_lsoftmax.optimizers.LazyAdam(1e-2, epsilon=1e-4)
    model = _model("sampled", optimizer)
    kernel = model.get_layer("head").kernel
    model.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, verbose=0)
    before = np.asarray(kernel)
    second = slice(BATCH, 2 * BATCH)
    model.fit(x[second], y[second], batch_size=BATCH, verbose=0)
    moved = np.any(np.asarray(kernel) != before, axis=1)
    return {
        "lazy_moved_rows_per_shard": moved.reshape(4, -1).sum(axis=1).tolist(),
        "lazy_labelled_rows_moved": bool(np.all(moved[y[second]])),
        "lazy_slot_shards": [_shard_shapes(v) for v in _kernel_slots(model)],
    }


def main():
    path, head = sys.argv[1:3]
    devices = jax.devices()
    assert len(devices) == 4, devices
    if head in SAMPLED:
        print(json.dumps(sampled_report()))
        return

    keras.distribution.set_distribution(None)
    single = _model(head)
    initial = np.asarray(single.get_layer("head").kernel)
    single_logs = _fit(single)
    trained = np.asarray(single.get_layer("head").kernel)

    keras.distribution.set_distribution(sharded_distribution(devices))
    sharded = _model(head)
    sharded_logs = _fit(sharded)
    kernel = sharded.get_layer("head").kernel
    hlo = _compiled_step(sharded)
    sharded.save(path)
    loaded = keras.saving.load_model(path)
    loaded_kernel = loaded.get_layer("head").kernel
    keras.distribution.set_distribution(None)
    unsharded = keras.saving.load_model(path)

    def max_diff(a, b):
        return max(
            float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
            for u, v in zip(a.weights, b.weights)
        )

    print(
        json.dumps(
            {
                "devices": len(devices),
                "classes": C,
                "rows": int(kernel.shape[0]),
                "dim": D,
                "kernel_path": kernel.path,
                "kernel_spec": str(kernel.value.sharding.spec),
                "kernel_shards": _shard_shapes(kernel),
                "kernel_shard_devices": sorted(
                    s.device.id for s in kernel.value.addressable_shards
                ),
                "slot_names": [v.path for v in _kernel_slots(sharded)],
                "slot_shards": [_shard_shapes(v) for v in _kernel_slots(sharded)],
                "loaded_kernel_shards": _shard_shapes(loaded_kernel),
                **_hlo_report(hlo, int(kernel.shape[0])),
                "max_weight_diff": max_diff(single, sharded),
                "max_update": float(np.max(np.abs(trained - initial))),
                "loaded_max_diff": max_diff(sharded, loaded),
                "unsharded_load_max_diff": max_diff(sharded, unsharded),
                "unsharded_load_kernel_shards": _shard_shapes(
                    unsharded.get_layer("head").kernel
                ),
                "single": single_logs,
                "sharded": sharded_logs,
            }
        )
    )


if __name__ == "__main__":
    main()
