"""Times a training step of `LSoftmaxDense`, `Dense` and an autodiff head.

Usage (from the repository root):

    python benchmarks/bench_head.py --out bench_head.json
    python benchmarks/bench_head.py --classes 10 1000 10000 --repeats 10
    python benchmarks/bench_head.py --device /GPU:0 --out bench_head_gpu.json
    python benchmarks/bench_head.py --features trained frozen --classes 10000
    python benchmarks/bench_head.py --backend jax --out bench_head_jax.json
    python benchmarks/bench_head.py --backend torch --out bench_head_torch.json
    python benchmarks/bench_head.py --classes 10000 --variants dense \
        sphereface cosface arcface arcface_sc3
    python benchmarks/bench_head.py --smoke  # a tiny run; its times mean nothing

Run time of the default run (TensorFlow, C = 10, 1000, 10000, 100000, three
variants, both compile modes, 30 rounds, memory probe) on a 2-core x86-64
CPU: about 6 minutes, computed from the medians, `inner` and first-call
times in `docs/benchmarks/bench_head_cpu.json` (4.6 min of timed rounds, the
rest warm-up, compilation and the memory probe). `--smoke` (C = 10 and 100,
B = 16, D = 32, 2 rounds of 2 steps, no memory probe) took 15 s after the
imports (23 s in all), measured on the same machine shared with other
work; most of it compiles the twelve steps. A line on stderr reports each
C as it ends, with the time left.

Backend (`--backend tensorflow|jax|torch`, default: `KERAS_BACKEND`, else
tensorflow): read from the command line before Keras is imported. The step
below is written for each backend in `benchmarks/backend_steps.py`; this
script's timing and reporting are the same for all. What "jit" means:

- TensorFlow: `tf.function(jit_compile=True)` (XLA) on, `tf.function`
  off;
- JAX: one `jax.jit` of the whole step (state donated) on, no outer `jit`
  off (op by op; the op's own passes are compiled functions of their own);
- PyTorch: `torch.compile` of the step on, eager off. If `torch.compile`
  fails, its rows have no times and say why (`unavailable`).

Variants (`--variants`, default all three on TensorFlow, `dense` and
`lsoftmax` on JAX and PyTorch):

- `dense`: `keras.layers.Dense(C, use_bias=False)`, the baseline;
- `lsoftmax`: `keras_lsoftmax.LSoftmaxDense(C, margin=m)` called with
  `labels=y, training=True` (the package's analytic-gradient op);
- `autodiff`: `benchmarks.autodiff_reference.AutodiffLSoftmaxDense`, the same
  margin math in plain TF ops differentiated by autodiff (a reference row,
  not shipped in the package). TensorFlow only.

The large-margin family, on every backend, only when named in `--variants`
(each called with `labels=y, training=True`, λ fixed at `--lam`):

- `sphereface`: `keras_lsoftmax.SphereFaceDense(C, margin=m)`;
- `cosface`: `keras_lsoftmax.CosFaceDense(C)` (m = 0.35, s = 64);
- `arcface`: `keras_lsoftmax.ArcFaceDense(C)` (m = 0.5, s = 64);
- `arcface_sc3`: `keras_lsoftmax.ArcFaceDense(C, sub_centers=3)`, whose
  kernel has 3·C rows, so its matrix products are three times Dense's.

All heads start from the same class weights (the sub-centres of class y are
its weights plus a small seeded perturbation).

Every variant runs the same hand-written step, compiled and not unless
`--no-jit` / `--jit-only` (on TensorFlow, below; the other backends'
versions in `benchmarks/backend_steps.py`):

    with tf.GradientTape() as tape:
        logits = head(x, y)
        loss = mean(sparse_softmax_cross_entropy_with_logits(y, logits))
    grads = tape.gradient(loss, [x, kernel])
    optimizer.apply(grads, [x, kernel])

`x` is a fixed random (B, D) feature matrix held in a trainable variable, so
the step also computes the gradient with respect to the features, as a real
network backpropagating into its backbone would; the labels are random
integers. The optimizer is SGD with momentum 0.9 (learning rate 1e-3) for
every variant; λ is a float32 variable (`--lam`, default 0). The
cross-entropy is the backend's own sparse one (TensorFlow's above,
`torch.nn.functional.cross_entropy`, log-sum-exp minus the gathered target
on JAX), which makes no one-hot (B, C) tensor.

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
compiled and warm (after `--warmup` calls); the largest of `--memory-probes`
probed steps is reported. Two methods (`--memory`):

- `allocator` (TensorFlow only; the default where available, i.e. on GPU):
  TensorFlow's allocator statistics in this process,
  `get_memory_info(device)["peak"]` after `reset_memory_stats(device)` minus
  `["current"]` just before the step. Counts what ops and XLA executables
  take from the device allocator (BFC on GPU, so sizes are rounded to its
  chunks).
- `rss` (the default on CPU; on JAX and PyTorch the default where the step
  runs on the CPU, else there is no probe): TensorFlow's default CPU
  allocator keeps no statistics (`get_memory_info('CPU:0')` raises
  "Allocator stats not available" in TF 2.21), so one child process runs
  the probe of the whole grid and reads the kernel's resident-set
  high-water mark: VmHWM (from /proc/self/status, reset by writing 5 to
  /proc/self/clear_refs) after the step minus VmRSS before it. The child
  sets `MALLOC_MMAP_THRESHOLD_=65536` and `MALLOC_TRIM_THRESHOLD_=0`, so
  glibc maps every large buffer freshly and returns it at once and the
  resident set follows the live bytes; it counts everything the process
  touches (oneDNN scratch included), to the 4 KiB page. JAX's CPU buffers
  and PyTorch's CPU tensors come from malloc too. Linux only. The timing
  process keeps the default malloc. (Making the CPU allocator a BFC
  allocator with `TF_CPU_ALLOCATOR_USE_BFC=true` also enables
  `get_memory_info('CPU:0')`, but that allocator grows in power-of-two
  regions and does not split a free chunk smaller than twice the request,
  so its peaks come out as 64 or 128 MiB depending on allocation history;
  hence not used.)
- `xla` (JAX only): the bytes XLA's buffer assignment gives the compiled
  step (`memory_analysis()` of `jax.jit(step).lower(...).compile()`): its
  preallocated temporaries plus the outputs that do not reuse a donated
  input, which is what the step allocates on any device, without
  running it. Rows that are not compiled get no figure. Exact and
  repeatable, where the `rss` probe of a compiled JAX step depends on which
  pages malloc hands back from the previous step.
- `none` skips the probe.

Output: a Markdown table on stdout (one per feature setting, each under a
heading line, when `--features` names both) and, with `--out`, a JSON file
with the configuration, one row per (C, jit, features, variant) with the
backend, all samples and `ratio_to_dense`, and the table(s). Nothing here
asserts a time.

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

from benchmarks.backend_choice import select_backend  # noqa: E402

if __name__ == "__main__":
    select_backend()  # before the imports below load Keras

from benchmarks import backend_steps  # noqa: E402
from benchmarks.backend_steps import StepUnavailable  # noqa: E402
from benchmarks.backend_steps import Variant  # noqa: E402
from benchmarks.common import HelpFormatter  # noqa: E402
from benchmarks.common import Progress  # noqa: E402
from benchmarks.common import add_run_arguments  # noqa: E402
from benchmarks.common import add_timing_arguments  # noqa: E402
from benchmarks.common import check_backend  # noqa: E402
from benchmarks.common import device_scope  # noqa: E402
from benchmarks.common import environment  # noqa: E402
from benchmarks.common import fmt  # noqa: E402
from benchmarks.common import parse_smoke  # noqa: E402
from benchmarks.common import proc_status_bytes  # noqa: E402
from benchmarks.common import ratio  # noqa: E402
from benchmarks.common import report  # noqa: E402
from benchmarks.common import reset_rss_peak  # noqa: E402
from benchmarks.common import rss_probe_available  # noqa: E402
from benchmarks.common import sample_stats  # noqa: E402

ALL_VARIANTS = ("dense", "lsoftmax", "autodiff", *backend_steps.FAMILY)
JIT_MEANING = {
    "tensorflow": "tf.function(jit_compile=True) vs tf.function",
    "jax": "jax.jit of the whole step (state donated) vs no outer jit",
    "torch": "torch.compile of the step vs eager",
}
LOSS = {
    "tensorflow": "mean sparse_softmax_cross_entropy_with_logits",
    "jax": "mean of logsumexp(logits) - logits[i, y_i]",
    "torch": "torch.nn.functional.cross_entropy (mean)",
}
FEATURES = ("trained", "frozen")
DEFAULT_CLASSES = (10, 1000, 10000, 100000)
# --smoke: every variant, compile mode and row of the output, in seconds.
# Two warm-up calls: torch.compile compiles again on the second.
SMOKE = {
    "classes": [10, 100], "batch": 16, "dim": 32, "repeats": 2,
    "warmup": 2, "inner": 2, "memory": "none",
}
MIB = 1024.0 * 1024.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_head.py",
        allow_abbrev=False,
        description="Time a training step of LSoftmaxDense vs Dense vs an "
        "autodiff L-Softmax head (see the module docstring).",
        formatter_class=HelpFormatter,
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
        "--device",
        help="device of the step: on TensorFlow e.g. /CPU:0 (the default), "
        "/GPU:0; on JAX and PyTorch a keras.device name, e.g. cpu:0, gpu:0 "
        "(default: Keras's placement)",
    )
    jit = parser.add_mutually_exclusive_group()
    jit.add_argument(
        "--no-jit", action="store_true",
        help="only the uncompiled step: tf.function without XLA, JAX "
        "without jax.jit, eager PyTorch (default: both steps)",
    )
    jit.add_argument(
        "--jit-only", action="store_true",
        help="only the compiled step: tf.function(jit_compile=True), "
        "jax.jit, torch.compile (default: both steps)",
    )
    parser.add_argument("--margin", type=int, default=4, help="margin m")
    parser.add_argument(
        "--lam", type=float, default=0.0, help="λ, held in a variable"
    )
    parser.add_argument(
        "--variants", nargs="+", choices=ALL_VARIANTS,
        help="heads to time; `dense` is needed for the ratios; `autodiff` "
        "is TensorFlow only; sphereface, cosface, arcface and arcface_sc3 "
        "(3 sub-centres) are the large-margin family (default: dense, "
        "lsoftmax and, on TensorFlow, autodiff)",
    )
    parser.add_argument(
        "--features", nargs="+", choices=FEATURES, default=["trained"],
        help="trained: gradients w.r.t. the features (a variable) and the "
        "kernel; frozen: the features are a constant and only the kernel "
        "gets a gradient (a linear probe); give both to time both in the "
        "same rounds (default: %(default)s)",
    )
    parser.add_argument(
        "--memory", choices=("auto", "allocator", "rss", "xla", "none"),
        default="auto",
        help="peak-memory probe: allocator = TF allocator statistics in this "
        "process (TensorFlow on GPU); rss = resident-set high-water mark in a "
        "child process (CPU, Linux); xla = the buffer assignment of JAX's "
        "compiled step (compiled rows only); auto (default) = allocator "
        "where the device has statistics, else rss where the step runs on "
        "the CPU, else none",
    )
    parser.add_argument(
        "--memory-probes", type=int, default=3,
        help="probed steps per variant; the largest peak is reported",
    )
    add_run_arguments(parser, "seed of the random problem", SMOKE)
    # Internal: run only the memory probe and write its results here.
    parser.add_argument("--memory-probe-out", help=argparse.SUPPRESS)
    parse_smoke(parser, argv, SMOKE)
    args = parser.parse_args(argv)
    check_backend(parser, args.backend)
    for name in ("batch", "dim", "repeats", "margin"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first call compiles)")
    if args.backend == "torch" and args.warmup < 2 and not args.no_jit:
        parser.error(
            "--warmup must be >= 2 on torch: torch.compile compiles the "
            "step again on its second call"
        )
    if args.memory_probes < 1:
        parser.error("--memory-probes must be >= 1")
    if args.inner < 0:
        parser.error("--inner must be >= 0")
    if min(args.classes) < 1:
        parser.error("--classes must be >= 1")
    if args.lam < 0:
        parser.error("--lam must be >= 0")
    backend_variants = backend_steps.VARIANTS[args.backend]
    args.variants = list(dict.fromkeys(
        args.variants or backend_steps.DEFAULT_VARIANTS[args.backend]
    ))
    for name in args.variants:
        if name not in backend_variants:
            parser.error(
                f"--variants {name} is not available on the {args.backend} "
                f"backend (choose from {', '.join(backend_variants)})"
            )
    if args.device is None and args.backend == "tensorflow":
        args.device = "/CPU:0"
    args.features = [f for f in FEATURES if f in args.features]
    return args


def jit_modes(args: argparse.Namespace) -> list[bool]:
    if args.no_jit:
        return [False]
    if args.jit_only:
        return [True]
    return [True, False]


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
    with device_scope(args.device):
        return backend_steps.make_variants(
            args.variants, args.features, num_classes, x0, labels, kernel0,
            args.margin, args.lam,
        )


def warm_up(
    variants: dict[tuple[str, str], Variant], modes: list[bool],
    args: argparse.Namespace,
) -> dict[tuple[str, str, bool], float]:
    """Calls every step `--warmup` times; returns the first call's seconds.

    A step that raises `StepUnavailable` is recorded in its variant's
    `unavailable` and left out from then on.
    """
    compile_s = {}
    with device_scope(args.device):
        for key, variant in variants.items():
            for jit in modes:
                step = variant.steps[jit]
                t0 = time.perf_counter()
                try:
                    variant.sync(step())
                    compile_s[(*key, jit)] = time.perf_counter() - t0
                    for _ in range(args.warmup - 1):
                        variant.sync(step())
                except StepUnavailable as error:
                    variant.unavailable[jit] = str(error)
    return compile_s


def pick_inner(
    variants: dict[tuple[str, str], Variant], modes: list[bool],
    args: argparse.Namespace,
) -> int:
    if args.inner:
        return args.inner
    fastest = math.inf
    with device_scope(args.device):
        for variant in variants.values():
            for jit in variant.available(modes):
                samples = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    variant.sync(variant.steps[jit]())
                    samples.append(time.perf_counter() - t0)
                fastest = min(fastest, float(np.median(samples)))
    if fastest == math.inf:  # no step could run
        return 1
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
        with device_scope(args.device):
            for _ in range(args.repeats):
                for jit in modes:
                    for key, variant in variants.items():
                        if jit in variant.unavailable:
                            continue
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


def probe_memory(
    variants: dict[tuple[str, str], Variant], modes: list[bool],
    args: argparse.Namespace, method: str,
) -> dict[tuple[str, str, bool], int]:
    """Peak extra bytes of one compiled, warm step of each (features,
    variant, jit) that could run."""
    peaks = {}
    with device_scope(args.device):
        for key, variant in variants.items():
            for jit in variant.available(modes):
                step = variant.steps[jit]
                try:
                    for _ in range(args.warmup):  # compiled and warm
                        variant.sync(step())
                except StepUnavailable as error:
                    variant.unavailable[jit] = str(error)
                    continue
                peak = 0
                for _ in range(args.memory_probes):
                    if method == "allocator":
                        extra = backend_steps.allocator_extra_bytes(
                            args.device, lambda: variant.sync(step())
                        )
                    else:
                        before = proc_status_bytes("VmRSS")
                        reset_rss_peak()
                        variant.sync(step())
                        extra = proc_status_bytes("VmHWM") - before
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
        cmd = [sys.executable, script, *probe_argv, "--backend",
               args.backend, "--memory", "rss", "--memory-probe-out", out]
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


def unavailable_notes(rows: list[dict[str, Any]]) -> str:
    """One line per row without times, saying why; "" when all ran."""
    return "\n".join(
        f"- C={r['classes']}, jit {'yes' if r['jit'] else 'no'}, "
        f"{r['features']}, {r['variant']}: unavailable: {r['unavailable']}"
        for r in rows
        if r["unavailable"]
    )


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
            f"| {r['variant']} | {fmt(r['median_ms'], '.3f')} "
            f"| {fmt(r['iqr_ms'], '.3f')} "
            f"| {fmt(r['ratio_to_dense'], '.2f')} "
            f"| {fmt(r['peak_mib'], '.4g')} "
            f"| {fmt(r['peak_ratio_to_dense'], '.2f')} |"
        )
    return "\n".join(lines)


def memory_method(args: argparse.Namespace) -> str:
    """The peak-memory probe `--memory` resolves to on this machine."""
    method = args.memory
    if method == "auto":
        if backend_steps.allocator_stats_available(args.device):
            method = "allocator"
        elif args.backend == "tensorflow" or backend_steps.runs_on_cpu(
            args.device
        ):
            method = "rss"
        else:  # host memory says nothing about an accelerator's
            method = "none"
    if method == "allocator" and not backend_steps.allocator_stats_available(
        args.device
    ):
        raise SystemExit(
            f"--memory allocator: allocator statistics are not available on "
            f"{args.device} ({args.backend} backend; only TensorFlow's are "
            "read); use --memory rss"
        )
    if method == "xla" and args.backend != "jax":
        raise SystemExit(
            "--memory xla reads the buffer assignment of JAX's compiled step; "
            f"it is not available on the {args.backend} backend"
        )
    if method == "rss" and not rss_probe_available():
        print(
            "warning: --memory rss needs Linux's /proc/self/clear_refs and "
            "VmHWM; peak memory is left empty.",
            file=sys.stderr,
        )
        method = "none"
    return method


def time_one_c(
    args: argparse.Namespace, num_classes: int, modes: list[bool],
    method: str,
) -> tuple[list[dict[str, Any]], dict[tuple[int, str, str, bool], int]]:
    """The timed rows of one C and, for the `allocator` probe, its peaks."""
    variants = build_variants(args, num_classes)
    compile_s = warm_up(variants, modes, args)
    inner = pick_inner(variants, modes, args)
    times, losses = time_interleaved(variants, modes, inner, args)
    peaks = {}
    if method == "allocator":
        peaks = {
            (num_classes, *key): peak
            for key, peak in probe_memory(
                variants, modes, args, "allocator"
            ).items()
        }
    if method == "xla" and True in modes:
        peaks = {
            (num_classes, *key, True): variant.compiled_step_bytes()
            for key, variant in variants.items()
            if True in variant.available(modes)
        }
    rows = []
    for features in args.features:
        for jit in modes:
            for name in args.variants:
                key = (features, name, jit)
                rows.append({
                    "backend": args.backend,
                    "classes": num_classes,
                    "jit": jit,
                    "features": features,
                    "variant": name,
                    **sample_stats(times[key]),
                    "inner": inner,
                    "first_call_s": compile_s.get(key),
                    "final_loss": losses.get(key),
                    "unavailable": variants[(features, name)].unavailable.get(
                        jit
                    ),
                })
    return rows, peaks


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns the results (also written to --out)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.memory_probe_out:
        run_memory_probe_only(args)
        return {}
    modes = jit_modes(args)
    method = memory_method(args)

    rows = []
    peaks: dict[tuple[int, str, str, bool], int] = {}
    progress = Progress(len(args.classes) + (method == "rss"))
    cells = (
        f"{', '.join(args.variants)}; jit "
        f"{', '.join('yes' if jit else 'no' for jit in modes)}; features "
        f"{', '.join(args.features)}"
    )
    for num_classes in args.classes:
        c_rows, c_peaks = time_one_c(args, num_classes, modes, method)
        rows.extend(c_rows)
        peaks.update(c_peaks)
        gc.collect()
        progress.done_with(f"timed C={num_classes} ({cells})")

    if method == "rss":
        peaks = probe_memory_subprocess(args, argv)
        progress.done_with("memory probe (child process)")

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
        r["ratio_to_dense"] = ratio(
            r["median_ms"], dense and dense["median_ms"]
        )
        r["peak_ratio_to_dense"] = ratio(
            r["peak_bytes"], dense and dense["peak_bytes"]
        )

    table = markdown_table(rows)
    notes = unavailable_notes(rows)
    if notes:
        table += "\n\nNot timed:\n\n" + notes
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
            "jit_meaning": JIT_MEANING[args.backend],
            "repeats": args.repeats,
            "warmup": args.warmup,
            "min_sample_ms": args.min_sample_ms,
            "device": args.device,
            "optimizer": "SGD(learning_rate=1e-3, momentum=0.9)",
            "loss": LOSS[args.backend],
            "features": args.features,
            "grads": {
                "trained": "features x (a variable) and kernel",
                "frozen": "kernel only (x a constant tensor)",
            },
            "memory_method": method,
            "memory_method_detail": {
                "allocator": "tf.config.experimental.get_memory_info peak "
                "after reset_memory_stats minus current before the step, in "
                "the timing process",
                "rss": "VmHWM after the step minus VmRSS before it (VmHWM "
                "reset via /proc/self/clear_refs), in one child process with "
                "MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0",
                "xla": "XLA's buffer assignment of the compiled step "
                "(jax.jit(...).lower(...).compile().memory_analysis()): its "
                "temporaries plus the outputs that do not reuse a donated "
                "input; steps that are not compiled are not measured",
                "none": "not measured",
            }[method],
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
