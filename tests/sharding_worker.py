"""Trains a class-sharded head with `ModelParallel` and the same model on one
device, and checks what each device holds.

Run with `KERAS_BACKEND=jax` and
`XLA_FLAGS=--xla_force_host_platform_device_count=4`, with a path for the
`.keras` file as the only argument; prints, as JSON, the shapes of the
kernel's and the optimizer state's shards, the collectives of the compiled
train step and the shapes they produce, the largest weight and loss
differences between the two runs, and those between the sharded model and
its saved copy loaded with and without the distribution.
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


def _model():
    keras.utils.set_random_seed(0)
    model = keras_lsoftmax.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(D, activation="relu"),
            keras_lsoftmax.LSoftmaxDense(C, margin=4, name="head"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
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


def main():
    path = sys.argv[1]
    devices = jax.devices()
    assert len(devices) == 4, devices

    keras.distribution.set_distribution(None)
    single = _model()
    initial = np.asarray(single.get_layer("head").kernel)
    single_logs = _fit(single)
    trained = np.asarray(single.get_layer("head").kernel)

    keras.distribution.set_distribution(sharded_distribution(devices))
    sharded = _model()
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
                "collectives": _collectives(hlo),
                # Arrays of the whole kernel's shape, of any element type.
                "full_kernel_arrays": len(re.findall(rf"\[{C},{D}\]", hlo)),
                "shard_arrays": len(re.findall(rf"\[{C // 4},{D}\]", hlo)),
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
