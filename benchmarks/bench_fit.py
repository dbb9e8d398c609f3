"""Times a Keras `fit` / `train_on_batch` step: LSoftmaxDense vs Dense models,
and the cost of `keras_lsoftmax.LambdaScheduler` in `fit`.

Usage (from the repository root):

    python benchmarks/bench_fit.py --out bench_fit.json
    python benchmarks/bench_fit.py --classes 1000 10000 --repeats 10
    python benchmarks/bench_fit.py --api train_on_batch --jit-compile true
    python benchmarks/bench_fit.py --backend jax --out bench_fit_jax.json
    python benchmarks/bench_fit.py --scheduler-overhead --backend torch
    python benchmarks/bench_fit.py --smoke  # a tiny run; its times mean nothing
    python benchmarks/bench_fit.py --scheduler-overhead --smoke

Run time on a 2-core x86-64 CPU (TensorFlow), computed from the medians and
samples' step counts in `docs/benchmarks/`: the default run (C = 1000 and
10000, both APIs, 20 rounds) about 1.5 minutes (`bench_fit_cpu.json`, 30
rounds there); `--scheduler-overhead` (20 rounds) about 1 minute
(`scheduler_overhead_tensorflow.json`, 40 rounds there; JAX 0.2 min,
PyTorch 1.2 min). Measured on the same machine, shared with other work:
`--smoke` took 8 s after the imports (19 s in all), `--scheduler-overhead
--smoke` 10 s (15 s in all). A line on stderr reports each C as it ends,
with the time left.

`--backend tensorflow|jax|torch` (default: `KERAS_BACKEND`, else tensorflow)
is read from the command line before Keras is imported.

`benchmarks/bench_head.py` times a hand-written step of the head alone; this
script times what a Keras user runs, the models' own `train_step` through
the Keras training loop. Two models (`--variants`, default both):

- `dense`: `keras.Sequential([Input((D,)), Dense(C, use_bias=False)])`;
- `lsoftmax`: `keras_lsoftmax.Sequential([Input((D,)),
  LSoftmaxDense(C, margin=m)])` (its `train_step` hands the labels to the
  head, restores the plain target logits for the metrics and logs λ and θ).

Both are compiled alike:

    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=1e-3, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=...,  # --jit-compile, default "auto"
    )

with identical initial weights. The features are the model's input, so no
gradient is taken with respect to them (a linear probe on fixed features).
`--jit-compile auto` is Keras's default, which on a CPU-only machine means
no XLA on TensorFlow, `jax.jit` on JAX and no `torch.compile` on PyTorch;
the table shows what Keras resolved it to.

APIs (`--api`, default both):

- `train_on_batch`: one sample is `inner` consecutive
  `model.train_on_batch(x, y)` calls on one fixed random batch (NumPy arrays
  of B rows), divided by `inner`. Each call returns its logs as NumPy values,
  so it waits for its step.
- `fit`: one sample is one `model.fit(x, y, batch_size=B, epochs=1,
  shuffle=False, verbose=0)` over `n` batches (fixed random arrays of
  n·B rows), divided by n, with n = max(`inner`, `--fit-batches`). It
  includes what `fit` costs per call (data adapter, callbacks; some 80 ms
  on a 2-core CPU), spread over the n steps.

λ scheduler overhead (`--scheduler-overhead`): instead of the above, one
small model whose steps take about 1–2 ms on a CPU,

    keras_lsoftmax.Sequential([Input((D,)), Dense(D, activation="relu"),
                               LSoftmaxDense(C, margin=m)])

(defaults in this mode: D = 64, C = 10, B = 128, 100 batches per epoch),
compiled as above, once per callback setting (`--schedulers`, default all
three), with identical initial weights:

- `none`: `model.fit(...)` without callbacks, the baseline;
- `schedule`: with `LambdaScheduler(InverseDecay(1000, 2.5e-5, 35))`, a
  `LambdaSchedule`: the train step computes λ itself, no host work per
  batch;
- `callable`: with `LambdaScheduler(host_inverse_decay)`, the same λ as a
  plain Python function: the callback reads the step counter and sets λ
  from the host before every batch.

One sample is one `model.fit(x, y, batch_size=B, epochs=--epochs,
shuffle=False, verbose=0)` over `--fit-batches` batches per epoch, divided by
the number of steps; each model's callbacks are made once and reused by
every `fit`, so the schedule is attached (and the train function retraced)
only in the first, untimed, warm-up call. The rows' `ratio` is the ratio of
medians to `none` in the same jit setting. `--api`, `--variants`, `--inner`
and `--min-sample-ms` do not apply.

Timing: after `--warmup` calls (the first traces and compiles), the variants
of one C are run interleaved (A B A B ..., every API and jit setting in the
same round) for `--repeats` rounds; `inner` is chosen per C so that one
sample of the fastest variant lasts about `--min-sample-ms` (override with
`--inner`). The table reports the median per-step time, its interquartile
range and the ratio of medians to `dense` (or `none`) in the same run, API
and jit setting.

Output: a Markdown table on stdout and, with `--out`, a JSON file with the
configuration, one row per (C, API, jit, variant) with the backend and all
samples, and the table. Nothing here asserts a time.
"""

import argparse
import gc
import math
import os
import sys
import time
from typing import Any

import numpy as np

try:
    import benchmarks  # noqa: F401
except ImportError:  # run as `python benchmarks/bench_fit.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.backend_choice import select_backend  # noqa: E402

if __name__ == "__main__":
    select_backend()  # before the imports below load Keras

import keras  # noqa: E402

import keras_lsoftmax  # noqa: E402
from benchmarks.common import HelpFormatter  # noqa: E402
from benchmarks.common import Progress  # noqa: E402
from benchmarks.common import add_run_arguments  # noqa: E402
from benchmarks.common import add_timing_arguments  # noqa: E402
from benchmarks.common import check_backend  # noqa: E402
from benchmarks.common import device_scope  # noqa: E402
from benchmarks.common import environment  # noqa: E402
from benchmarks.common import fmt  # noqa: E402
from benchmarks.common import parse_smoke  # noqa: E402
from benchmarks.common import ratio  # noqa: E402
from benchmarks.common import report  # noqa: E402
from benchmarks.common import sample_stats  # noqa: E402

VARIANTS = ("dense", "lsoftmax")
APIS = ("train_on_batch", "fit")
DEFAULT_CLASSES = (1000, 10000)
JIT_CHOICES = {"auto": "auto", "true": True, "false": False}
SCHEDULERS = ("none", "schedule", "callable")
# The authors' MNIST λ schedule.
SCHEDULE_ARGS = {"base": 1000.0, "gamma": 2.5e-5, "power": 35.0}
# --scheduler-overhead's own defaults: a model whose steps take 1-2 ms.
SCHEDULER_DEFAULTS = {
    "classes": [10], "dim": 64, "batch": 128, "fit_batches": 100,
}
# --smoke, in either mode: every row of the output, in seconds.
SMOKE = {
    "classes": [10, 100], "batch": 16, "dim": 32, "repeats": 2,
    "warmup": 1, "inner": 2, "fit_batches": 3, "epochs": 1,
}


def host_inverse_decay(step: int) -> float:
    """λ of `InverseDecay(**SCHEDULE_ARGS)` in plain Python: the callable a
    user would hand `LambdaScheduler`, evaluated on the host."""
    return SCHEDULE_ARGS["base"] * (
        1.0 + SCHEDULE_ARGS["gamma"] * step
    ) ** -SCHEDULE_ARGS["power"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_fit.py",
        allow_abbrev=False,
        description="Time a Keras training step (fit / train_on_batch) of a "
        "keras_lsoftmax.Sequential LSoftmaxDense model vs a Dense one, or "
        "with --scheduler-overhead the cost of LambdaScheduler in fit (see "
        "the module docstring).",
        formatter_class=HelpFormatter,
    )
    add_timing_arguments(
        parser,
        classes=DEFAULT_CLASSES,
        repeats=20,
        min_sample_ms=200.0,
        warmup_help="untimed calls per variant and API before timing (the "
        "first traces)",
    )
    parser.add_argument(
        "--fit-batches", type=int, default=16,
        help="at least this many batches (steps) per `fit` sample, to spread "
        "its per-call cost (default: %(default)s; 100 per epoch with "
        "--scheduler-overhead)",
    )
    parser.add_argument(
        "--api", nargs="+", choices=APIS, default=list(APIS),
        help="Keras entry points to time (default: %(default)s)",
    )
    parser.add_argument(
        "--jit-compile", nargs="+", choices=sorted(JIT_CHOICES),
        default=["auto"],
        help="`jit_compile` of model.compile; several values are timed in the "
        "same rounds (default: %(default)s)",
    )
    parser.add_argument(
        "--device", default=None,
        help="device scope for the calls (keras.device), e.g. /CPU:0 on "
        "TensorFlow, cpu:0 on JAX (default: none, the backend's placement)",
    )
    parser.add_argument("--margin", type=int, default=4, help="margin m")
    parser.add_argument(
        "--lam", type=float, default=0.0, help="initial λ of the head"
    )
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
        help="models to time; `dense` is needed for the ratios (default: "
        "%(default)s)",
    )
    parser.add_argument(
        "--scheduler-overhead", action="store_true",
        help="time fit of a small Dense(D, relu) -> LSoftmaxDense(C) model "
        "without a callback, with LambdaScheduler(InverseDecay(...)) (λ "
        "in-step) and with LambdaScheduler(python callable) (λ from the "
        "host); defaults then: --classes 10 --dim 64 --batch 128 "
        "--fit-batches 100 (default: off)",
    )
    parser.add_argument(
        "--schedulers", nargs="+", choices=SCHEDULERS,
        default=list(SCHEDULERS),
        help="with --scheduler-overhead: callback settings to time; `none` "
        "is needed for the ratios (default: %(default)s)",
    )
    parser.add_argument(
        "--epochs", type=int, default=2,
        help="with --scheduler-overhead: epochs per timed fit (default: "
        "%(default)s)",
    )
    add_run_arguments(parser, "seed of the data and weights", SMOKE)
    mode, _ = parser.parse_known_args(argv)
    if mode.scheduler_overhead:
        parser.set_defaults(**SCHEDULER_DEFAULTS)
    parse_smoke(parser, argv, SMOKE)
    args = parser.parse_args(argv)
    check_backend(parser, args.backend)
    for name in (
        "batch", "dim", "repeats", "margin", "warmup", "fit_batches", "epochs"
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.inner < 0:
        parser.error("--inner must be >= 0")
    if min(args.classes) < 1:
        parser.error("--classes must be >= 1")
    if args.lam < 0:
        parser.error("--lam must be >= 0")
    args.variants = list(dict.fromkeys(args.variants))
    args.api = list(dict.fromkeys(args.api))
    args.jit_compile = list(dict.fromkeys(args.jit_compile))
    args.schedulers = list(dict.fromkeys(args.schedulers))
    return args


def compile_model(model: keras.Model, jit_compile: Any) -> keras.Model:
    """`model`, compiled as every model here is."""
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=1e-3, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


def build_model(
    name: str, args: argparse.Namespace, num_classes: int,
    kernel0: np.ndarray, jit_compile: Any,
) -> keras.Model:
    inputs = keras.Input((args.dim,))
    if name == "dense":
        head = keras.layers.Dense(num_classes, use_bias=False, name="dense")
        model = keras.Sequential([inputs, head])
        head.kernel.assign(kernel0)
    elif name == "lsoftmax":
        head = keras_lsoftmax.LSoftmaxDense(
            num_classes, margin=args.margin, initial_lambda=args.lam,
            name="lsoftmax",
        )
        model = keras_lsoftmax.Sequential([inputs, head])
        # LSoftmaxDense stores one row per class, (C, D).
        head.kernel.assign(kernel0.T)
    else:
        raise ValueError(f"unknown variant {name!r}")
    return compile_model(model, jit_compile)


def build_scheduler_model(
    args: argparse.Namespace, num_classes: int, jit_compile: Any
) -> keras.Model:
    """The small model of --scheduler-overhead, with the same seeded weights
    in every case. (Seeded initializers, not keras.utils.set_random_seed,
    which imports TensorFlow on every backend where it is installed.)"""
    model = keras_lsoftmax.Sequential([
        keras.Input((args.dim,)),
        keras.layers.Dense(
            args.dim, activation="relu",
            kernel_initializer=keras.initializers.GlorotUniform(seed=args.seed),
        ),
        keras_lsoftmax.LSoftmaxDense(
            num_classes, margin=args.margin, initial_lambda=args.lam,
            kernel_initializer=keras.initializers.GlorotUniform(seed=args.seed + 1),
        ),
    ])
    return compile_model(model, jit_compile)


def scheduler_callbacks(name: str) -> list[keras.callbacks.Callback]:
    """The callbacks of the --scheduler-overhead setting `name`."""
    if name == "none":
        return []
    if name == "schedule":
        schedule = keras_lsoftmax.schedules.InverseDecay(**SCHEDULE_ARGS)
        return [keras_lsoftmax.LambdaScheduler(schedule)]
    if name == "callable":
        return [keras_lsoftmax.LambdaScheduler(host_inverse_decay)]
    raise ValueError(f"unknown scheduler setting {name!r}")


class Case:
    """One compiled model (variant, jit setting) and its timed calls per API.

    Args:
        name: the variant.
        jit_setting: the `--jit-compile` value it was compiled with.
        model: the compiled model.
        batch: the batch size B.
        callbacks: passed to every `fit` (the same objects each time).
        epochs: epochs per `fit`.
    """

    def __init__(
        self, name: str, jit_setting: str, model: keras.Model, batch: int,
        callbacks: list[keras.callbacks.Callback] | None = None,
        epochs: int = 1,
    ):
        self.name = name
        self.jit_setting = jit_setting
        self.model = model
        self.batch = batch
        self.callbacks = callbacks or []
        self.epochs = epochs
        self.loss = math.nan

    @property
    def jit(self) -> bool:
        return bool(self.model.jit_compile)

    def steps(self, api: str, batches: int) -> int:
        """The training steps of one `run(api, batches, ...)`."""
        return batches * self.epochs if api == "fit" else batches

    def run(self, api: str, batches: int, data: dict[str, np.ndarray]) -> None:
        """`batches` steps (per epoch, for `fit`) through `api`; returns once
        they are done."""
        if api == "train_on_batch":
            for _ in range(batches):
                logs = self.model.train_on_batch(
                    data["x"], data["y"], return_dict=True
                )
        else:
            rows = batches * self.batch
            history = self.model.fit(
                data["x_all"][:rows], data["y_all"][:rows],
                batch_size=self.batch, epochs=self.epochs, shuffle=False,
                verbose=0, callbacks=self.callbacks,
            )
            logs = {k: v[-1] for k, v in history.history.items()}
        self.loss = float(logs["loss"])

    def final_lambda(self) -> float:
        """λ of the model's LSoftmaxDense now."""
        head = self.model.layers[-1]
        return float(keras.ops.convert_to_numpy(head.lambda_))


def make_data(
    args: argparse.Namespace, num_classes: int, rows: int
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(args.seed + num_classes)
    x_all = rng.standard_normal((rows, args.dim)).astype(np.float32)
    y_all = rng.integers(0, num_classes, rows).astype(np.int32)
    return {
        "x": x_all[: args.batch], "y": y_all[: args.batch],
        "x_all": x_all, "y_all": y_all,
    }


def initial_kernel(args: argparse.Namespace, num_classes: int) -> np.ndarray:
    rng = np.random.default_rng(args.seed + 7 * num_classes + 1)
    limit = math.sqrt(6.0 / (args.dim + num_classes))  # glorot uniform
    return rng.uniform(-limit, limit, (args.dim, num_classes)).astype(
        np.float32
    )


def time_interleaved(
    cases: list[Case], apis: list[str], batches: dict[str, int],
    data: dict[str, np.ndarray], repeats: int,
) -> dict[tuple[str, str, str], list[float]]:
    """Per-step ms of each (variant, jit setting, API), rounds interleaved."""
    times = {
        (c.name, c.jit_setting, api): [] for c in cases for api in apis
    }
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for api in apis:
                for case in cases:
                    t0 = time.perf_counter()
                    case.run(api, batches[api], data)
                    elapsed = time.perf_counter() - t0
                    times[(case.name, case.jit_setting, api)].append(
                        1e3 * elapsed / case.steps(api, batches[api])
                    )
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def time_one_c(
    args: argparse.Namespace, num_classes: int
) -> list[dict[str, Any]]:
    kernel0 = initial_kernel(args, num_classes)
    cases = [
        Case(
            name, jit, build_model(
                name, args, num_classes, kernel0, JIT_CHOICES[jit]
            ), args.batch,
        )
        for jit in args.jit_compile
        for name in args.variants
    ]
    data = make_data(args, num_classes, args.batch)
    first_s = {}
    with device_scope(args.device):
        for case in cases:
            for api in args.api:
                t0 = time.perf_counter()
                case.run(api, 1, data)
                first_s[(case.name, case.jit_setting, api)] = (
                    time.perf_counter() - t0
                )
                for _ in range(args.warmup - 1):
                    case.run(api, 1, data)
        inner = args.inner
        if not inner:
            fastest = math.inf
            for case in cases:
                samples = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    case.run("train_on_batch", 1, data)
                    samples.append(time.perf_counter() - t0)
                fastest = min(fastest, float(np.median(samples)))
            inner = max(1, math.ceil(args.min_sample_ms / 1e3 / fastest))
        batches = {"train_on_batch": inner, "fit": max(inner, args.fit_batches)}
        if "fit" in args.api:
            data = make_data(args, num_classes, args.batch * batches["fit"])
            for case in cases:  # one untimed fit on the full arrays
                case.run("fit", batches["fit"], data)
        times = time_interleaved(cases, args.api, batches, data, args.repeats)
    rows = []
    for api in args.api:
        for case in cases:
            key = (case.name, case.jit_setting, api)
            rows.append({
                "backend": args.backend,
                "classes": num_classes,
                "api": api,
                "jit_compile": case.jit_setting,
                "jit": case.jit,
                "variant": case.name,
                **sample_stats(times[key]),
                "inner": batches[api],
                "first_call_s": first_s[key],
                "final_loss": case.loss,
            })
    return rows


def time_scheduler_one_c(
    args: argparse.Namespace, num_classes: int
) -> list[dict[str, Any]]:
    """The --scheduler-overhead rows of one C."""
    cases = [
        Case(
            name, jit,
            build_scheduler_model(args, num_classes, JIT_CHOICES[jit]),
            args.batch, scheduler_callbacks(name), args.epochs,
        )
        for jit in args.jit_compile
        for name in args.schedulers
    ]
    batches = {"fit": args.fit_batches}
    data = make_data(args, num_classes, args.batch * args.fit_batches)
    first_s = {}
    with device_scope(args.device):
        # Whole fits: the first traces, and attaches the schedule.
        for case in cases:
            t0 = time.perf_counter()
            case.run("fit", args.fit_batches, data)
            first_s[case.name, case.jit_setting] = time.perf_counter() - t0
            for _ in range(args.warmup - 1):
                case.run("fit", args.fit_batches, data)
        times = time_interleaved(cases, ["fit"], batches, data, args.repeats)
    return [
        {
            "backend": args.backend,
            "mode": "scheduler_overhead",
            "classes": num_classes,
            "api": "fit",
            "jit_compile": case.jit_setting,
            "jit": case.jit,
            "variant": case.name,
            **sample_stats(times[(case.name, case.jit_setting, "fit")]),
            "steps_per_sample": case.steps("fit", args.fit_batches),
            "first_call_s": first_s[case.name, case.jit_setting],
            "final_loss": case.loss,
            "final_lambda": case.final_lambda(),
        }
        for case in cases
    ]


def _jit_label(row: dict[str, Any]) -> str:
    return ("yes" if row["jit"] else "no") + (
        " (auto)" if row["jit_compile"] == "auto" else ""
    )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| C | API | jit | variant | median ms | IQR ms | ratio to Dense |",
        "|---:|:---|:---:|:---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['classes']} | {r['api']} | {_jit_label(r)} "
            f"| {r['variant']} "
            f"| {r['median_ms']:.3f} | {r['iqr_ms']:.3f} "
            f"| {fmt(r['ratio_to_dense'], '.2f')} |"
        )
    return "\n".join(lines)


def scheduler_table(rows: list[dict[str, Any]]) -> str:
    """The --scheduler-overhead table: per-step time by λ callback."""
    lines = [
        "| C | jit | λ callback | median ms/step | IQR ms | ratio to none "
        "| final λ |",
        "|---:|:---:|:---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['classes']} | {_jit_label(r)} | {r['variant']} "
            f"| {r['median_ms']:.3f} | {r['iqr_ms']:.3f} "
            f"| {fmt(r['ratio'], '.3f')} | {r['final_lambda']:.4g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns the results (also written to --out)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    time_c = time_scheduler_one_c if args.scheduler_overhead else time_one_c
    cases = (
        f"fit with λ callbacks {', '.join(args.schedulers)}"
        if args.scheduler_overhead
        else f"{', '.join(args.api)} of {', '.join(args.variants)}"
    )
    progress = Progress(len(args.classes))
    rows = []
    for num_classes in args.classes:
        rows.extend(time_c(args, num_classes))
        keras.backend.clear_session()
        gc.collect()
        progress.done_with(f"timed C={num_classes} ({cases})")
    # The baseline of the ratios, and the key the ratio goes under.
    baseline, ratio_key = (
        ("none", "ratio") if args.scheduler_overhead
        else ("dense", "ratio_to_dense")
    )
    by_key = {
        (r["classes"], r["api"], r["jit_compile"], r["variant"]): r
        for r in rows
    }
    for r in rows:
        base = by_key.get((r["classes"], r["api"], r["jit_compile"], baseline))
        r[ratio_key] = ratio(r["median_ms"], base and base["median_ms"])
    if args.scheduler_overhead:
        table = scheduler_table(rows)
        mode_config = {
            "mode": "scheduler_overhead",
            "model": f"Input({args.dim}) -> Dense({args.dim}, relu) -> "
            "LSoftmaxDense(C)",
            "schedulers": args.schedulers,
            "schedule": f"InverseDecay(**{SCHEDULE_ARGS})",
            "epochs": args.epochs,
        }
    else:
        table = markdown_table(rows)
        mode_config = {"variants": args.variants, "api": args.api}
    results = {
        "config": {
            "classes": args.classes,
            "batch": args.batch,
            "dim": args.dim,
            "dtype": "float32",
            "margin": args.margin,
            "lam": args.lam,
            **mode_config,
            "jit_compile": args.jit_compile,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "min_sample_ms": args.min_sample_ms,
            "fit_batches": args.fit_batches,
            "device": args.device,
            "optimizer": "SGD(learning_rate=1e-3, momentum=0.9)",
            "loss": "SparseCategoricalCrossentropy(from_logits=True)",
            "metrics": ["accuracy"],
            "seed": args.seed,
            **environment(),
        },
        "rows": rows,
        "markdown": table,
    }
    return report(results, args.out)


if __name__ == "__main__":
    main()
