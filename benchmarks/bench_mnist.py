"""Epoch time of a small MNIST CNN with a Dense head and with LSoftmaxDense.

Both models share the backbone, batch size, optimizer and loss; they differ
only in the head: `keras.layers.Dense(10, use_bias=False)` in a plain
`keras.Sequential`, or `keras_lsoftmax.LSoftmaxDense(10, margin=4)` in a
`keras_lsoftmax.Sequential` (margin logits, plain-logit accuracy, λ and θ
logged). After a warm-up epoch each (tracing), epochs alternate
A B A B ... and the script reports median epoch times and their ratio.

Usage:

    python benchmarks/bench_mnist.py --epochs 3 --out bench_mnist.json

Without `--data PATH` (a local copy of the keras.datasets file) MNIST is
downloaded through `keras.datasets.mnist`.
"""

import argparse
import json
import statistics
import time
from typing import Any

import keras
import numpy as np

import keras_lsoftmax


class EpochTimer(keras.callbacks.Callback):
    """Records the wall time of each training epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.times.append(time.perf_counter() - self._start)


def load_mnist(path: str | None, limit: int) -> tuple[np.ndarray, np.ndarray]:
    if path:
        with np.load(path) as data:
            x, y = data["x_train"], data["y_train"]
    else:
        (x, y), _ = keras.datasets.mnist.load_data()
    x = x[:limit].astype("float32")[..., None] / 255.0
    return x, y[:limit].astype("int32")


def build(head: str, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    backbone = [
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
    ]
    if head == "dense":
        model = keras.Sequential(
            backbone + [keras.layers.Dense(10, use_bias=False)]
        )
    else:
        model = keras_lsoftmax.Sequential(
            backbone + [keras_lsoftmax.LSoftmaxDense(10, margin=4)]
        )
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def run(args: argparse.Namespace) -> dict[str, Any]:
    x, y = load_mnist(args.data, args.limit)
    heads = ["dense", "lsoftmax"]
    models = {head: build(head, args.seed) for head in heads}
    timers = {head: EpochTimer() for head in heads}
    for _ in range(args.epochs + 1):  # the first epoch of each is warm-up
        for head in heads:
            models[head].fit(
                x,
                y,
                batch_size=args.batch_size,
                epochs=1,
                verbose=0,
                callbacks=[timers[head]],
            )
    medians = {h: statistics.median(timers[h].times[1:]) for h in heads}
    return {
        "images": len(x),
        "batch_size": args.batch_size,
        "epochs_timed": args.epochs,
        "epoch_seconds": {h: timers[h].times[1:] for h in heads},
        "median_seconds": medians,
        "ratio": medians["lsoftmax"] / medians["dense"],
    }


def markdown(result: dict[str, Any]) -> str:
    med = result["median_seconds"]
    return "\n".join(
        [
            "| head | median epoch (s) | ratio to Dense |",
            "|---|---|---|",
            f"| Dense(use_bias=False) | {med['dense']:.2f} | 1.000 |",
            f"| LSoftmaxDense(m=4) | {med['lsoftmax']:.2f} | "
            f"{result['ratio']:.3f} |",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="mnist.npz path (default: download)")
    parser.add_argument("--limit", type=int, default=60000, help="images")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the result as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print(markdown(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
