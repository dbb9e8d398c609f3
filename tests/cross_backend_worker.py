"""Saves a `.keras` file under the backend of `KERAS_BACKEND`, then loads.

    python -m tests.cross_backend_worker DIR

trains a small multi-output model two steps (λ scheduled in the step) and
writes DIR/<backend>.keras, DIR/<backend>.npy (its predictions on fixed
inputs) and DIR/inputs.npy (`save`); then loads every DIR/*.keras and writes
DIR/<saved>-on-<backend>.npy (`load`).
"""

import pathlib
import sys

import keras
import numpy as np

import keras_lsoftmax
from tests.datasets import random_classification

D, C = 12, 5


def _model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((D,), name="features")
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    main = keras_lsoftmax.LSoftmaxDense(C, margin=3, name="main")(hidden)
    aux = keras.layers.Dense(2, name="aux")(hidden)
    model = keras_lsoftmax.Model(inputs, {"main": main, "aux": aux})
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss={
            "main": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "aux": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        },
    )
    return model


def save(folder: pathlib.Path) -> None:
    x, y = random_classification(32, D, C, seed=0)
    model = _model()
    schedule = keras_lsoftmax.schedules.InverseDecay(100.0, 0.5, 1.0)
    model.fit(
        x,
        {"main": y, "aux": y % 2},
        batch_size=16,
        verbose=0,
        callbacks=[keras_lsoftmax.LambdaScheduler(schedule)],
    )
    backend = keras.backend.backend()
    model.save(folder / f"{backend}.keras")
    np.save(folder / "inputs.npy", x)
    np.save(folder / f"{backend}.npy", _predict(model, x))


def load(folder: pathlib.Path) -> None:
    x = np.load(folder / "inputs.npy")
    backend = keras.backend.backend()
    for path in sorted(folder.glob("*.keras")):
        model = keras.saving.load_model(path)
        np.save(folder / f"{path.stem}-on-{backend}.npy", _predict(model, x))


def _predict(model, x):
    outputs = model.predict(x, verbose=0)
    lam = model.get_layer("main").lambda_
    return np.concatenate(
        [outputs["main"], outputs["aux"], np.full((len(x), 1), float(lam))],
        axis=1,
    )


if __name__ == "__main__":
    folder = pathlib.Path(sys.argv[1])
    save(folder)
    load(folder)
