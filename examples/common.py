"""Helpers shared by the example scripts (not part of the package).

Data loading (`--data`), seeding, the output folder, the paper's building
blocks (conv + BN + PReLU), the step learning-rate schedule, the authors' λ
schedule scaled to a run's length, and the angle statistics of features.
The scripts import it as `common`, which works because Python puts the
script's own folder first on `sys.path`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import keras
import numpy as np

import keras_lsoftmax

# The authors' MNIST λ schedule (wy1iu/LargeMargin_Softmax_Loss,
# myexamples/mnist): base 1000, gamma 2.5e-5, power 35, over 30k iterations.
# λ crosses 1 near iteration 8.7k, i.e. at 29% of that run.
AUTHORS_BASE = 1000.0
AUTHORS_POWER = 35.0
AUTHORS_CROSSING = 8700.0 / 30000.0
PAPER_LR_DROPS = (12.0 / 18.0, 15.0 / 18.0)

SMOKE_TRAIN = 320
SMOKE_TEST = 160
VALIDATION_SIZE = 5000


def example_parser(doc: str, dataset: str, name: str) -> argparse.ArgumentParser:
    """A parser with --data, --out (default out/NAME), --smoke and --verbose.

    Args:
        doc: the example's module docstring; its first paragraph is the
            description.
        dataset: "mnist" or "cifar10", for --data's help.
        name: the example's name, for --out's default.
    """
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog="The full description: the module docstring, docs/examples.md.",
    )
    _add_common_args(parser, dataset)
    parser.set_defaults(out=os.path.join("out", name))
    return parser


def _add_common_args(parser: argparse.ArgumentParser, dataset: str) -> None:
    """Adds --data, --out, --smoke and --verbose to `parser`."""
    parser.add_argument(
        "--data",
        metavar="PATH",
        default=None,
        help=f"local {dataset} .npz with x_train, y_train, x_test, y_test "
        f"(default: keras.datasets.{dataset}.load_data(), which downloads)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="output folder (created if missing; default: %(default)s)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"smoke test: {SMOKE_TRAIN} training and {SMOKE_TEST} test "
        "images, one epoch (default: off)",
    )
    parser.add_argument(
        "--verbose",
        type=int,
        default=0,
        choices=(0, 1, 2),
        help="Keras verbosity: 1 progress bars, 2 one line per epoch, 0 only "
        "the script's own line per epoch, with the time left "
        "(default: %(default)s)",
    )


class _IncreasingFractions(argparse.Action):
    """Stores a list of strictly increasing numbers in (0, 1), or exits with
    an error naming the option and the values."""

    def __call__(self, parser, namespace, values, option_string=None):
        if any(not 0 < v < 1 for v in values) or values != sorted(set(values)):
            parser.error(
                f"{option_string} must be strictly increasing fractions in "
                f"(0, 1), got {values}"
            )
        setattr(namespace, self.dest, values)


def add_sgd_args(parser: argparse.ArgumentParser) -> None:
    """Adds --batch-size, --learning-rate, --lr-drops and --weight-decay to
    `parser`."""
    parser.add_argument("--batch-size", type=int, default=256,
                        help="training batch size (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=0.1,
                        help="initial SGD learning rate, divided by 10 at "
                        "each of --lr-drops (default: %(default)s)")
    parser.add_argument("--lr-drops", type=float, nargs="+",
                        default=list(PAPER_LR_DROPS), metavar="F",
                        action=_IncreasingFractions,
                        help="fractions of the run at which the learning rate "
                        "is divided by 10 (default: 2/3 and 5/6, the "
                        "paper's 12k and 15k of 18k)")
    parser.add_argument("--weight-decay", type=float, default=5e-4,
                        help="Caffe-style weight decay (default: %(default)s)")


def add_mnist_run_args(
    parser: argparse.ArgumentParser, lambda_min: float
) -> None:
    """Adds the run length and λ-schedule options of the MNIST examples."""
    parser.add_argument("--epochs", type=int, default=4,
                        help="epochs per run (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="training steps per run; overrides --epochs "
                        "(rounded up to whole epochs) (default: none, "
                        "--epochs decides)")
    add_sgd_args(parser)
    parser.add_argument("--lambda-cross", type=float, default=AUTHORS_CROSSING,
                        help="fraction of the run at which λ crosses 1 "
                        "(default: %(default).3f, the authors' 8.7k/30k)")
    parser.add_argument("--lambda-min", type=float, default=lambda_min,
                        help="floor of λ (default: %(default)s)")


def add_validation_arg(parser: argparse.ArgumentParser) -> None:
    """Adds --validation: hold VALIDATION_SIZE training images out and
    evaluate on them instead of the test set."""
    parser.add_argument("--validation", action="store_true",
                        help=f"hold out {VALIDATION_SIZE} training images and "
                        "report on them; the test set is not used (for "
                        "choosing a recipe) (default: off)")


def split_name(args) -> str:
    """"validation" under --validation, else "test"."""
    return "validation" if args.validation else "test"


def _load_npz(path: str) -> tuple:
    with np.load(path) as data:
        train = (data["x_train"], data["y_train"])
        return train, (data["x_test"], data["y_test"])


def load_mnist(path: str | None = None) -> tuple:
    """MNIST as float32 images in [0, 1] of shape (N, 28, 28, 1), int labels.

    Args:
        path: a local mnist.npz (the keras.datasets format), or None to use
            `keras.datasets.mnist.load_data()`.
    """
    if path is None:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    else:
        (x_train, y_train), (x_test, y_test) = _load_npz(path)

    def prepare(x, y):
        x = x.astype("float32").reshape(-1, 28, 28, 1) / 255.0
        return x, y.astype("int32").reshape(-1)

    return prepare(x_train, y_train), prepare(x_test, y_test)


def load_cifar10(path: str | None = None) -> tuple:
    """CIFAR-10 as float32 images of shape (N, 32, 32, 3), mean-subtracted.

    Pixels are scaled to [0, 1] and the per-channel mean of the training set
    is subtracted (the authors subtract a mean image).

    Args:
        path: a local .npz with x_train, y_train, x_test, y_test, or None to
            use `keras.datasets.cifar10.load_data()`.
    """
    if path is None:
        train, test = keras.datasets.cifar10.load_data()
        (x_train, y_train), (x_test, y_test) = train, test
    else:
        (x_train, y_train), (x_test, y_test) = _load_npz(path)
    x_train = x_train.astype("float32") / 255.0
    x_test = x_test.astype("float32") / 255.0
    mean = x_train.mean(axis=(0, 1, 2), keepdims=True)
    return (
        (x_train - mean, y_train.astype("int32").reshape(-1)),
        (x_test - mean, y_test.astype("int32").reshape(-1)),
    )


def smoke_subset(train: tuple, test: tuple) -> tuple:
    """The first SMOKE_TRAIN training and SMOKE_TEST test examples."""
    return (
        (train[0][:SMOKE_TRAIN], train[1][:SMOKE_TRAIN]),
        (test[0][:SMOKE_TEST], test[1][:SMOKE_TEST]),
    )


def validation_split(train: tuple, size: int, seed: int = 1234) -> tuple:
    """Splits `size` random examples off the training set (fixed seed)."""
    order = np.random.default_rng(seed).permutation(len(train[1]))
    keep, held = order[size:], order[:size]
    return (train[0][keep], train[1][keep]), (train[0][held], train[1][held])


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and TensorFlow (`keras.utils.set_random_seed`).

    Multi-threaded CPU kernels still add run-to-run noise of the order of
    a few test errors on MNIST; `tf.config.experimental.enable_op_determinism`
    would remove it at a large speed cost.
    """
    keras.utils.set_random_seed(seed)


def output_dir(path: str) -> str:
    """Creates `path` if needed and returns it."""
    os.makedirs(path, exist_ok=True)
    return path


def scaled_gamma(
    total_steps: int,
    base: float = AUTHORS_BASE,
    power: float = AUTHORS_POWER,
    crossing: float = AUTHORS_CROSSING,
) -> float:
    """The `gamma` that makes `base·(1 + gamma·t)^(−power)` cross 1 at t =
    `crossing`·`total_steps`.

    With the defaults and total_steps = 30000 this gives 2.51e-5, the
    authors' MNIST value 2.5e-5.
    """
    crossing_step = max(1.0, crossing * total_steps)
    return (base ** (1.0 / power) - 1.0) / crossing_step


def scaled_inverse_decay(
    total_steps: int,
    crossing: float = AUTHORS_CROSSING,
    minimum: float = 0.0,
    base: float = AUTHORS_BASE,
    power: float = AUTHORS_POWER,
) -> keras_lsoftmax.schedules.InverseDecay:
    """The authors' λ schedule, compressed to a run of `total_steps` steps."""
    gamma = scaled_gamma(total_steps, base, power, crossing)
    return keras_lsoftmax.schedules.InverseDecay(
        base=base, gamma=gamma, power=power, minimum=minimum
    )


def step_learning_rate(
    total_steps: int,
    initial: float = 0.1,
    fractions: tuple = PAPER_LR_DROPS,
) -> keras.optimizers.schedules.LearningRateSchedule:
    """A step schedule: `initial`, ÷10 at each of `fractions` of
    `total_steps`. The defaults are the paper's (0.1, ÷10 at 12k and 15k of
    18k iterations)."""
    boundaries = [max(1, int(round(f * total_steps))) for f in fractions]
    for i in range(1, len(boundaries)):  # strictly increasing, even if tiny
        boundaries[i] = max(boundaries[i], boundaries[i - 1] + 1)
    values = [initial * 0.1**i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def sgd(learning_rate) -> keras.optimizers.Optimizer:
    """The paper's optimizer: SGD with momentum 0.9 (weight decay is put on
    the kernels as an L2 regularizer, see `weight_decay`)."""
    return keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9)


def weight_decay(rate: float = 5e-4) -> keras.regularizers.Regularizer:
    """Caffe's coupled weight decay `rate`: an L2 penalty (rate/2)·‖w‖²,
    whose gradient rate·w goes through the momentum as in Caffe."""
    return keras.regularizers.L2(rate / 2.0)


def conv_bn_prelu(
    x, filters: int, kernel_size: int, decay: float, padding: str = "same"
):
    """Conv (He init, no bias) → BatchNorm → PReLU (per channel, 0.25)."""
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        padding=padding,
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=weight_decay(decay) if decay else None,
    )(x)
    x = keras.layers.BatchNormalization()(x)
    return keras.layers.PReLU(
        alpha_initializer=keras.initializers.Constant(0.25), shared_axes=[1, 2]
    )(x)


def conv_stack(x, groups, decay: float, kernel_size: int = 3):
    """`groups`: a list of (filters, repeats); a 2×2 max pool after each."""
    for filters, repeats in groups:
        for _ in range(repeats):
            x = conv_bn_prelu(x, filters, kernel_size, decay)
        x = keras.layers.MaxPooling2D(2)(x)
    return x


def head(units: int, margin: int, decay: float, name: str = "head"):
    """The classifier: `keras.layers.Dense(use_bias=False)` for margin 0
    (plain softmax), `LSoftmaxDense(margin=m)` otherwise."""
    regularizer = weight_decay(decay) if decay else None
    if margin == 0:
        return keras.layers.Dense(
            units,
            use_bias=False,
            kernel_initializer="he_normal",
            kernel_regularizer=regularizer,
            name=name,
        )
    return keras_lsoftmax.LSoftmaxDense(
        units,
        margin=margin,
        kernel_initializer="he_normal",
        kernel_regularizer=regularizer,
        name=name,
    )


def fc_features(
    x, units: int, decay: float, prelu: bool = True, batch_norm: bool = True
):
    """Flatten → FC `units` (→ BN) (→ PReLU): the feature layer the head
    sees, named "features" (the last of them). Without `batch_norm` the FC
    has a bias."""
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(
        units,
        use_bias=not batch_norm,
        kernel_initializer="he_normal",
        kernel_regularizer=weight_decay(decay) if decay else None,
        name=None if batch_norm or prelu else "features",
    )(x)
    if batch_norm:
        x = keras.layers.BatchNormalization(name=None if prelu else "features")(x)
    if prelu:
        x = keras.layers.PReLU(
            alpha_initializer=keras.initializers.Constant(0.25), name="features"
        )(x)
    return x


def fit_classifier(
    model, train: tuple, margin: int, schedule, steps: tuple, args,
    progress: Progress | None = None,
) -> Timer:
    """Compiles `model` with the paper's SGD and step learning rate, and fits
    it on `train` for `steps` = (epochs, total_steps), with a
    `LambdaScheduler(schedule)` for an L-Softmax head and `progress`, if
    given. Uses `args.learning_rate`, `args.lr_drops`, `args.batch_size` and
    `args.verbose`; returns the `Timer` of `fit`."""
    epochs, total_steps = steps
    lr = step_learning_rate(total_steps, args.learning_rate, args.lr_drops)
    compile_classifier(model, sgd(lr))
    callbacks = lambda_callbacks(margin, schedule)
    if progress is not None:
        callbacks.append(progress)
    with Timer() as timer:
        model.fit(
            train[0],
            train[1],
            batch_size=args.batch_size,
            epochs=epochs,
            callbacks=callbacks,
            verbose=args.verbose,
        )
    return timer


def format_duration(seconds: float) -> str:
    """"1 h 05 min", "4 min 09 s" or "38 s"."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


class Progress(keras.callbacks.Callback):
    """Prints a line per epoch with the logs and the time left, for this fit
    and for the whole script (every fit it makes, `total_epochs` in all).

    One instance serves all the script's fits: name each with `run(name)`.
    The time left is the mean epoch time so far times the epochs to go.

    Args:
        total_epochs: the epochs of all the script's fits together.
    """

    def __init__(self, total_epochs: int):
        super().__init__()
        self.total_epochs = total_epochs
        self.epochs_done = 0
        self.seconds = 0.0
        self.name = ""

    def run(self, name: str) -> Progress:
        self.name = name
        return self

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epochs_done += 1
        self.seconds += time.perf_counter() - self.epoch_start
        per_epoch = self.seconds / self.epochs_done
        epochs = self.params["epochs"]
        values = " · ".join(
            f"{key} {value:.4g}" for key, value in (logs or {}).items()
        )
        print(
            f"{self.name} · epoch {epoch + 1}/{epochs} · {values} · "
            f"{format_duration(per_epoch)}/epoch · left: "
            f"{format_duration(per_epoch * (epochs - epoch - 1))} this run, "
            f"{format_duration(per_epoch * (self.total_epochs - self.epochs_done))}"
            " in all",
            flush=True,
        )


def evaluate_head(model, test: tuple, verbose: int) -> dict:
    """Accuracy on `test` (plain logits), the "features" layer's outputs,
    the "head" layer's class weights as a (C, D) "kernel" (one row per class,
    as `LSoftmaxDense` stores them; a `Dense` head's kernel is transposed)
    and λ, and `angle_stats` of the features."""
    accuracy = model.evaluate(
        test[0], test[1], batch_size=1000, verbose=verbose, return_dict=True
    )["accuracy"]
    features = keras.Model(
        model.inputs, model.get_layer("features").output
    ).predict(test[0], batch_size=1000, verbose=0)
    head = model.get_layer("head")
    kernel = keras.ops.convert_to_numpy(head.kernel)
    if isinstance(head, keras.layers.Dense):  # the softmax head, (D, C)
        kernel = kernel.T
    lam = getattr(head, "lambda_", None)
    return {
        "accuracy": float(accuracy),
        "features": features,
        "kernel": kernel,
        "final_lambda": None if lam is None else float(np.asarray(lam)),
        "angles_deg": angle_stats(features, test[1], kernel),
    }


def command_line(script: str, argv: list | None) -> str:
    """The command that ran `script` with `argv` (None: `sys.argv[1:]`),
    without `--data PATH`: the path is this machine's, and the same command
    without it downloads the same dataset."""
    args = sys.argv[1:] if argv is None else list(argv)
    kept = []
    for arg in args:
        if kept and kept[-1] == "--data":
            kept.pop()
        elif not arg.startswith("--data="):
            kept.append(arg)
    return " ".join(["python", f"examples/{script}", *kept])


def lambda_callbacks(margin: int, schedule) -> list:
    """`[LambdaScheduler(schedule)]` for an L-Softmax head (margin ≥ 1),
    `[]` for the plain softmax head (margin 0), which has no λ."""
    if margin == 0 or schedule is None:
        return []
    return [keras_lsoftmax.LambdaScheduler(schedule)]


def train_length(
    n_train: int, batch_size: int, epochs: int, iterations: int | None
) -> tuple:
    """(epochs, total_steps): `iterations`, if given, overrides `epochs`
    (rounded up to whole epochs, as the steps are)."""
    steps_per_epoch = math.ceil(n_train / batch_size)
    if iterations is not None:
        epochs = max(1, math.ceil(iterations / steps_per_epoch))
    return epochs, epochs * steps_per_epoch


def prepare_run(args, train: tuple, test: tuple, epochs: int) -> tuple:
    """Applies --validation and --smoke; returns (train, test, steps, out).

    Under --validation, VALIDATION_SIZE training examples replace the test
    set. `steps` is `train_length`'s (epochs, total_steps), with
    `args.iterations` overriding `epochs`; `out` is the created --out folder.
    """
    iterations = args.iterations
    if args.validation:
        train, test = validation_split(train, VALIDATION_SIZE)
    if args.smoke:
        train, test = smoke_subset(train, test)
        epochs, iterations = 1, None
    steps = train_length(len(train[1]), args.batch_size, epochs, iterations)
    return train, test, steps, output_dir(args.out)


def compile_classifier(model, optimizer) -> None:
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def unit_rows(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def angle_stats(features: np.ndarray, labels: np.ndarray, kernel) -> dict:
    """Angles in degrees that describe how class-separated `features` are.

    - `intra`: the mean, over samples, of the angle between a feature and
      the mean direction of its class (the normalized mean of the unit
      features of that class). Small = compact classes.
    - `inter_means`: the smallest angle between the mean directions of two
      classes. Large = well-separated classes.
    - `inter_weights`: the smallest angle between two class weight vectors
      (rows of `kernel`, shape (C, D)).

    Classes are the true labels.
    """
    unit = unit_rows(features.astype("float64"))
    classes = np.unique(labels)
    means = np.stack([unit[labels == c].mean(axis=0) for c in classes])
    means = unit_rows(means)
    index = np.searchsorted(classes, labels)
    cos_intra = np.clip(np.sum(unit * means[index], axis=1), -1.0, 1.0)

    def min_pairwise(vectors):
        cos = np.clip(unit_rows(vectors) @ unit_rows(vectors).T, -1.0, 1.0)
        upper = np.triu_indices(len(vectors), k=1)
        return float(np.degrees(np.arccos(cos[upper])).min())

    return {
        "intra": float(np.degrees(np.arccos(cos_intra)).mean()),
        "inter_means": min_pairwise(means),
        "inter_weights": min_pairwise(np.asarray(kernel)),
    }


class Timer:
    """`with Timer() as t: ...`; then `t.seconds` (wall) and `t.cpu_seconds`
    (CPU time of this process, all threads: on a busy machine, CPU time /
    cores estimates the wall time the same work takes on an idle one)."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        return self

    def __exit__(self, *exc_info):
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start


def margin_name(margin: int) -> str:
    return "softmax" if margin in (0, 1) else f"L-Softmax m={margin}"


def mean_std(values) -> tuple:
    values = np.asarray(values, dtype="float64")
    std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    return float(values.mean()), std


def format_mean_std(values, digits: int = 2) -> str:
    mean, std = mean_std(values)
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
