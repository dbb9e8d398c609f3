"""Times `fit` of a large class-sharded head on JAX host devices, sharded by
class with `keras.distribution.ModelParallel` and unsharded, with the peak
memory of each.

Usage (from the repository root):

    python benchmarks/bench_sharded.py --out bench_sharded.json
    python benchmarks/bench_sharded.py --classes 500000 --steps 3
    python benchmarks/bench_sharded.py --classes 1000000 --sample-rate 0.1
    python benchmarks/bench_sharded.py --smoke  # a tiny run; its times mean nothing

JAX only: the script sets `KERAS_BACKEND=jax` for its own processes. Each
configuration (`--configs`, default both) runs in a process of its own, with
`XLA_FLAGS=--xla_force_host_platform_device_count=--devices` and
`JAX_PLATFORMS=cpu`, so that no two share a peak:

- `sharded`: the recipe of `docs/sharding.md`, a `DeviceMesh((1, N),
  ["batch", "model"])` and `layout_map[".*head/kernel"] = ("model", None)`:
  each device holds C/N rows of the kernel and of the optimizer state, and the
  logits are computed C/N columns per device;
- `unsharded`: no distribution; everything on the first device;
- `sharded_dense`, `unsharded_dense` (not in the default run): the same with
  `keras.layers.Dense(--classes, use_bias=False)` as the head, whose (D, C)
  kernel is split by column, `layout_map[".*head/kernel"] = (None, "model")`.

The model, with the same seeded initial weights in both:

    keras_lsoftmax.Sequential([
        keras.Input((--input-dim,)),
        keras.layers.Dense(--dim, activation="relu", name="features"),
        keras_lsoftmax.LSoftmaxDense(--classes, margin=--margin,
                                     sample_rate=--sample-rate, name="head"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3),  # --optimizer
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

The features are trained (the backbone's gradient goes through the head).
After one untimed `fit` of `--warmup` batches (it builds the optimizer and
compiles the step), each of `--repeats` samples is one `model.fit(...,
batch_size=--batch, epochs=1, shuffle=False, verbose=0)` over `--steps`
batches of random data, divided by `--steps`; it includes what `fit` costs
per call, spread over the steps.

Memory: the peak resident memory of the configuration's process
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`), before the model is built
(after the imports) and at the end. Host devices share the host's memory,
so the sharded peak is that of all N devices together: the difference of
the two peaks is what sharding adds or saves in all, not per device.

Run time on a shared 2-core x86-64 CPU (4 emulated host devices): the
default run 5.2 minutes, about 9.5 GiB of memory per configuration (figures
in docs/sharding.md); `--smoke` about 15 s. A line on stderr reports each
configuration as it ends.

Output: a Markdown table on stdout and, with `--out`, a JSON file with the
configuration, one row per configuration (samples, peaks, the kernel's
shard shapes and the final loss) and the table. Nothing here asserts a time.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any


try:
    import benchmarks  # noqa: F401
except ImportError:  # run as `python benchmarks/bench_sharded.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    os.environ["KERAS_BACKEND"] = "jax"  # before the imports below load Keras

import keras  # noqa: E402

import keras_lsoftmax  # noqa: E402
from benchmarks.common import OPTIMIZERS  # noqa: E402
from benchmarks.common import OPTIMIZER_HELP  # noqa: E402
from benchmarks.common import HelpFormatter  # noqa: E402
from benchmarks.common import Progress  # noqa: E402
from benchmarks.common import add_run_arguments  # noqa: E402
from benchmarks.common import environment  # noqa: E402
from benchmarks.common import fmt  # noqa: E402
from benchmarks.common import make_optimizer  # noqa: E402
from benchmarks.common import optimizer_words  # noqa: E402
from benchmarks.common import parse_smoke  # noqa: E402
from benchmarks.common import peak_rss_mb  # noqa: E402
from benchmarks.common import random_batch_fitter  # noqa: E402
from benchmarks.common import ratio  # noqa: E402
from benchmarks.common import report  # noqa: E402
from benchmarks.common import sample_stats  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("sharded", "unsharded", "sharded_dense", "unsharded_dense")
DEFAULT_CONFIGS = ("sharded", "unsharded")
SMOKE = {
    "classes": 4000, "dim": 32, "batch": 32, "input_dim": 16, "steps": 2,
    "repeats": 2, "warmup": 1,
}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--classes", type=int, default=2_000_000, help="number of classes C"
    )
    parser.add_argument("--dim", type=int, default=128, help="feature size D")
    parser.add_argument("--batch", type=int, default=256, help="batch size B")
    parser.add_argument(
        "--input-dim", type=int, default=64,
        help="size of the input of the Dense backbone",
    )  # fmt: skip
    parser.add_argument("--margin", type=int, default=4, help="margin m")
    parser.add_argument(
        "--sample-rate", type=float, default=1.0,
        help="Partial-FC sample rate r of the head (1: every class)",
    )  # fmt: skip
    parser.add_argument(
        "--optimizer", choices=sorted(OPTIMIZERS), default="adam",
        help=OPTIMIZER_HELP,
    )  # fmt: skip
    parser.add_argument(
        "--devices", type=int, default=4,
        help="number of emulated host devices N (XLA_FLAGS)",
    )  # fmt: skip
    parser.add_argument(
        "--configs", nargs="+", choices=CONFIGS, default=list(DEFAULT_CONFIGS),
        help="configurations to run, each in a process of its own",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=int, default=3, help="fit batches per timing sample"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="timing samples per configuration"
    )
    parser.add_argument(
        "--warmup", type=int, default=1,
        help="batches of the untimed first fit (it compiles the step)",
    )  # fmt: skip
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    add_run_arguments(parser, "seed of the weights and the data", SMOKE)
    parse_smoke(parser, argv, SMOKE)
    return parser.parse_args(argv)


def distribution(
    devices: int, dense: bool = False
) -> keras.distribution.ModelParallel:
    """The recipe of docs/sharding.md: the head's kernel split by class
    (the columns of a Dense kernel, which is (D, C))."""
    mesh = keras.distribution.DeviceMesh(
        (1, devices), ["batch", "model"], keras.distribution.list_devices()
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*head/kernel"] = (None, "model") if dense else ("model", None)
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )



def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration, in this process; returns its row."""
    devices = keras.distribution.list_devices()
    if len(devices) != args.devices:
        raise RuntimeError(
            f"Expected {args.devices} JAX devices, found {devices}: "
            "XLA_FLAGS must be set before JAX is imported"
        )
    dense = args.worker.endswith("_dense")
    if args.worker.startswith("sharded"):
        keras.distribution.set_distribution(distribution(args.devices, dense))
    keras.utils.set_random_seed(args.seed)  # imports TensorFlow, if there
    peak_before_model = peak_rss_mb()
    if dense:
        head = keras.layers.Dense(args.classes, use_bias=False, name="head")
    else:
        head = keras_lsoftmax.LSoftmaxDense(
            args.classes,
            margin=args.margin,
            sample_rate=args.sample_rate,
            name="head",
        )
    # keras_lsoftmax.Sequential trains a Dense head as keras.Sequential does.
    model = keras_lsoftmax.Sequential(
        [
            keras.Input((args.input_dim,)),
            keras.layers.Dense(args.dim, activation="relu", name="features"),
            head,
        ]
    )
    model.compile(
        optimizer=make_optimizer(args.optimizer, 1e-3, dense=dense),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    fit = random_batch_fitter(model, args)

    t0 = time.perf_counter()
    fit(args.warmup)
    first_s = time.perf_counter() - t0
    samples = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        loss = fit(args.steps)
        samples.append(1e3 * (time.perf_counter() - t0) / args.steps)
    kernel = model.get_layer("head").kernel
    return {
        "config": args.worker,
        "classes": args.classes,
        "sample_rate": None if dense else args.sample_rate,
        "devices": len(devices),
        "kernel_shards": [
            list(s.data.shape) for s in kernel.value.addressable_shards
        ],
        **sample_stats(samples),
        "first_fit_s": first_s,
        "final_loss": loss,
        "peak_before_model_mb": peak_before_model,
        "peak_mb": peak_rss_mb(),
    }


def run_config(args: argparse.Namespace, argv: list[str], config: str) -> dict:
    """Runs `config` in a new process with N host devices; returns its row."""
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": os.pathsep.join(
            p for p in [ROOT, os.environ.get("PYTHONPATH")] if p
        ),
    }
    # The worker takes the same arguments; it writes no --out.
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv, "--worker", config],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| C | r | config | devices | kernel shard | median ms/step | IQR ms "
        "| ratio to unsharded | peak MB | peak before the model MB |",
        "|---:|---:|:---|---:|:---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        shard = "×".join(map(str, r["kernel_shards"][0]))
        lines.append(
            f"| {r['classes']} | {fmt(r['sample_rate'], 'g')} | {r['config']} "
            f"| {r['devices']} "
            f"| {len(r['kernel_shards'])} × ({shard}) "
            f"| {r['median_ms']:.0f} | {r['iqr_ms']:.0f} "
            f"| {fmt(r['ratio_to_unsharded'], '.2f')} "
            f"| {r['peak_mb']:.0f} | {r['peak_before_model_mb']:.0f} |"
        )
    return "\n".join(lines)


def describe(args: argparse.Namespace) -> str:
    """The run's problem and settings, in a sentence."""
    return (
        f"C = {args.classes}; B = {args.batch}; D = {args.dim}; a trained "
        f"Dense({args.input_dim} → {args.dim}) backbone; L-Softmax m = "
        f"{args.margin}, r = {args.sample_rate:g}; optimizer: "
        f"{optimizer_words(args.optimizer)} (learning rate 1e-3); "
        f"{args.devices} host devices; {args.repeats} fits of {args.steps} "
        f"batches after one of {args.warmup}; peak memory: ru_maxrss of "
        "each configuration's process"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns the results (also written to --out)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return {}
    progress = Progress(len(args.configs))
    rows = []
    for config in args.configs:
        rows.append(run_config(args, argv, config))
        progress.done_with(f"{config} C={args.classes}")
    base = {r["config"]: r["median_ms"] for r in rows}.get("unsharded")
    for r in rows:
        r["ratio_to_unsharded"] = ratio(r["median_ms"], base)
    config = {
        "classes": args.classes, "dim": args.dim, "batch": args.batch,
        "input_dim": args.input_dim, "margin": args.margin,
        "sample_rate": args.sample_rate,
        "devices": args.devices, "configs": args.configs,
        "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
        "seed": args.seed, "smoke": args.smoke,
        "description": describe(args), **environment(),
    }  # fmt: skip
    table = markdown_table(rows)
    return report({"config": config, "rows": rows, "markdown": table}, args.out)


if __name__ == "__main__":
    main()
