"""What `bench_head.py` and `bench_fit.py` share: the problem and timing
arguments, and the formatting of their tables."""

import argparse
import json
import os
import platform
from typing import Any

import keras
import tensorflow as tf

import keras_lsoftmax


def add_timing_arguments(
    parser: argparse.ArgumentParser,
    classes: tuple[int, ...],
    repeats: int,
    min_sample_ms: float,
    warmup_help: str,
) -> None:
    """Adds --classes, --batch, --dim, --repeats, --warmup, --inner and
    --min-sample-ms to `parser`, with these defaults."""
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


def fmt(value: float | None, spec: str) -> str:
    """`value` formatted with `spec`, or "n/a" for None."""
    return "n/a" if value is None else format(value, spec)


def environment() -> dict[str, Any]:
    """The versions and machine a result was measured with."""
    return {
        "tensorflow": tf.__version__,
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
