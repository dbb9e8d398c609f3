"""Epoch time of a small MNIST CNN with a Dense head and with LSoftmaxDense.

Both models share the backbone, batch size, optimizer and loss; they differ
only in the head: `keras.layers.Dense(10, use_bias=False)` in a plain
`keras.Sequential`, or `keras_lsoftmax.LSoftmaxDense(10, margin=4)` in a
`keras_lsoftmax.Sequential` (margin logits, plain-logit accuracy, λ and θ
logged). After a warm-up epoch each (tracing), epochs alternate
A B A B ... and the script reports median epoch times and their ratio.

Usage (from the repository root):

    python benchmarks/bench_mnist.py --epochs 3 --out bench_mnist.json
    python benchmarks/bench_mnist.py --data mnist.npz
    python benchmarks/bench_mnist.py --smoke  # a tiny run, no download

Without `--data PATH` (a local copy of the keras.datasets file) MNIST is
downloaded through `keras.datasets.mnist`. `--smoke` times one epoch of 320
images per head (after the warm-up epoch): those of `--data` if given, else
random images of MNIST's shape, so that it needs no download.

Run time of the default run (60000 images, batch 128, 1 warm-up and 3 timed
epochs per head) on a 2-core x86-64 CPU: about 2.6 minutes after the
download, computed from the median epoch times in
`docs/benchmarks/bench_mnist_cpu.json` (19.9 s Dense, 18.9 s L-Softmax, four
epochs each). `--smoke` took 3 s after the imports (12 s in all), measured
on the same machine. A line on stderr reports each epoch as it ends, with
the time left.
"""

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

try:
    import benchmarks  # noqa: F401
except ImportError:  # run as `python benchmarks/bench_mnist.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402

import keras_lsoftmax  # noqa: E402
from benchmarks.common import HelpFormatter  # noqa: E402
from benchmarks.common import Progress  # noqa: E402
from benchmarks.common import add_run_arguments  # noqa: E402
from benchmarks.common import environment  # noqa: E402
from benchmarks.common import parse_smoke  # noqa: E402

SMOKE = {"limit": 320, "epochs": 1, "batch_size": 64}


class EpochTimer(keras.callbacks.Callback):
    """Records the wall time of each training epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.times.append(time.perf_counter() - self._start)


def load_mnist(
    path: str | None, limit: int, synthetic: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The first `limit` training images of MNIST as float32 in [0, 1] of
    shape (N, 28, 28, 1), and their int32 labels.

    Args:
        path: a local mnist.npz (the keras.datasets format), or None to use
            `keras.datasets.mnist.load_data()` (which downloads).
        limit: the number of images.
        synthetic: without `path`, `limit` seeded random images and labels
            of MNIST's shape instead (no download).
    """
    if path:
        with np.load(path) as data:
            x, y = data["x_train"], data["y_train"]
    elif synthetic:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (limit, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, limit, dtype=np.uint8)
    else:
        (x, y), _ = keras.datasets.mnist.load_data()
    x = x[:limit].astype("float32")[..., None] / 255.0
    return x, y[:limit].astype("int32")


def build(head: str, seed: int) -> keras.Model:
    """The compiled model with the `head` ("dense" or "lsoftmax"); both
    start from the same weights for one `seed`."""

    # Seeded initializers, not keras.utils.set_random_seed, which imports
    # TensorFlow on every backend where it is installed.
    def glorot(offset: int) -> keras.initializers.Initializer:
        return keras.initializers.GlorotUniform(seed=seed + offset)

    backbone = [
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(
            32, 3, activation="relu", kernel_initializer=glorot(0)
        ),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(
            64, 3, activation="relu", kernel_initializer=glorot(1)
        ),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(
            128, activation="relu", kernel_initializer=glorot(2)
        ),
    ]
    if head == "dense":
        output = keras.layers.Dense(
            10, use_bias=False, kernel_initializer=glorot(3)
        )
        model = keras.Sequential([*backbone, output])
    else:
        output = keras_lsoftmax.LSoftmaxDense(
            10, margin=4, kernel_initializer=glorot(3)
        )
        model = keras_lsoftmax.Sequential([*backbone, output])
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def run(args: argparse.Namespace) -> dict[str, Any]:
    x, y = load_mnist(args.data, args.limit, synthetic=args.smoke)
    heads = ["dense", "lsoftmax"]
    models = {head: build(head, args.seed) for head in heads}
    timers = {head: EpochTimer() for head in heads}
    progress = Progress((args.epochs + 1) * len(heads))
    for epoch in range(args.epochs + 1):  # the first of each is warm-up
        for head in heads:
            models[head].fit(
                x,
                y,
                batch_size=args.batch_size,
                epochs=1,
                verbose=0,
                callbacks=[timers[head]],
            )
            progress.done_with(
                f"{head} epoch {epoch}/{args.epochs}"
                + (" (warm-up)" if epoch == 0 else "")
            )
    medians = {h: statistics.median(timers[h].times[1:]) for h in heads}
    return {
        "images": len(x),
        "batch_size": args.batch_size,
        "epochs_timed": args.epochs,
        "epoch_seconds": {h: timers[h].times[1:] for h in heads},
        "median_seconds": medians,
        "ratio": medians["lsoftmax"] / medians["dense"],
        "data": "random (--smoke)" if args.smoke and not args.data else "MNIST",
        **environment(),
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
    parser = argparse.ArgumentParser(
        prog="bench_mnist.py",
        description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--data", metavar="PATH",
        help="local mnist.npz (default: download through "
        "keras.datasets.mnist; with --smoke, random images)",
    )
    parser.add_argument(
        "--limit", type=int, default=60000, help="training images used"
    )
    parser.add_argument(
        "--epochs", type=int, default=3,
        help="timed epochs per head, after one warm-up epoch",
    )
    parser.add_argument("--batch-size", type=int, default=128, help="batch size")
    add_run_arguments(parser, "seed of the initial weights", SMOKE)
    parse_smoke(parser, argv, SMOKE)
    args = parser.parse_args(argv)
    for name in ("limit", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(
                f"--{name.replace('_', '-')} must be >= 1, got "
                f"{getattr(args, name)}"
            )
    return args


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
