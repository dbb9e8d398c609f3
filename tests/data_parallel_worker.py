"""Trains one model on one JAX device and on two with `DataParallel`.

Run with `KERAS_BACKEND=jax` and
`XLA_FLAGS=--xla_force_host_platform_device_count=2`; prints, as JSON, the
largest weight difference between the two runs and their final logs.
With arguments `KIND...`, does so once per head of the family named
(`tests.family_heads.HEADS`) instead of `LSoftmaxDense`, and prints
{KIND: report}.
"""

import json
import sys

import jax
import keras
import numpy as np

import keras_lsoftmax
from tests.datasets import random_classification
from tests.family_heads import HEADS

D, C = 10, 4


def _train(distribution, kind=None):
    keras.distribution.set_distribution(distribution)
    keras.utils.set_random_seed(0)
    head = (
        keras_lsoftmax.LSoftmaxDense(C, margin=4, name="head")
        if kind is None
        else HEADS[kind](C, "head")
    )
    model = keras_lsoftmax.Sequential(
        [keras.Input((D,)), keras.layers.Dense(16, activation="relu"), head]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x, y = random_classification(64, D, C, seed=1)
    schedule = keras_lsoftmax.schedules.InverseDecay(100.0, 0.5, 1.0)
    history = model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[keras_lsoftmax.LambdaScheduler(schedule)],
    )
    weights = [np.asarray(v) for v in model.weights]
    logs = {k: float(v[-1]) for k, v in history.history.items()}
    return weights, logs


def _report(devices, kind=None):
    single, single_logs = _train(None, kind)
    parallel, parallel_logs = _train(
        keras.distribution.DataParallel(devices=devices), kind
    )
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(single, parallel))
    return {
        "devices": len(devices),
        "max_weight_diff": diff,
        "single": single_logs,
        "data_parallel": parallel_logs,
    }


def main(kinds):
    devices = jax.devices()
    assert len(devices) == 2, devices
    if kinds:
        print(json.dumps({kind: _report(devices, kind) for kind in kinds}))
    else:
        print(json.dumps(_report(devices)))


if __name__ == "__main__":
    main(sys.argv[1:])
