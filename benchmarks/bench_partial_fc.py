"""Partial FC (`sample_rate`): the time and peak memory of a `fit` step at
a million classes against a Dense head, or (`--accuracy`) the test accuracy
of a sampled head against the same head unsampled.

Usage (from the repository root):

    python benchmarks/bench_partial_fc.py --out bench_partial_fc.json
    python benchmarks/bench_partial_fc.py --heads lsoftmax arcface --sample-rates 0.1 1
    python benchmarks/bench_partial_fc.py --accuracy --out accuracy.json
    python benchmarks/bench_partial_fc.py --smoke  # a tiny run; its times mean nothing
    python benchmarks/bench_partial_fc.py --accuracy --smoke

`--backend tensorflow|jax|torch` (default: `KERAS_BACKEND`, else tensorflow)
is read from the command line before Keras is imported.

Time and memory (the default mode). The models, with `--optimizer`
(default Adam, learning rate 1e-3; `lazyadam` gives the heads' models
`keras_lsoftmax.optimizers.LazyAdam` and Dense Keras's Adam, `lazymomentum`
`LazySGD` and SGD, both with momentum 0.9) and
`SparseCategoricalCrossentropy(from_logits=True)`, features trained:

- `dense`: `keras.Sequential([Input((--input-dim,)), Dense(--dim,
  activation="relu", name="features"), Dense(C, use_bias=False)])`;
- one per head of `--heads` and rate r of `--sample-rates`:
  `keras_lsoftmax.Sequential` with the same backbone and, for `lsoftmax`,
  `LSoftmaxDense(C, sample_rate=r, name="head")`: each training step keeps
  S = min(C, max(int(r·C), B)) classes (docs/partial-fc.md).

Each configuration runs in a process of its own, so that each has its own
peak resident memory (`resource.getrusage(RUSAGE_SELF).ru_maxrss`), read
after the imports (the baseline), after the model is built and at the end;
on Linux also the peak of the timed fits alone (VmHWM, reset after the
warm-up fit), which leaves out the build and the tracing. The processes
are started together and build their models and run one untimed `fit` of
`--warmup` batches (it compiles the step) side by side; then the parent
runs the timing rounds interleaved, one configuration at a time (dense,
head, dense, head, ...): each of the `--repeats` samples is one
`model.fit(..., batch_size=B, epochs=1, shuffle=False, verbose=0)` over
`--steps` batches of random data (labels uniform over all C classes),
divided by `--steps`; it includes what `fit` costs per call, spread over
the steps. While one configuration is timed the others wait, idle,
holding their memory. The table gives the ratio of the medians to Dense
and the median of the rounds' ratios (samples of one round ran back to
back, so load that comes and goes on a shared machine moves it less).

Accuracy (`--accuracy`): a synthetic task made from `--seed`: C classes
(default 2000), each a Gaussian prototype in `--input-dim` dimensions; a
sample is its class's prototype plus Gaussian noise (`--noise` per
dimension), `--train-per-class` training and `--test-per-class` test
samples per class. The same network (backbone and head, the same seeded
initial weights and the same shuffles) is trained with `sample_rate=1` and
with each rate of `--sample-rates` for `--epochs` epochs of batch B
(`--optimizer`, `--learning-rate`); `evaluate` gives the accuracy over all
C classes on the test samples. The heads of this mode are by default
`LSoftmaxDense(C, margin=4, lambda_minimum=10)` (10 is its default floor
beyond 10 classes, stated so that `--classes` 10 or fewer keeps it) and
`CosFaceDense(C)`: with a floor of λ of 2, L-Softmax's logits collapse to 0
on this task by the 5th of 10 epochs (`fit` warns). Its default batch, 128, makes
S = r·C at r = 0.1 (with B = 256, S would be B = 256).

Run time on a shared 2-core x86-64 CPU: the default run about 2 minutes on
TensorFlow and JAX, 3.5 on PyTorch, with 8 to 10 GiB of peak resident memory
for its two processes together (figures in docs/partial-fc.md);
`--accuracy` (TensorFlow) about 2 minutes; each `--smoke` about 15 s. A
line on stderr reports each timing round (or trained model) as it ends.

Output: a Markdown table on stdout and, with `--out`, a JSON file with the
configuration, one row per configuration (samples, peaks, S) or per
trained model (accuracies), and the table. Nothing here asserts a time.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

try:
    import benchmarks  # noqa: F401
except ImportError:  # run as `python benchmarks/bench_partial_fc.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.backend_choice import BACKENDS  # noqa: E402
from benchmarks.backend_choice import select_backend  # noqa: E402

if __name__ == "__main__":
    select_backend()  # before the imports below load Keras

import keras  # noqa: E402

import keras_lsoftmax  # noqa: E402
from benchmarks.common import HelpFormatter  # noqa: E402
from benchmarks.common import Progress  # noqa: E402
from benchmarks.common import add_run_arguments  # noqa: E402
from benchmarks.common import check_backend  # noqa: E402
from benchmarks.common import environment  # noqa: E402
from benchmarks.common import OPTIMIZERS  # noqa: E402
from benchmarks.common import OPTIMIZER_HELP  # noqa: E402
from benchmarks.common import fmt  # noqa: E402
from benchmarks.common import make_optimizer  # noqa: E402
from benchmarks.common import optimizer_words  # noqa: E402
from benchmarks.common import parse_smoke  # noqa: E402
from benchmarks.common import peak_rss_mb  # noqa: E402
from benchmarks.common import random_batch_fitter  # noqa: E402
from benchmarks.common import proc_status_bytes  # noqa: E402
from benchmarks.common import ratio  # noqa: E402
from benchmarks.common import report  # noqa: E402
from benchmarks.common import reset_rss_peak  # noqa: E402
from benchmarks.common import rss_probe_available  # noqa: E402
from benchmarks.common import sample_stats  # noqa: E402
from keras_lsoftmax.sampling import num_sampled  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = {
    "lsoftmax": keras_lsoftmax.LSoftmaxDense,
    "sphereface": keras_lsoftmax.SphereFaceDense,
    "cosface": keras_lsoftmax.CosFaceDense,
    "arcface": keras_lsoftmax.ArcFaceDense,
}
# Heads whose margin is an integer multiplier of the angle.
ANGULAR_HEADS = ("lsoftmax", "sphereface")
# --accuracy's own defaults: S = r·C at r = 0.1; with a floor of λ of 2,
# L-Softmax's logits collapse to 0 on this task (fit warns).
ACCURACY_DEFAULTS = {
    "classes": 2000, "batch": 128, "lambda_minimum": 10.0,
    "heads": ["lsoftmax", "cosface"],
}  # fmt: skip
# --smoke, in either mode: seconds after the imports.
SMOKE = {
    "classes": 200, "dim": 16, "batch": 32, "input_dim": 8, "steps": 2,
    "repeats": 2, "warmup": 1, "train_per_class": 4, "test_per_class": 2,
    "epochs": 2,
}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_partial_fc.py",
        allow_abbrev=False,
        description="Time and peak memory of a fit step of a Partial-FC "
        "head (sample_rate) against Dense at a million classes, or with "
        "--accuracy its test accuracy against the unsampled head (see the "
        "module docstring).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--backend", choices=BACKENDS, default=keras.backend.backend(),
        help="Keras backend, read before Keras is imported (default: "
        "KERAS_BACKEND, else tensorflow)",
    )
    parser.add_argument(
        "--classes", type=int, default=1_000_000,
        help="number of classes C (default: %(default)s; 2000 with "
        "--accuracy)",
    )
    parser.add_argument("--dim", type=int, default=128, help="feature size D")
    parser.add_argument(
        "--batch", type=int, default=256,
        help="batch size B (default: %(default)s; 128 with --accuracy)",
    )
    parser.add_argument(
        "--input-dim", type=int, default=64,
        help="size of the input of the Dense backbone",
    )
    parser.add_argument(
        "--heads", nargs="+", choices=sorted(HEADS), default=["lsoftmax"],
        help="heads to run with sampling (default: lsoftmax; lsoftmax "
        "cosface with --accuracy)",
    )
    parser.add_argument(
        "--sample-rates", type=float, nargs="+", default=[0.1],
        help="sample rates r of the heads; --accuracy also trains r = 1",
    )
    parser.add_argument(
        "--margin", type=int, default=4,
        help="integer margin m of lsoftmax and sphereface (default: "
        "%(default)s); cosface and arcface keep their own (0.35 and 0.5, "
        "scale 64)",
    )
    parser.add_argument(
        "--lambda-minimum", type=float, default=None,
        help="the floor of λ of lsoftmax and sphereface (default: the "
        "head's own, 2 up to 10 classes and 10 beyond, and 5; 10 with "
        "--accuracy)",
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="fit batches per timing sample"
    )
    parser.add_argument(
        "--repeats", type=int, default=5,
        help="interleaved timing rounds (samples per configuration)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1,
        help="batches of the untimed first fit (it compiles the step)",
    )
    parser.add_argument(
        "--accuracy", action="store_true",
        help="train on the synthetic task and report test accuracies "
        "instead of timing (default: off)",
    )
    parser.add_argument(
        "--train-per-class", type=int, default=30,
        help="with --accuracy: training samples per class",
    )
    parser.add_argument(
        "--test-per-class", type=int, default=10,
        help="with --accuracy: test samples per class",
    )
    parser.add_argument(
        "--noise", type=float, default=1.5,
        help="with --accuracy: standard deviation of the noise added to "
        "the prototypes (whose entries have standard deviation 1)",
    )
    parser.add_argument(
        "--epochs", type=int, default=10, help="with --accuracy: epochs"
    )
    parser.add_argument(
        "--optimizer", choices=sorted(OPTIMIZERS), default="adam",
        help=OPTIMIZER_HELP,
    )
    parser.add_argument(
        "--learning-rate", type=float, default=1e-3,
        help="the optimizer's learning rate",
    )
    parser.add_argument(
        "--jit-compile", action="store_true",
        help="compile(jit_compile=True): XLA on TensorFlow (Keras's default "
        "on GPUs, off on CPUs), torch.compile on PyTorch; JAX always jits "
        "(default: Keras's choice)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    add_run_arguments(parser, "seed of the data, weights and samples", SMOKE)
    mode, _ = parser.parse_known_args(argv)
    if mode.accuracy:
        parser.set_defaults(**ACCURACY_DEFAULTS)
    parse_smoke(parser, argv, SMOKE)
    args = parser.parse_args(argv)
    check_backend(parser, args.backend)
    for name in (
        "classes", "dim", "batch", "input_dim", "margin", "steps", "repeats",
        "warmup", "train_per_class", "test_per_class", "epochs",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lambda_minimum is not None and not args.lambda_minimum >= 0:
        parser.error("--lambda-minimum must be >= 0")
    if not all(0 < r <= 1 for r in args.sample_rates):
        parser.error("--sample-rates must be in (0, 1]")
    args.heads = list(dict.fromkeys(args.heads))
    args.sample_rates = list(dict.fromkeys(args.sample_rates))
    return args


def make_head(
    name: str, args: argparse.Namespace, rate: float
) -> keras.layers.Layer:
    """Head `name` over `args.classes` classes, seeded, at sample rate
    `rate`."""
    kwargs = {
        "sample_rate": rate,
        "seed": args.seed,
        "kernel_initializer": keras.initializers.GlorotUniform(args.seed + 1),
        "name": "head",
    }
    if name in ANGULAR_HEADS:
        kwargs["margin"] = args.margin
        if args.lambda_minimum is not None:
            kwargs["lambda_minimum"] = args.lambda_minimum
    return HEADS[name](args.classes, **kwargs)


def build_model(
    config: str, args: argparse.Namespace, metrics: list[str] | None = None
) -> keras.Model:
    """The compiled model of `config`: "dense", or "HEAD@RATE"."""
    backbone = [
        keras.Input((args.input_dim,)),
        # Seeded initializers: the same weights at every sample rate,
        # whatever else draws from Keras's global seed, and no
        # keras.utils.set_random_seed in the workers (it imports TensorFlow
        # on every backend where it is installed).
        keras.layers.Dense(
            args.dim, activation="relu", name="features",
            kernel_initializer=keras.initializers.GlorotUniform(args.seed),
        ),
    ]  # fmt: skip
    if config == "dense":
        model = keras.Sequential([
            *backbone,
            keras.layers.Dense(
                args.classes, use_bias=False, name="head",
                kernel_initializer=keras.initializers.GlorotUniform(
                    args.seed + 1
                ),
            ),
        ])  # fmt: skip
    else:
        head, rate = config.split("@")
        model = keras_lsoftmax.Sequential(
            [*backbone, make_head(head, args, float(rate))]
        )
    model.compile(
        optimizer=make_optimizer(
            args.optimizer, args.learning_rate, dense=config == "dense"
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=metrics,
        jit_compile=True if args.jit_compile else "auto",
    )
    return model


def configs(args: argparse.Namespace) -> list[str]:
    """The time mode's configurations, Dense first."""
    return ["dense"] + [
        f"{head}@{rate:g}" for head in args.heads for rate in args.sample_rates
    ]



def run_worker(args: argparse.Namespace) -> None:
    """One configuration, in this process, timed on the parent's request.

    Reads a command per line on stdin, "time" (one sample) or "stop", and
    answers each, and the warm-up, with a JSON line on stdout; the last
    answer is the configuration's row.
    """
    # Keep stdout for the answers: anything else printed goes to stderr.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    peak_before_model = peak_rss_mb()
    model = build_model(args.worker, args)
    fit = random_batch_fitter(model, args)

    peak_after_build = peak_rss_mb()
    t0 = time.perf_counter()
    loss = fit(args.warmup)
    channel.write(json.dumps({"first_fit_s": time.perf_counter() - t0}) + "\n")
    # From here VmHWM is the peak of the timed fits alone: building the
    # model (its initializer's temporaries) and tracing are left out.
    probe = rss_probe_available()
    if probe:
        reset_rss_peak()
    samples = []
    for command in sys.stdin:
        if command.strip() == "stop":
            break
        t0 = time.perf_counter()
        loss = fit(args.steps)
        samples.append(1e3 * (time.perf_counter() - t0) / args.steps)
        channel.write(json.dumps({"ms": samples[-1]}) + "\n")
    rate = 1.0 if args.worker == "dense" else float(args.worker.split("@")[1])
    peak = peak_rss_mb()
    fits_peak = proc_status_bytes("VmHWM") / 2**20 if probe else None
    channel.write(json.dumps({
        "config": args.worker,
        "classes": args.classes,
        "kept_classes": num_sampled(args.classes, rate, args.batch),
        **sample_stats(samples),
        "final_loss": loss,
        "peak_before_model_mb": peak_before_model,
        "peak_mb": peak,
        "peak_above_baseline_mb": peak - peak_before_model,
        "peak_after_build_mb": peak_after_build,
        "fits_peak_above_baseline_mb": (
            None if fits_peak is None else fits_peak - peak_before_model
        ),
    }) + "\n")  # fmt: skip


class Worker:
    """A configuration's process (`run_worker`), driven line by line.

    Args:
        config: the configuration.
        argv: the script's arguments, passed on to the worker.
        backend: the Keras backend of the worker.
    """

    def __init__(self, config: str, argv: list[str], backend: str):
        self.config = config
        self.stderr = tempfile.TemporaryFile("w+")
        env = {
            **os.environ,
            "KERAS_BACKEND": backend,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONPATH": os.pathsep.join(
                p for p in [ROOT, os.environ.get("PYTHONPATH")] if p
            ),
        }
        # The worker takes the same arguments; it writes no --out.
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *argv,
             "--worker", config],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.stderr, text=True,
        )  # fmt: skip

    def answer(self) -> dict[str, Any]:
        """The worker's next JSON line; an error with its stderr if it
        ended instead."""
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            raise RuntimeError(
                f"{self.config} failed:\n{self.stderr.read()[-4000:]}"
            )
        return json.loads(line)

    def send(self, command: str) -> dict[str, Any]:
        """Sends `command`; returns the answer."""
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.answer()

    def close(self) -> None:
        self.proc.kill()  # a no-op once it has ended
        self.proc.wait()
        self.stderr.close()


def time_configs(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    """The time mode's rows: warm-ups side by side, rounds interleaved."""
    warmup = Progress(1)
    workers = [Worker(c, argv, args.backend) for c in configs(args)]
    try:
        first = [w.answer()["first_fit_s"] for w in workers]
        warmup.done_with(f"built and warmed up {len(workers)} processes")
        progress = Progress(args.repeats)
        for i in range(args.repeats):
            for w in workers:
                w.send("time")
            progress.done_with(f"round {i + 1}, C={args.classes}")
        rows = [w.send("stop") for w in workers]
    finally:
        for w in workers:
            w.close()
    dense = rows[0]
    for row, first_s in zip(rows, first):
        row["first_fit_s"] = first_s
        row["ratio_to_dense"] = ratio(row["median_ms"], dense["median_ms"])
        # Samples of one round ran back to back: their ratio is less
        # affected by load that comes and goes on a shared machine.
        row["round_ratios_to_dense"] = [
            ratio(t, d) for t, d in zip(row["samples_ms"], dense["samples_ms"])
        ]
        row["median_round_ratio_to_dense"] = float(
            np.median(row["round_ratios_to_dense"])
        )
        for key in ("peak_above_baseline_mb", "fits_peak_above_baseline_mb"):
            row[key.replace("_above_baseline_mb", "_ratio_to_dense")] = ratio(
                row[key], dense[key]
            )
    return rows


def time_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| C | config | kept classes S | median ms/step | IQR ms "
        "| ratio to Dense | median of round ratios | peak MB "
        "| peak − baseline MB | ratio to Dense "
        "| timed fits' peak − baseline MB | ratio to Dense |",
        "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['classes']} | {r['config']} | {r['kept_classes']} "
            f"| {r['median_ms']:.0f} | {r['iqr_ms']:.0f} "
            f"| {fmt(r['ratio_to_dense'], '.2f')} "
            f"| {r['median_round_ratio_to_dense']:.2f} | {r['peak_mb']:.0f} "
            f"| {r['peak_above_baseline_mb']:.0f} "
            f"| {fmt(r['peak_ratio_to_dense'], '.2f')} "
            f"| {fmt(r['fits_peak_above_baseline_mb'], '.0f')} "
            f"| {fmt(r['fits_peak_ratio_to_dense'], '.2f')} |"
        )
    return "\n".join(lines)


def make_task(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """The synthetic task: prototypes plus noise, labels class by class."""
    rng = np.random.default_rng(args.seed)
    prototypes = rng.normal(size=(args.classes, args.input_dim))

    def split(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(args.classes, dtype="int32"), per_class)
        noise = args.noise * rng.normal(size=(len(y), args.input_dim))
        return (prototypes[y] + noise).astype("float32"), y

    x_train, y_train = split(args.train_per_class)
    x_test, y_test = split(args.test_per_class)
    return {"x_train": x_train, "y_train": y_train,
            "x_test": x_test, "y_test": y_test}  # fmt: skip


def train_and_test(
    args: argparse.Namespace, config: str, task: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Trains the model of `config` on the task; returns its row."""
    # The same shuffles for every model (this seeds TensorFlow too).
    keras.utils.set_random_seed(args.seed)
    model = build_model(config, args, metrics=["accuracy"])
    t0 = time.perf_counter()
    history = model.fit(
        task["x_train"], task["y_train"], batch_size=args.batch,
        epochs=args.epochs, shuffle=True, verbose=0,
    )  # fmt: skip
    train_s = time.perf_counter() - t0
    test = model.evaluate(
        task["x_test"], task["y_test"], batch_size=1024, verbose=0,
        return_dict=True,
    )  # fmt: skip
    head, rate = config.split("@")
    return {
        "head": head,
        "sample_rate": float(rate),
        "kept_classes": num_sampled(args.classes, float(rate), args.batch),
        "test_accuracy": float(test["accuracy"]),
        "test_loss": float(test["loss"]),
        "final_train_loss": float(history.history["loss"][-1]),
        "train_s": train_s,
    }


def accuracy_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each head at r = 1 and at each --sample-rates, with the difference
    of its test accuracy to r = 1 in points."""
    task = make_task(args)
    rates = list(dict.fromkeys([1.0, *args.sample_rates]))
    progress = Progress(len(args.heads) * len(rates))
    rows = []
    for head in args.heads:
        for rate in rates:
            rows.append(train_and_test(args, f"{head}@{rate:g}", task))
            progress.done_with(f"{head} r={rate:g}")
            rows[-1]["points_to_r1"] = 100 * (
                rows[-1]["test_accuracy"]
                - next(r for r in rows if r["head"] == head)["test_accuracy"]
            )
    return rows


def accuracy_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| head | r | kept classes S | test accuracy | points to r = 1 "
        "| train s | final train loss |",
        "|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['head']} | {r['sample_rate']:g} | {r['kept_classes']} "
            f"| {r['test_accuracy']:.4f} | {r['points_to_r1']:+.2f} "
            f"| {r['train_s']:.0f} | {r['final_train_loss']:.3f} |"
        )
    return "\n".join(lines)


def _describe_model(args: argparse.Namespace) -> str:
    floor = (
        "" if args.lambda_minimum is None
        else f", λ floor {args.lambda_minimum:g}"
    )  # fmt: skip
    heads = ", ".join(
        f"{h} (m = {args.margin}{floor})" if h in ANGULAR_HEADS
        else f"{h} (its defaults)"
        for h in args.heads
    )  # fmt: skip
    return (
        f"model: Input({args.input_dim}) → Dense({args.dim}, relu) → head, "
        f"features trained; heads: {heads}; optimizer: "
        f"{optimizer_words(args.optimizer)} "
        f"(learning rate {args.learning_rate:g}); loss: sparse "
        f"cross-entropy from logits; B = {args.batch}; seed {args.seed}; "
        f"jit_compile={'True' if args.jit_compile else 'auto'}"
    )


def describe_time(args: argparse.Namespace) -> str:
    """The time mode's problem and timing settings, in words."""
    return (
        f"C = {args.classes}; D = {args.dim}; {_describe_model(args)}; "
        f"sample rates {', '.join(f'{r:g}' for r in args.sample_rates)} "
        f"against Dense(C, use_bias=False); {args.repeats} interleaved "
        f"rounds of one fit over {args.steps} batches each, after an "
        f"untimed fit of {args.warmup}; each configuration in its own "
        "process; peak: ru_maxrss, baseline: ru_maxrss after the imports; "
        "timed fits' peak: VmHWM, reset after the warm-up fit"
    )


def describe_accuracy(args: argparse.Namespace) -> str:
    """The accuracy mode's task and training, in words."""
    return (
        f"synthetic task: C = {args.classes} Gaussian prototypes in "
        f"{args.input_dim} dimensions, noise σ = {args.noise:g}, "
        f"{args.train_per_class} training and {args.test_per_class} test "
        f"samples per class; {_describe_model(args)}; {args.epochs} epochs "
        "with the same seeded weights and shuffles at every rate; test "
        "accuracy over all C classes"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns the results (also written to --out)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return {}
    config = {
        "mode": "accuracy" if args.accuracy else "time",
        "classes": args.classes, "dim": args.dim, "batch": args.batch,
        "input_dim": args.input_dim, "heads": args.heads,
        "sample_rates": args.sample_rates, "margin": args.margin,
        "lambda_minimum": args.lambda_minimum,
        "optimizer": args.optimizer, "learning_rate": args.learning_rate,
        "jit_compile": args.jit_compile, "seed": args.seed, "smoke": args.smoke, **environment(),
    }  # fmt: skip
    if args.accuracy:
        config.update(
            train_per_class=args.train_per_class,
            test_per_class=args.test_per_class, noise=args.noise,
            epochs=args.epochs, description=describe_accuracy(args),
        )  # fmt: skip
        rows = accuracy_rows(args)
        table = accuracy_table(rows)
    else:
        config.update(
            steps=args.steps, repeats=args.repeats, warmup=args.warmup,
            description=describe_time(args),
        )  # fmt: skip
        rows = time_configs(args, argv)
        table = time_table(rows)
    return report({"config": config, "rows": rows, "markdown": table}, args.out)


if __name__ == "__main__":
    main()
