"""Train an L-Softmax MNIST classifier on several machines (workers) at once.

`tf.distribute.MultiWorkerMirroredStrategy` keeps one copy of the model per
worker and all-reduces the gradients after every step, so every worker holds
the same weights, the same λ and the same optimizer step at all times. This
script trains a flattened-MNIST MLP whose head is `keras_lsoftmax.LSoftmaxDense`
(m = 4), anneals λ with `keras_lsoftmax.LambdaScheduler`, and saves the model.

Each worker finds the cluster in the `TF_CONFIG` environment variable, a JSON
object with the address of every worker and the index of this one. `--ports`
writes it for a cluster on this machine (127.0.0.1); on real machines set it
yourself. Two workers on one machine, in two terminals:

    python examples/multi_worker.py --worker-index 0 --ports 23456,23457 \\
        --data mnist.npz --steps 500 --out /tmp/lsoftmax_mw
    python examples/multi_worker.py --worker-index 1 --ports 23456,23457 \\
        --data mnist.npz --steps 500 --out /tmp/lsoftmax_mw

Two machines, with TF_CONFIG (index 0 on the first machine, 1 on the second;
each machine must reach the other's port):

    export TF_CONFIG='{"cluster": {"worker": ["host-a:23456", "host-b:23456"]},
                       "task": {"type": "worker", "index": 0}}'
    python examples/multi_worker.py --data mnist.npz --steps 500 --out /tmp/out

Without `--ports` and without TF_CONFIG the script trains on this process
alone, which is the single-worker reference: with the same `--batch-size`
(the *global* batch, split evenly over the workers) it ends with the same
weights up to float rounding. `--data` is a local copy of the file
`keras.datasets.mnist` downloads (keys `x_train`, `y_train`, `x_test`,
`y_test`); without it every worker downloads MNIST. `--synthetic` replaces
MNIST by random data of the same shape, for tests.

Each worker blocks when it creates the strategy until every worker of the
cluster has connected. Every worker gets the whole data set; `fit` splits
each global batch between them. The chief (worker 0) writes `model.keras` and
`summary.json` to `--out`; the other workers save to a temporary directory,
which they delete, as the Keras multi-worker guide advises.

Settings: the collectives are set to
`CommunicationImplementation.RING` (gRPC, works on CPUs; `NCCL` needs GPUs).
`shuffle=False` only makes the run comparable with the single-worker
reference; shuffled runs are as correct. `enable_op_determinism` is not
needed: two workers and one worker agree to float rounding (3e-8 after 3
steps), and the two workers hold bit-identical weights. The script is plain
Keras: the two fixes Keras 3.15's `fit` needs with more than one worker are
inside `keras_lsoftmax.Sequential` and `keras_lsoftmax.Model`.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import keras_lsoftmax  # noqa: E402

CLASSES = 10
FEATURES = 28 * 28


class _HelpFormatter(
    argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter
):
    def _get_help_string(self, action: argparse.Action) -> str:
        # A required option has no default to show.
        if action.required:
            return f"{action.help} (required)"
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--worker-index",
        type=int,
        default=None,
        help="this worker's index in --ports (0 is the chief).",
    )
    parser.add_argument(
        "--ports",
        default=None,
        help="comma-separated ports of all workers on 127.0.0.1; writes "
        "TF_CONFIG. Without it, TF_CONFIG is read from the environment.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--data",
        metavar="PATH",
        default=None,
        help="local mnist.npz (x_train, y_train, x_test, y_test); None: "
        "keras.datasets.mnist.load_data(), which downloads.",
    )
    source.add_argument(
        "--synthetic",
        action="store_true",
        help="random data of MNIST's shape instead of --data.",
    )
    parser.add_argument(
        "--steps", type=int, default=200, help="training steps (one epoch)."
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="the global batch, split evenly over the workers.",
    )
    parser.add_argument("--hidden", type=int, default=64, help="hidden units.")
    parser.add_argument("--margin", type=int, default=4, help="the paper's m.")
    parser.add_argument(
        "--learning-rate", type=float, default=0.05, help="SGD, momentum 0.9."
    )
    parser.add_argument(
        "--lambda-base",
        type=float,
        default=1000.0,
        help="λ = max(min, base·(1 + gamma·t)^-power); defaults: the "
        "authors' MNIST schedule.",
    )
    for flag, default in [("gamma", 2.5e-5), ("power", 35.0), ("min", 0.0)]:
        parser.add_argument(
            f"--lambda-{flag}", type=float, default=default, help="see above."
        )
    parser.add_argument(
        "--seed", type=int, default=0, help="initial weights (and --synthetic)."
    )
    parser.add_argument("--out", required=True, help="the chief's output dir.")
    parser.add_argument(
        "--report",
        default=None,
        help="also write this worker's summary (JSON) to this path.",
    )
    parser.add_argument(
        "--verbose",
        type=int,
        default=2,
        choices=(0, 1, 2),
        help="Keras verbosity of the chief (the others are quiet).",
    )
    args = parser.parse_args(argv)
    if args.ports is not None and args.worker_index is None:
        parser.error("--ports needs --worker-index")
    if args.batch_size < 1 or args.steps < 1:
        parser.error("--batch-size and --steps must be positive")
    return args


def configure_cluster(args: argparse.Namespace) -> tuple[int, int]:
    """Writes TF_CONFIG from --ports if given; returns (index, num_workers)."""
    if args.ports is not None:
        ports = [int(p) for p in args.ports.split(",")]
        if not 0 <= args.worker_index < len(ports):
            raise SystemExit(
                f"--worker-index {args.worker_index} is not an index of "
                f"--ports {args.ports}"
            )
        os.environ["TF_CONFIG"] = json.dumps(
            {
                "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                "task": {"type": "worker", "index": args.worker_index},
            }
        )
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    workers = config.get("cluster", {}).get("worker", [])
    index = config.get("task", {}).get("index", 0)
    return index, max(len(workers), 1)


def is_chief(index: int) -> bool:
    # No "chief" task in the cluster spec: worker 0 is the chief.
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task_type = config.get("task", {}).get("type", "worker")
    return task_type == "chief" or (task_type == "worker" and index == 0)


def load_data(args: argparse.Namespace) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test), features flattened to [0, 1]."""
    n = args.steps * args.batch_size
    if args.synthetic:
        rng = np.random.default_rng(args.seed)
        x = rng.random((n + 256, FEATURES), dtype=np.float32)
        y = rng.integers(0, CLASSES, size=n + 256).astype("int32")
        return x[:n], y[:n], x[n:], y[n:]
    if args.data is None:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    else:
        with np.load(args.data) as data:
            x_train, y_train = data["x_train"], data["y_train"]
            x_test, y_test = data["x_test"], data["y_test"]
    # Repeat the training set if --steps asks for more than one pass.
    index = np.arange(n) % len(x_train)
    x = x_train[index].reshape(n, FEATURES).astype("float32") / 255.0
    x_test = x_test.reshape(len(x_test), FEATURES).astype("float32") / 255.0
    return x, y_train[index].astype("int32"), x_test, y_test.astype("int32")


def build_model(args: argparse.Namespace) -> keras_lsoftmax.Sequential:
    model = keras_lsoftmax.Sequential(
        [
            keras.Input((FEATURES,), name="pixels"),
            keras.layers.Dense(args.hidden, activation="relu", name="hidden"),
            keras_lsoftmax.LSoftmaxDense(
                CLASSES, margin=args.margin, name="lsoftmax"
            ),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(args.learning_rate, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def named_weights(model) -> dict[str, np.ndarray]:
    """{"layer/variable": value} for every weight, λ included."""
    return {
        f"{layer.name}/{weight.name}": keras.ops.convert_to_numpy(weight)
        for layer in model.layers
        for weight in layer.weights
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    index, num_workers = configure_cluster(args)
    chief = is_chief(index)
    if args.batch_size % num_workers:
        raise SystemExit(
            f"--batch-size {args.batch_size} must be a multiple of the "
            f"number of workers ({num_workers})"
        )
    # The strategy reads TF_CONFIG here, and must exist before any op runs.
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING
        )
    )
    keras.utils.set_random_seed(args.seed)  # same initial weights everywhere
    x, y, x_test, y_test = load_data(args)
    with strategy.scope():
        model = build_model(args)
    initial = named_weights(model)
    schedule = keras_lsoftmax.schedules.InverseDecay(
        base=args.lambda_base,
        gamma=args.lambda_gamma,
        power=args.lambda_power,
        minimum=args.lambda_min,
    )
    start = time.perf_counter()
    history = model.fit(
        x,
        y,
        batch_size=args.batch_size,
        epochs=1,
        shuffle=False,
        verbose=args.verbose if chief else 0,
        callbacks=[keras_lsoftmax.LambdaScheduler(schedule)],
    )
    seconds = time.perf_counter() - start
    head = model.get_layer("lsoftmax")
    probe = x_test[:64]
    summary = {
        "worker_index": index,
        "num_workers": num_workers,
        "chief": chief,
        "replicas": strategy.num_replicas_in_sync,
        "steps": int(model.optimizer.iterations.numpy()),
        "fit_seconds": seconds,
        "loss": history.history["loss"],
        "accuracy": history.history["accuracy"],
        "lambda": float(keras.ops.convert_to_numpy(head.lambda_)),
        "expected_lambda": float(schedule(args.steps)),
        "weights": {k: w.tolist() for k, w in named_weights(model).items()},
        "max_update": max(
            float(np.max(np.abs(w - initial[k])))
            for k, w in named_weights(model).items()
        ),
        "probe_predictions": model.predict(probe, verbose=0).tolist(),
        "test_accuracy": float(
            np.mean(
                np.argmax(model.predict(x_test, verbose=0), axis=1) == y_test
            )
        ),
    }
    save_dir = args.out if chief else tempfile.mkdtemp(prefix="lsoftmax_mw_")
    os.makedirs(save_dir, exist_ok=True)
    model_path = os.path.join(save_dir, "model.keras")
    model.save(model_path)
    summary["model_path"] = model_path if chief else None
    with open(os.path.join(save_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    if not chief:
        shutil.rmtree(save_dir, ignore_errors=True)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(summary, f)
    if chief:
        print(
            f"worker {index} of {num_workers}: {summary['steps']} steps in "
            f"{seconds:.1f} s, loss {summary['loss'][-1]:.4f}, "
            f"λ {summary['lambda']:.4g}, test accuracy "
            f"{summary['test_accuracy']:.4f}; saved {model_path}"
        )
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
