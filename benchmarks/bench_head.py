"""Times a training step of `LSoftmaxDense`, `Dense` and an autodiff head.

Usage (from the repository root):

    python benchmarks/bench_head.py --out bench_head.json
    python benchmarks/bench_head.py --classes 10 1000 10000 --repeats 10
    python benchmarks/bench_head.py --device /GPU:0 --out bench_head_gpu.json
    python benchmarks/bench_head.py --features trained frozen --classes 10000

Variants (`--variants`, default all three):

- `dense`: `keras.layers.Dense(C, use_bias=False)`, the baseline;
- `lsoftmax`: `keras_lsoftmax.LSoftmaxDense(C, margin=m)` called with
  `labels=y, training=True` (the package's analytic-gradient op);
- `autodiff`: `benchmarks.autodiff_reference.AutodiffLSoftmaxDense`, the same
  margin math in plain TF ops differentiated by autodiff (a reference row,
  not shipped in the package).

Every variant runs the same hand-written step, as `tf.function` and as
`tf.function(jit_compile=True)` (XLA) unless `--no-jit` / `--jit-only`:

    with tf.GradientTape() as tape:
        logits = head(x, y)
        loss = mean(sparse_softmax_cross_entropy_with_logits(y, logits))
    grads = tape.gradient(loss, [x, kernel])
    optimizer.apply(grads, [x, kernel])

`x` is a fixed random (B, D) feature matrix held in a trainable variable, so
the step also computes the gradient with respect to the features, as a real
network backpropagating into its backbone would; the labels are random
integers. The optimizer is SGD with momentum 0.9 (learning rate 1e-3) for
every variant; λ is a float32 variable (`--lam`, default 0).

Features (`--features`, default `trained`; give both to compare them):

- `trained`: the step above, gradients with respect to `[x, kernel]`;
- `frozen`: a linear probe on frozen features. `x` is a constant tensor
  (captured by the step function, not a variable), the step takes the
  gradient with respect to the kernel only and the optimizer updates only the
  kernel, the same for every variant:

      grads = tape.gradient(loss, [kernel])
      optimizer.apply(grads, [kernel])

Timing: after `--warmup` calls (the first traces and compiles), the variants
of one C are run interleaved (A B C A B C ..., both compile modes and both
feature settings in the same round) for `--repeats` rounds. Each sample
times `inner` consecutive steps and is divided by `inner`; `inner` is chosen
per C so that one sample of the fastest variant lasts about
`--min-sample-ms` (override with `--inner`); on a shared 2-core machine
single steps of a few milliseconds vary by a third, and 0.1 s samples
average that out. The table reports the median per-step time, its
interquartile range, and the ratio of medians to `dense` in the same run,
compile mode and feature setting.

Peak memory is the extra memory one step needs beyond what is allocated
before it (variables, optimizer slots and inputs excluded), once each step is
compiled and warm; the largest of `--memory-probes` probed steps is reported.
Two methods (`--memory`):

- `allocator` (the default where available, i.e. on GPU): TensorFlow's
  allocator statistics in this process, `get_memory_info(device)["peak"]`
  after `reset_memory_stats(device)` minus `["current"]` just before the
  step. Counts what ops and XLA executables take from the device allocator
  (BFC on GPU, so sizes are rounded to its chunks).
- `rss` (the default on CPU): TensorFlow's default CPU allocator keeps no
  statistics (`get_memory_info('CPU:0')` raises "Allocator stats not
  available" in TF 2.21), so one child process runs the probe of the whole
  grid and reads the kernel's resident-set high-water mark: VmHWM (from
  /proc/self/status, reset by writing 5 to /proc/self/clear_refs) after the
  step minus VmRSS before it. The child sets `MALLOC_MMAP_THRESHOLD_=65536`
  and `MALLOC_TRIM_THRESHOLD_=0`, so glibc maps every large buffer freshly
  and returns it at once and the resident set follows the live bytes; it
  counts everything the process touches (oneDNN scratch included), to the
  4 KiB page. Linux only. The timing process keeps the default malloc.
  (Making the CPU allocator a BFC allocator with
  `TF_CPU_ALLOCATOR_USE_BFC=true` also enables `get_memory_info('CPU:0')`,
  but that allocator grows in power-of-two regions and does not split a free
  chunk smaller than twice the request, so its peaks come out as 64 or
  128 MiB depending on allocation history; hence not used.)
- `none` skips the probe.

Output: a Markdown table on stdout (one per feature setting, each under a
heading line, when `--features` names both) and, with `--out`, a JSON file
with the configuration, one row per (C, jit, features, variant) with all
samples, and the table(s). Nothing here asserts a time.

A step through `model.fit` / `train_on_batch` instead of this hand-written
one is timed by the sibling `benchmarks/bench_fit.py`.
"""

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

try:
    import benchmarks  # noqa: F401
except ImportError:  # run as `python benchmarks/bench_head.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.autodiff_reference import AutodiffLSoftmaxDense  # noqa: E402
from benchmarks.common import add_timing_arguments  # noqa: E402
from benchmarks.common import environment  # noqa: E402
from benchmarks.common import fmt  # noqa: E402
from benchmarks.common import report  # noqa: E402

import keras
import tensorflow as tf

import keras_lsoftmax

VARIANTS = ("dense", "lsoftmax", "autodiff")
FEATURES = ("trained", "frozen")
DEFAULT_CLASSES = (10, 1000, 10000, 100000)
MIB = 1024.0 * 1024.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_head.py",
        allow_abbrev=False,
        description="Time a training step of LSoftmaxDense vs Dense vs an "
        "autodiff L-Softmax head (see the module docstring).",
    )
    add_timing_arguments(
        parser,
        classes=DEFAULT_CLASSES,
        repeats=30,
        min_sample_ms=100.0,
        warmup_help="untimed calls per step before timing (the first "
        "compiles)",
    )
    parser.add_argument(
        "--device", default="/CPU:0", help="TF device, e.g. /CPU:0, /GPU:0"
    )
    jit = parser.add_mutually_exclusive_group()
    jit.add_argument(
        "--no-jit", action="store_true", help="only tf.function without XLA"
    )
    jit.add_argument(
        "--jit-only", action="store_true",
        help="only tf.function(jit_compile=True)",
    )
    parser.add_argument("--margin", type=int, default=4, help="margin m")
    parser.add_argument(
        "--lam", type=float, default=0.0, help="λ, held in a variable"
    )
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
        help="heads to time; `dense` is needed for the ratios",
    )
    parser.add_argument(
        "--features", nargs="+", choices=FEATURES, default=["trained"],
        help="trained: gradients w.r.t. the features (a variable) and the "
        "kernel; frozen: the features are a constant and only the kernel "
        "gets a gradient (a linear probe); give both to time both in the "
        "same rounds (default: %(default)s)",
    )
    parser.add_argument(
        "--memory", choices=("auto", "allocator", "rss", "none"),
        default="auto",
        help="peak-memory probe: allocator = TF allocator statistics in this "
        "process (GPU); rss = resident-set high-water mark in a child process "
        "(CPU, Linux); auto (default) = allocator where the device has "
        "statistics, else rss",
    )
    parser.add_argument(
        "--memory-probes", type=int, default=3,
        help="probed steps per variant; the largest peak is reported",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON to this path")
    # Internal: run only the memory probe and write its results here.
    parser.add_argument("--memory-probe-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch", "dim", "repeats", "margin"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first call compiles)")
    if args.memory_probes < 1:
        parser.error("--memory-probes must be >= 1")
    if args.inner < 0:
        parser.error("--inner must be >= 0")
    if min(args.classes) < 1:
        parser.error("--classes must be >= 1")
    if args.lam < 0:
        parser.error("--lam must be >= 0")
    args.variants = list(dict.fromkeys(args.variants))
    args.features = [f for f in FEATURES if f in args.features]
    return args


def jit_modes(args: argparse.Namespace) -> list[bool]:
    if args.no_jit:
        return [False]
    if args.jit_only:
        return [True]
    return [True, False]


def memory_device(device: str) -> str:
    """'/GPU:0' or '/job:localhost/device:GPU:0' -> 'GPU:0'."""
    name = device.rsplit("/", 1)[-1]
    if name.lower().startswith("device:"):
        name = name[len("device:"):]
    kind, _, index = name.partition(":")
    return f"{kind.upper()}:{index or 0}"


def allocator_stats_available(device: str) -> bool:
    try:
        tf.config.experimental.get_memory_info(memory_device(device))
    except (ValueError, RuntimeError):
        return False
    return True


class Variant:
    """One head with its own feature variable, optimizer and step functions."""

    def __init__(
        self, name: str, args: argparse.Namespace, num_classes: int,
        x0: np.ndarray, y: tf.Tensor, kernel0: np.ndarray,
        features: str = "trained",
    ):
        self.name = name
        self.features = features
        if name == "dense":
            self.head = keras.layers.Dense(
                num_classes, use_bias=False, name="dense"
            )
        elif name == "lsoftmax":
            self.head = keras_lsoftmax.LSoftmaxDense(
                num_classes, margin=args.margin, initial_lambda=args.lam,
                name="lsoftmax",
            )
        elif name == "autodiff":
            self.head = AutodiffLSoftmaxDense(
                num_classes, margin=args.margin, initial_lambda=args.lam,
                name="autodiff",
            )
        else:
            raise ValueError(f"unknown variant {name!r}")

        def call(x, y):
            if name == "dense":
                return self.head(x)
            return self.head(x, labels=y, training=True)

        self.head.build((args.batch, args.dim))
        # Identical weights for all heads. `kernel0` has the (D, C) layout
        # of the Dense and autodiff kernels; LSoftmaxDense stores one row
        # per class, (C, D).
        self.head.kernel.assign(kernel0.T if name == "lsoftmax" else kernel0)
        if features == "trained":
            self.x = keras.Variable(x0, trainable=True, name="features")
            self.variables = [self.x, self.head.kernel]
        else:  # frozen: a constant the tape does not watch
            self.x = tf.constant(x0)
            self.variables = [self.head.kernel]
        self.optimizer = keras.optimizers.SGD(learning_rate=1e-3, momentum=0.9)
        self.optimizer.build(self.variables)
        self.y = y

        def step():
            with tf.GradientTape() as tape:
                logits = call(self.x, self.y)
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(
                        labels=self.y, logits=logits
                    )
                )
            grads = tape.gradient(loss, self.variables)
            self.optimizer.apply(grads, self.variables)
            return loss

        self.steps = {
            True: tf.function(step, jit_compile=True),
            False: tf.function(step, jit_compile=False),
        }

    def sync(self, loss: tf.Tensor) -> float:
        # Reading the kernel waits for this step's update too (on GPU).
        self.head.kernel.value[0, 0].numpy()
        return float(loss.numpy())


def build_variants(
    args: argparse.Namespace, num_classes: int
) -> dict[tuple[str, str], Variant]:
    """The heads of one C, keyed by (features, variant name)."""
    rng = np.random.default_rng(args.seed + num_classes)
    x0 = rng.standard_normal((args.batch, args.dim)).astype(np.float32)
    limit = math.sqrt(6.0 / (args.dim + num_classes))  # glorot uniform
    kernel0 = rng.uniform(-limit, limit, (args.dim, num_classes)).astype(
        np.float32
    )
    labels = rng.integers(0, num_classes, args.batch).astype(np.int32)
    with tf.device(args.device):
        y = tf.constant(labels)
        return {
            (features, name): Variant(
                name, args, num_classes, x0, y, kernel0, features
            )
            for features in args.features
            for name in args.variants
        }


def warm_up(
    variants: dict[tuple[str, str], Variant], modes: list[bool],
    args: argparse.Namespace,
) -> dict[tuple[str, str, bool], float]:
    """Calls every step `--warmup` times; returns the first call's seconds."""
    compile_s = {}
    with tf.device(args.device):
        for key, variant in variants.items():
            for jit in modes:
                step = variant.steps[jit]
                t0 = time.perf_counter()
                variant.sync(step())
                compile_s[(*key, jit)] = time.perf_counter() - t0
                for _ in range(args.warmup - 1):
                    variant.sync(step())
    return compile_s


def pick_inner(
    variants: dict[tuple[str, str], Variant], modes: list[bool],
    args: argparse.Namespace,
) -> int:
    if args.inner:
        return args.inner
    fastest = math.inf
    with tf.device(args.device):
        for variant in variants.values():
            for jit in modes:
                samples = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    variant.sync(variant.steps[jit]())
                    samples.append(time.perf_counter() - t0)
                fastest = min(fastest, float(np.median(samples)))
    return max(1, math.ceil(args.min_sample_ms / 1e3 / fastest))


def time_interleaved(
    variants: dict[tuple[str, str], Variant], modes: list[bool], inner: int,
    args: argparse.Namespace,
) -> tuple[
    dict[tuple[str, str, bool], list[float]],
    dict[tuple[str, str, bool], float],
]:
    """Per-step ms of each (features, variant, jit), rounds interleaved."""
    times = {(*key, jit): [] for key in variants for jit in modes}
    losses = {}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with tf.device(args.device):
            for _ in range(args.repeats):
                for jit in modes:
                    for key, variant in variants.items():
                        step = variant.steps[jit]
                        t0 = time.perf_counter()
                        for _ in range(inner):
                            loss = step()
                        losses[(*key, jit)] = variant.sync(loss)
                        elapsed = time.perf_counter() - t0
                        times[(*key, jit)].append(1e3 * elapsed / inner)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times, losses


_RSS_ENV = {
    # glibc: map every buffer of 64 KiB or more on its own and unmap it when
    # freed, and trim the heap at once, so the resident set follows the
    # live bytes instead of malloc's caches.
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "0",
    "MALLOC_TOP_PAD_": "0",
}


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to VmRSS (Linux >= 4.0)


def rss_probe_available() -> bool:
    try:
        _reset_rss_peak()
        _proc_status_bytes("VmHWM")
        _proc_status_bytes("VmRSS")
    except (OSError, RuntimeError, ValueError):
        return False
    return True


def probe_memory(
    variants: dict[tuple[str, str], Variant], modes: list[bool],
    args: argparse.Namespace, method: str,
) -> dict[tuple[str, str, bool], int]:
    """Peak extra bytes of one compiled, warm step of each (features,
    variant, jit)."""
    device = memory_device(args.device)
    peaks = {}
    with tf.device(args.device):
        for key, variant in variants.items():
            for jit in modes:
                step = variant.steps[jit]
                variant.sync(step())  # compiled and warm
                peak = 0
                for _ in range(args.memory_probes):
                    if method == "allocator":
                        tf.config.experimental.reset_memory_stats(device)
                        info = tf.config.experimental.get_memory_info(device)
                        before = info["current"]
                        variant.sync(step())
                        after = tf.config.experimental.get_memory_info(device)
                        extra = after["peak"] - before
                    else:
                        before = _proc_status_bytes("VmRSS")
                        _reset_rss_peak()
                        variant.sync(step())
                        extra = _proc_status_bytes("VmHWM") - before
                    peak = max(peak, extra)
                peaks[(*key, jit)] = int(peak)
    return peaks


def probe_memory_subprocess(
    args: argparse.Namespace, argv: list[str]
) -> dict[tuple[int, str, str, bool], int]:
    """Runs the `rss` memory probe of the whole grid in one child process."""
    script = os.path.abspath(__file__)
    probe_argv = []  # the same grid, with --memory rss
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--memory", "--out"):
            skip = True
        elif not arg.startswith(("--memory=", "--out=")):
            probe_argv.append(arg)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "memory.json")
        cmd = [sys.executable, script, *probe_argv, "--memory", "rss",
               "--memory-probe-out", out]
        env = {**os.environ, **_RSS_ENV}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            print(
                "warning: the memory probe failed (exit code "
                f"{proc.returncode}); peak memory is left empty.\n"
                + proc.stderr[-3000:],
                file=sys.stderr,
            )
            return {}
        with open(out) as f:
            rows = json.load(f)
    return {
        (r["classes"], r["features"], r["variant"], r["jit"]): r["peak_bytes"]
        for r in rows
    }


def run_memory_probe_only(args: argparse.Namespace) -> None:
    """The child process of the `rss` probe: probes, writes JSON, exits."""
    if not rss_probe_available():
        raise SystemExit("/proc/self/clear_refs or VmHWM is not available")
    modes = jit_modes(args)
    rows = []
    for num_classes in args.classes:
        variants = build_variants(args, num_classes)
        peaks = probe_memory(variants, modes, args, "rss")
        for (features, name, jit), peak in peaks.items():
            rows.append(
                {"classes": num_classes, "features": features,
                 "variant": name, "jit": jit, "peak_bytes": peak}
            )
        del variants
        gc.collect()
    with open(args.memory_probe_out, "w") as f:
        json.dump(rows, f)


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base <= 0:
        return None
    return value / base


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One table, or one per feature setting under a heading line."""
    settings = list(dict.fromkeys(r.get("features", "trained") for r in rows))
    if len(settings) > 1:
        return "\n\n".join(
            f"Features {features} ({_FEATURES_TITLE[features]}):\n\n"
            + _one_table([r for r in rows if r["features"] == features])
            for features in settings
        )
    return _one_table(rows)


_FEATURES_TITLE = {
    "trained": "gradients w.r.t. features and kernel",
    "frozen": "constant features, gradient w.r.t. the kernel only",
}


def _one_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| C | jit | variant | median ms | IQR ms | ratio to Dense "
        "| peak MiB | ratio |",
        "|---:|:---:|:---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['classes']} | {'yes' if r['jit'] else 'no'} "
            f"| {r['variant']} | {r['median_ms']:.3f} | {r['iqr_ms']:.3f} "
            f"| {fmt(r['ratio_to_dense'], '.2f')} "
            f"| {fmt(r['peak_mib'], '.4g')} "
            f"| {fmt(r['peak_ratio_to_dense'], '.2f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns the results (also written to --out)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.memory_probe_out:
        run_memory_probe_only(args)
        return {}
    modes = jit_modes(args)

    memory_method = args.memory
    if memory_method == "auto":
        memory_method = (
            "allocator" if allocator_stats_available(args.device) else "rss"
        )
    if memory_method == "allocator" and not allocator_stats_available(
        args.device
    ):
        raise SystemExit(
            f"--memory allocator: allocator statistics are not available on "
            f"{args.device}; use --memory rss"
        )
    if memory_method == "rss" and not rss_probe_available():
        print(
            "warning: --memory rss needs Linux's /proc/self/clear_refs and "
            "VmHWM; peak memory is left empty.",
            file=sys.stderr,
        )
        memory_method = "none"

    rows = []
    peaks: dict[tuple[int, str, bool], int] = {}
    for num_classes in args.classes:
        variants = build_variants(args, num_classes)
        compile_s = warm_up(variants, modes, args)
        inner = pick_inner(variants, modes, args)
        times, losses = time_interleaved(variants, modes, inner, args)
        if memory_method == "allocator":
            peaks.update({
                (num_classes, *key): peak
                for key, peak in probe_memory(
                    variants, modes, args, "allocator"
                ).items()
            })
        for features in args.features:
            for jit in modes:
                for name in args.variants:
                    key = (features, name, jit)
                    samples = np.asarray(times[key])
                    q25, median, q75 = np.percentile(samples, [25, 50, 75])
                    rows.append({
                        "classes": num_classes,
                        "jit": jit,
                        "features": features,
                        "variant": name,
                        "median_ms": float(median),
                        "q25_ms": float(q25),
                        "q75_ms": float(q75),
                        "iqr_ms": float(q75 - q25),
                        "min_ms": float(samples.min()),
                        "samples_ms": [float(t) for t in samples],
                        "inner": inner,
                        "first_call_s": compile_s[key],
                        "final_loss": losses[key],
                    })
        del variants
        gc.collect()

    if memory_method == "rss":
        peaks = probe_memory_subprocess(args, argv)

    by_key = {
        (r["classes"], r["jit"], r["features"], r["variant"]): r for r in rows
    }
    for r in rows:
        peak = peaks.get(
            (r["classes"], r["features"], r["variant"], r["jit"])
        )
        r["peak_bytes"] = peak
        r["peak_mib"] = None if peak is None else peak / MIB
    for r in rows:
        dense = by_key.get((r["classes"], r["jit"], r["features"], "dense"))
        r["ratio_to_dense"] = _ratio(
            r["median_ms"], dense and dense["median_ms"]
        )
        r["peak_ratio_to_dense"] = _ratio(
            r["peak_bytes"], dense and dense["peak_bytes"]
        )

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
            "jit_modes": modes,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "min_sample_ms": args.min_sample_ms,
            "device": args.device,
            "optimizer": "SGD(learning_rate=1e-3, momentum=0.9)",
            "loss": "mean sparse_softmax_cross_entropy_with_logits",
            "features": args.features,
            "grads": {
                "trained": "features x (a variable) and kernel",
                "frozen": "kernel only (x a constant tensor)",
            },
            "memory_method": memory_method,
            "memory_method_detail": {
                "allocator": "tf.config.experimental.get_memory_info peak "
                "after reset_memory_stats minus current before the step, in "
                "the timing process",
                "rss": "VmHWM after the step minus VmRSS before it (VmHWM "
                "reset via /proc/self/clear_refs), in one child process with "
                "MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0",
                "none": "not measured",
            }[memory_method],
            "memory_probes": args.memory_probes,
            "seed": args.seed,
            **environment(),
        },
        "rows": rows,
        "markdown": table,
    }
    return report(results, args.out)


if __name__ == "__main__":
    main()
