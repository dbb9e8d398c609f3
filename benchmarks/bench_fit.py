"""Times a Keras `fit` / `train_on_batch` step: LSoftmaxDense vs Dense models.

Usage (from the repository root):

    python benchmarks/bench_fit.py --out bench_fit.json
    python benchmarks/bench_fit.py --classes 1000 10000 --repeats 10
    python benchmarks/bench_fit.py --api train_on_batch --jit-compile true

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
no XLA; the table shows what Keras resolved it to.

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

Timing: after `--warmup` calls (the first traces and compiles), the variants
of one C are run interleaved (A B A B ..., every API and jit setting in the
same round) for `--repeats` rounds; `inner` is chosen per C so that one
sample of the fastest variant lasts about `--min-sample-ms` (override with
`--inner`). The table reports the median per-step time, its interquartile
range and the ratio of medians to `dense` in the same run, API and jit
setting.

Output: a Markdown table on stdout and, with `--out`, a JSON file with the
configuration, one row per (C, API, jit, variant) with all samples, and the
table. Nothing here asserts a time.
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

import keras_lsoftmax  # noqa: E402
from benchmarks.common import add_timing_arguments  # noqa: E402
from benchmarks.common import environment  # noqa: E402
from benchmarks.common import fmt  # noqa: E402
from benchmarks.common import report  # noqa: E402

import keras
import tensorflow as tf

VARIANTS = ("dense", "lsoftmax")
APIS = ("train_on_batch", "fit")
DEFAULT_CLASSES = (1000, 10000)
JIT_CHOICES = {"auto": "auto", "true": True, "false": False}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_fit.py",
        allow_abbrev=False,
        description="Time a Keras training step (fit / train_on_batch) of a "
        "keras_lsoftmax.Sequential LSoftmaxDense model vs a Dense one (see "
        "the module docstring).",
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
        "its per-call cost (default: %(default)s)",
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
        help="TF device scope for the calls, e.g. /CPU:0 (default: none, "
        "TensorFlow's placement)",
    )
    parser.add_argument("--margin", type=int, default=4, help="margin m")
    parser.add_argument(
        "--lam", type=float, default=0.0, help="initial λ of the head"
    )
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
        help="models to time; `dense` is needed for the ratios",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    for name in ("batch", "dim", "repeats", "margin", "warmup", "fit_batches"):
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
    return args


class _Device:
    """`tf.device(name)`, or nothing when `name` is None."""

    def __init__(self, name: str | None):
        self.scope = tf.device(name) if name else None

    def __enter__(self):
        if self.scope is not None:
            self.scope.__enter__()

    def __exit__(self, *exc):
        if self.scope is not None:
            return self.scope.__exit__(*exc)
        return False


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
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=1e-3, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


class Case:
    """One model (variant, jit setting) and its timed calls per API."""

    def __init__(
        self, name: str, jit_setting: str, args: argparse.Namespace,
        num_classes: int, kernel0: np.ndarray,
    ):
        self.name = name
        self.jit_setting = jit_setting
        self.args = args
        self.model = build_model(
            name, args, num_classes, kernel0, JIT_CHOICES[jit_setting]
        )
        self.loss = math.nan

    @property
    def jit(self) -> bool:
        return bool(self.model.jit_compile)

    def run(self, api: str, inner: int, data: dict[str, np.ndarray]) -> None:
        """`inner` steps through `api`; returns once they are done."""
        if api == "train_on_batch":
            for _ in range(inner):
                logs = self.model.train_on_batch(
                    data["x"], data["y"], return_dict=True
                )
        else:
            rows = inner * self.args.batch
            history = self.model.fit(
                data["x_all"][:rows], data["y_all"][:rows],
                batch_size=self.args.batch, epochs=1, shuffle=False,
                verbose=0,
            )
            logs = {k: v[-1] for k, v in history.history.items()}
        self.loss = float(logs["loss"])


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


def time_one_c(
    args: argparse.Namespace, num_classes: int
) -> list[dict[str, Any]]:
    kernel0 = initial_kernel(args, num_classes)
    cases = [
        Case(name, jit, args, num_classes, kernel0)
        for jit in args.jit_compile
        for name in args.variants
    ]
    data = make_data(args, num_classes, args.batch)
    device = _Device(args.device)
    first_s = {}
    with device:
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
        steps = {"train_on_batch": inner, "fit": max(inner, args.fit_batches)}
        if "fit" in args.api:
            data = make_data(args, num_classes, args.batch * steps["fit"])
            for case in cases:  # one untimed fit on the full arrays
                case.run("fit", steps["fit"], data)
        times = {
            (c.name, c.jit_setting, api): []
            for c in cases for api in args.api
        }
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for _ in range(args.repeats):
                for api in args.api:
                    for case in cases:
                        t0 = time.perf_counter()
                        case.run(api, steps[api], data)
                        elapsed = time.perf_counter() - t0
                        times[(case.name, case.jit_setting, api)].append(
                            1e3 * elapsed / steps[api]
                        )
        finally:
            if gc_was_enabled:
                gc.enable()
    rows = []
    for api in args.api:
        for case in cases:
            samples = np.asarray(times[(case.name, case.jit_setting, api)])
            q25, median, q75 = np.percentile(samples, [25, 50, 75])
            rows.append({
                "classes": num_classes,
                "api": api,
                "jit_compile": case.jit_setting,
                "jit": case.jit,
                "variant": case.name,
                "median_ms": float(median),
                "q25_ms": float(q25),
                "q75_ms": float(q75),
                "iqr_ms": float(q75 - q25),
                "min_ms": float(samples.min()),
                "samples_ms": [float(t) for t in samples],
                "inner": steps[api],
                "first_call_s": first_s[(case.name, case.jit_setting, api)],
                "final_loss": case.loss,
            })
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| C | API | jit | variant | median ms | IQR ms | ratio to Dense |",
        "|---:|:---|:---:|:---|---:|---:|---:|",
    ]
    for r in rows:
        jit = ("yes" if r["jit"] else "no") + (
            " (auto)" if r["jit_compile"] == "auto" else ""
        )
        lines.append(
            f"| {r['classes']} | {r['api']} | {jit} | {r['variant']} "
            f"| {r['median_ms']:.3f} | {r['iqr_ms']:.3f} "
            f"| {fmt(r['ratio_to_dense'], '.2f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns the results (also written to --out)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    rows = []
    for num_classes in args.classes:
        rows.extend(time_one_c(args, num_classes))
        keras.backend.clear_session()
        gc.collect()
    by_key = {
        (r["classes"], r["api"], r["jit_compile"], r["variant"]): r
        for r in rows
    }
    for r in rows:
        dense = by_key.get((r["classes"], r["api"], r["jit_compile"], "dense"))
        base = dense and dense["median_ms"]
        r["ratio_to_dense"] = r["median_ms"] / base if base else None
    table = markdown_table(rows)
    results = {
        "config": {
            "classes": args.classes,
            "batch": args.batch,
            "dim": args.dim,
            "dtype": "float32",
            "margin": args.margin,
            "lam": args.lam,
            "variants": args.variants,
            "api": args.api,
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
