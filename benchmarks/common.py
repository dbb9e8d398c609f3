"""What the benchmark scripts share: the help formatter, the backend, problem
and timing arguments, the device scope, the progress lines, the peak
resident memory, `fit` over seeded random batches, the statistics of timing
samples, and the recording and formatting of their results.

Import it only after the backend is chosen (`benchmarks.backend_choice`): it
imports Keras.
"""

import argparse
import contextlib
import importlib
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

import keras_lsoftmax
from benchmarks.backend_choice import BACKENDS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default in `--help`, unless its help already
    says what the default is (as in "default: KERAS_BACKEND, else
    tensorflow")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_timing_arguments(
    parser: argparse.ArgumentParser,
    classes: tuple[int, ...],
    repeats: int,
    min_sample_ms: float,
    warmup_help: str,
) -> None:
    """Adds --backend, --classes, --batch, --dim, --repeats, --warmup,
    --inner and --min-sample-ms to `parser`, with these defaults."""
    parser.add_argument(
        "--backend", choices=BACKENDS, default=keras.backend.backend(),
        help="Keras backend, read before Keras is imported (default: "
        "KERAS_BACKEND, else tensorflow)",
    )
    parser.add_argument(
        "--classes", type=int, nargs="+", default=list(classes),
        help="numbers of classes C (default: %(default)s)",
    )
    parser.add_argument("--batch", type=int, default=256, help="batch size B")
    parser.add_argument("--dim", type=int, default=512, help="feature size D")
    parser.add_argument(
        "--repeats", type=int, default=repeats,
        help="interleaved timing rounds (samples per variant)",
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help=warmup_help,
    )
    parser.add_argument(
        "--inner", type=int, default=0,
        help="steps per timing sample; 0 (default) picks it from "
        "--min-sample-ms",
    )
    parser.add_argument(
        "--min-sample-ms", type=float, default=min_sample_ms,
        help="target duration of one timing sample when --inner is 0",
    )


OPTIMIZERS = {
    "adam": keras.optimizers.Adam,
    "lazyadam": keras_lsoftmax.optimizers.LazyAdam,
    "sgd": keras.optimizers.SGD,
    "momentum": lambda learning_rate: keras.optimizers.SGD(
        learning_rate, momentum=0.9
    ),
    "lazymomentum": lambda learning_rate: keras_lsoftmax.optimizers.LazySGD(
        learning_rate, momentum=0.9
    ),
}

OPTIMIZER_HELP = (
    "adam: Adam; lazyadam: keras_lsoftmax.optimizers.LazyAdam for the "
    "margin heads' models and Adam for the Dense ones, the same update "
    "where every row has a gradient; sgd: plain SGD (TensorFlow updates the "
    "kept rows only); momentum: SGD with momentum 0.9, as insightface's "
    "partial_fc_v2.py trains; lazymomentum: keras_lsoftmax.optimizers."
    "LazySGD with momentum 0.9 for the margin heads' models and momentum for "
    "the Dense ones"
)

# A lazy optimizer's update is its Keras counterpart's where every row has a
# gradient, as in a Dense head's step: the Dense baseline runs Keras's own.
_DENSE_COUNTERPARTS = {"lazyadam": "adam", "lazymomentum": "momentum"}


def make_optimizer(
    name: str, learning_rate: float, dense: bool = False
) -> keras.optimizers.Optimizer:
    """The `OPTIMIZERS` entry `name`; a Dense model gets the Keras
    counterpart of a lazy optimizer."""
    if dense:
        name = _DENSE_COUNTERPARTS.get(name, name)
    return OPTIMIZERS[name](learning_rate)


def optimizer_words(name: str) -> str:
    """The optimizer `name` as a run's description names it."""
    if name in _DENSE_COUNTERPARTS:
        return f"{name} (Dense: {_DENSE_COUNTERPARTS[name]})"
    return name


def add_run_arguments(
    parser: argparse.ArgumentParser, seed_help: str, smoke: dict[str, Any]
) -> None:
    """Adds --seed, --out and --smoke to `parser`: --smoke is a tiny run that
    checks the script works end to end, with the defaults `smoke` (see
    `parse_smoke`)."""
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument(
        "--out", help="write the results as JSON to this path (default: "
        "none, the table only)",
    )
    flags = ", ".join(
        f"--{name.replace('_', '-')} "
        + (" ".join(map(str, value)) if isinstance(value, list) else str(value))
        for name, value in smoke.items()
    )
    parser.add_argument(
        "--smoke", action="store_true",
        help=f"a tiny run (seconds) that checks the script works; "
        f"its times mean nothing. Sets the defaults {flags}; flags given "
        "on the command line still win (default: off)",
    )


def parse_smoke(
    parser: argparse.ArgumentParser, argv: list[str] | None,
    defaults: dict[str, Any],
) -> None:
    """Makes `defaults` the parser's defaults when `argv` has --smoke."""
    mode, _ = parser.parse_known_args(argv)
    if mode.smoke:
        parser.set_defaults(**defaults)


def check_backend(parser: argparse.ArgumentParser, backend: str) -> None:
    """Stops with a usage error unless Keras runs on `backend`.

    Keras fixes its backend at import, so a script run as a program selects
    it from `--backend` first; a caller that imported Keras already (a test
    calling `main`) must ask for the backend it has.
    """
    loaded = keras.backend.backend()
    if backend != loaded:
        parser.error(
            f"--backend {backend}: Keras was imported with the {loaded} "
            f"backend; run the script in a new process, or set "
            f"KERAS_BACKEND={backend} before Keras is imported"
        )


def device_scope(device: str | None) -> Any:
    """`keras.device(device)`, or no scope for None (Keras's placement).

    On TensorFlow `keras.device` is `tf.device`; on JAX and PyTorch it takes
    names such as "cpu:0" and "gpu:0".
    """
    return keras.device(device) if device else contextlib.nullcontext()


def duration(seconds: float) -> str:
    """`seconds` as "0.4 s", "38 s", "4.2 min" or "1.5 h"."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Prints a line to stderr as each of `total` measured configurations
    ends: what it was, how long it took, the time so far and the time left.

    The time left is that of the last configuration times the number still
    to run: with the problems in increasing size (as the scripts' defaults
    are), the last one is closer than the mean.

    Args:
        total: the number of configurations the run measures.
    """

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.start = self.last = time.perf_counter()

    def done_with(self, what: str) -> None:
        """Prints the line of the configuration `what`, just measured."""
        now = time.perf_counter()
        took, self.last = now - self.last, now
        self.done += 1
        left = took * (self.total - self.done)
        print(
            f"[{self.done}/{self.total}] {what}: {duration(took)} "
            f"(elapsed {duration(now - self.start)}, about {duration(left)} "
            "left)",
            file=sys.stderr,
            flush=True,
        )


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_batch_fitter(
    model: keras.Model, args: argparse.Namespace
) -> Callable[[int], float]:
    """`fit(n)`: one `model.fit` epoch over the first n batches of seeded
    random data (`args.input_dim` features, labels over `args.classes`,
    batches of `args.batch`, enough for `args.steps` and `args.warmup`),
    unshuffled; returns the last loss."""
    rng = np.random.default_rng(args.seed)
    rows = args.batch * max(args.steps, args.warmup)
    x = rng.normal(size=(rows, args.input_dim)).astype("float32")
    y = rng.integers(0, args.classes, rows).astype("int32")

    def fit(batches: int) -> float:
        history = model.fit(
            x[: batches * args.batch], y[: batches * args.batch],
            batch_size=args.batch, epochs=1, shuffle=False, verbose=0,
        )  # fmt: skip
        return float(history.history["loss"][-1])

    return fit


def proc_status_bytes(key: str) -> int:
    """The bytes of `key` ("VmRSS", "VmHWM", ...) in /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_rss_peak() -> None:
    """Sets this process's peak resident memory (VmHWM) to its current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to VmRSS (Linux >= 4.0)


def rss_probe_available() -> bool:
    """Whether `reset_rss_peak` and `proc_status_bytes` work here (Linux)."""
    try:
        reset_rss_peak()
        proc_status_bytes("VmHWM")
        proc_status_bytes("VmRSS")
    except (OSError, RuntimeError, ValueError):
        return False
    return True


def sample_stats(samples_ms: list[float]) -> dict[str, Any]:
    """Median, quartiles, IQR and minimum of timing samples (ms), with the
    samples; all None when there are none (a step that could not run)."""
    if not samples_ms:
        return {
            "median_ms": None, "q25_ms": None, "q75_ms": None,
            "iqr_ms": None, "min_ms": None, "samples_ms": [],
        }
    samples = np.asarray(samples_ms)
    q25, median, q75 = np.percentile(samples, [25, 50, 75])
    return {
        "median_ms": float(median),
        "q25_ms": float(q25),
        "q75_ms": float(q75),
        "iqr_ms": float(q75 - q25),
        "min_ms": float(samples.min()),
        "samples_ms": [float(t) for t in samples],
    }


def ratio(value: float | None, base: float | None) -> float | None:
    """`value / base`, or None when either is missing or `base` is not > 0."""
    if value is None or base is None or base <= 0:
        return None
    return value / base


def fmt(value: float | None, spec: str) -> str:
    """`value` formatted with `spec`, or "n/a" for None."""
    return "n/a" if value is None else format(value, spec)


def environment() -> dict[str, Any]:
    """The backend, versions and machine a result was measured with."""
    backend = keras.backend.backend()
    return {
        "backend": backend,
        # The backend's own package: tensorflow, jax or torch.
        backend: importlib.import_module(backend).__version__,
        "keras": keras.__version__,
        "keras_lsoftmax": keras_lsoftmax.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


def report(results: dict[str, Any], out: str | None) -> dict[str, Any]:
    """Writes `results` as JSON to `out` (if given), prints its table."""
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    print(results["markdown"])
    return results
