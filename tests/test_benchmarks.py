"""The benchmarks run on tiny inputs, and the autodiff reference is right.

The scripts run in-process on the backend of the suite, and as programs in
a subprocess with `--backend jax` / `--backend torch` (Keras fixes its
backend at import) from the TensorFlow suite, where that backend's package
is installed. No test here asserts a time.

TensorFlow (and the autodiff reference, written in it) is imported only
inside TensorFlow tests: a JAX or PyTorch suite never loads it.
"""

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from benchmarks import backend_steps
from benchmarks import bench_fit
from benchmarks import bench_head
from benchmarks import bench_mnist
from benchmarks import bench_partial_fc
from benchmarks import bench_sharded
from benchmarks import common
from benchmarks import report
from benchmarks.backend_choice import select_backend
from benchmarks.common import duration
from benchmarks.common import sample_stats
from keras_lsoftmax import ops
from keras_lsoftmax.optimizers import LazyAdam
from keras_lsoftmax.optimizers import LazySGD

_ROW_KEYS = {
    "classes",
    "jit",
    "variant",
    "median_ms",
    "iqr_ms",
    "samples_ms",
    "ratio_to_dense",
    "peak_bytes",
    "peak_mib",
    "peak_ratio_to_dense",
    "final_loss",
}


def _table_rows(text):
    return [
        line
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| C ")
    ]


@pytest.mark.tensorflow  # the autodiff variant
def test_bench_head_tiny_grid(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = bench_head.main(
        [
            "--classes",
            "10",
            "50",
            "--batch",
            "8",
            "--dim",
            "16",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--inner",
            "2",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out

    data = json.loads(out.read_text())
    assert data["rows"] == json.loads(json.dumps(results["rows"]))
    assert data["config"]["batch"] == 8 and data["config"]["dim"] == 16
    rows = data["rows"]
    keys = {(r["classes"], r["jit"], r["variant"]) for r in rows}
    assert keys == {
        (c, jit, v)
        for c in (10, 50)
        for jit in (True, False)
        for v in ("dense", "lsoftmax", "autodiff")
    }
    assert len(rows) == 12
    for r in rows:
        assert _ROW_KEYS <= set(r)
        assert len(r["samples_ms"]) == 2
        assert r["median_ms"] > 0 and r["ratio_to_dense"] > 0
        assert math.isfinite(r["final_loss"])
        # The memory probe ran (in a child process on CPU).
        assert r["peak_bytes"] is not None and r["peak_bytes"] >= 0
        if r["variant"] == "dense":
            assert r["ratio_to_dense"] == 1.0

    assert "| C | jit | variant | median ms | IQR ms | ratio to Dense" in printed
    assert len(_table_rows(printed)) == 12
    assert printed.strip().endswith(data["markdown"].splitlines()[-1])


@pytest.mark.tensorflow  # the autodiff variant
def test_bench_head_flags(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_head.main(
        [
            "--classes",
            "7",
            "--batch",
            "4",
            "--dim",
            "8",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--inner",
            "1",
            "--no-jit",
            "--memory",
            "none",
            "--variants",
            "dense",
            "autodiff",
            "--margin",
            "2",
            "--lam",
            "1.5",
            "--out",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["jit"], r["variant"]) for r in rows] == [
        (False, "dense"),
        (False, "autodiff"),
    ]
    assert all(r["peak_mib"] is None for r in rows)
    assert len(_table_rows(capsys.readouterr().out)) == 2


def test_bench_head_family_variants(tmp_path, capsys):
    out = tmp_path / "bench.json"
    family = ["sphereface", "cosface", "arcface", "arcface_sc3"]
    bench_head.main(
        [
            "--classes", "6", "--batch", "8", "--dim", "16",
            "--repeats", "2", "--warmup", "2", "--inner", "1",
            "--no-jit", "--memory", "none",
            "--variants", "dense", *family,
            "--out", str(out),
        ]
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense", *family]
    for r in rows:
        assert r["median_ms"] > 0 and math.isfinite(r["final_loss"])
        assert math.isfinite(r["ratio_to_dense"]) and r["ratio_to_dense"] > 0
    assert len(_table_rows(capsys.readouterr().out)) == 5


def test_family_kernels_start_from_the_dense_weights():
    kernel0 = np.random.default_rng(0).standard_normal((4, 3))  # (D, C)
    for name in ("sphereface", "cosface", "arcface"):
        np.testing.assert_array_equal(
            backend_steps._kernel_of(name, kernel0), kernel0.T
        )
    np.testing.assert_array_equal(
        backend_steps._kernel_of("dense", kernel0), kernel0
    )
    sub_centres = backend_steps._kernel_of("arcface_sc3", kernel0)
    assert sub_centres.shape == (9, 4)
    # Rows 3y to 3y + 2 are class y's weights, perturbed by 10 % of the
    # mean absolute weight at most a few times over.
    offsets = sub_centres - np.repeat(kernel0.T, 3, axis=0)
    assert 0 < np.max(np.abs(offsets)) < 0.5 * np.abs(kernel0).mean()
    assert not np.allclose(sub_centres[0], sub_centres[1])


def test_bench_head_frozen_features(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_head.main(
        [
            "--classes", "40", "--batch", "8", "--dim", "16",
            "--repeats", "2", "--warmup", "1", "--inner", "2",
            "--no-jit", "--memory", "none",
            "--variants", "dense", "lsoftmax",
            "--features", "trained", "frozen",
            "--out", str(out),
        ]
    )
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["features"], r["variant"]) for r in rows) == [
        ("frozen", "dense"),
        ("frozen", "lsoftmax"),
        ("trained", "dense"),
        ("trained", "lsoftmax"),
    ]
    for r in rows:
        assert r["median_ms"] > 0 and math.isfinite(r["final_loss"])
        if r["variant"] == "dense":
            assert r["ratio_to_dense"] == 1.0
    printed = capsys.readouterr().out
    assert "Features frozen" in printed and "Features trained" in printed
    assert len(_table_rows(printed)) == 4


def test_bench_fit_tiny_run(tmp_path, capsys):
    out = tmp_path / "fit.json"
    results = bench_fit.main(
        [
            "--classes", "30", "--batch", "8", "--dim", "16",
            "--repeats", "2", "--warmup", "1", "--inner", "2",
            "--fit-batches", "3", "--out", str(out),
        ]
    )
    data = json.loads(out.read_text())
    assert data["rows"] == json.loads(json.dumps(results["rows"]))
    keys = sorted((r["api"], r["variant"]) for r in data["rows"])
    assert keys == [
        ("fit", "dense"),
        ("fit", "lsoftmax"),
        ("train_on_batch", "dense"),
        ("train_on_batch", "lsoftmax"),
    ]
    for r in data["rows"]:
        assert r["median_ms"] > 0 and r["ratio_to_dense"] > 0
    assert "| C | API | jit | variant" in capsys.readouterr().out


def test_bench_fit_scheduler_overhead(tmp_path, capsys):
    out = tmp_path / "sched.json"
    bench_fit.main(
        [
            "--scheduler-overhead", "--classes", "5", "--batch", "8",
            "--dim", "8", "--fit-batches", "3", "--epochs", "2",
            "--repeats", "2", "--warmup", "1", "--out", str(out),
        ]
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert data["config"]["mode"] == "scheduler_overhead"
    _check_scheduler_rows(data["rows"], keras.backend.backend())
    assert "| C | jit | λ callback |" in capsys.readouterr().out


def test_select_backend_reads_the_flag(monkeypatch):
    before = dict(os.environ)
    with monkeypatch.context() as patch:
        # A copy without KERAS_BACKEND: select_backend writes os.environ
        # itself, which monkeypatch's own delenv would not undo.
        patch.setattr(os, "environ", os.environ.copy())
        patch.delitem(os.environ, "KERAS_BACKEND", raising=False)
        select_backend(["--classes", "3"])
        assert "KERAS_BACKEND" not in os.environ
        select_backend(["--classes", "3", "--backend", "torch", "--out", "x"])
        assert os.environ["KERAS_BACKEND"] == "torch"
    assert dict(os.environ) == before


def test_backend_other_than_loaded_is_an_error(capsys):
    other = next(b for b in ("jax", "torch") if b != keras.backend.backend())
    with pytest.raises(SystemExit) as exit_info:
        bench_head.main(["--backend", other])
    assert exit_info.value.code == 2
    assert "run the script in a new process" in capsys.readouterr().err


class _NoCompilerVariant:
    """A variant whose compiled step cannot be built, as when
    `torch.compile` fails."""

    available = backend_steps.Variant.available

    def __init__(self):
        self.unavailable = {}
        self.steps = {True: self._compiled, False: lambda: 2.0}

    def _compiled(self):
        raise backend_steps.StepUnavailable("torch.compile failed: no cc")

    def sync(self, loss):
        return float(loss)


def test_unavailable_step_is_reported_not_timed():
    args = bench_head.parse_args(
        ["--warmup", "2", "--inner", "1", "--repeats", "2", "--memory", "none"]
    )
    variants = {("trained", "lsoftmax"): _NoCompilerVariant()}
    compile_s = bench_head.warm_up(variants, [True, False], args)
    assert list(compile_s) == [("trained", "lsoftmax", False)]
    times, losses = bench_head.time_interleaved(
        variants, [True, False], 1, args
    )
    assert times[("trained", "lsoftmax", True)] == []
    assert len(times[("trained", "lsoftmax", False)]) == 2
    assert losses == {("trained", "lsoftmax", False): 2.0}
    assert variants[("trained", "lsoftmax")].unavailable == {
        True: "torch.compile failed: no cc"
    }
    row = {
        "classes": 5, "jit": True, "features": "trained",
        "variant": "lsoftmax", **sample_stats([]), "ratio_to_dense": None,
        "peak_mib": None, "peak_ratio_to_dense": None,
        "unavailable": "torch.compile failed: no cc",
    }  # fmt: skip
    assert "| 5 | yes | lsoftmax | n/a | n/a | n/a |" in (
        bench_head.markdown_table([row])
    )
    assert bench_head.unavailable_notes([row]) == (
        "- C=5, jit yes, trained, lsoftmax: unavailable: torch.compile "
        "failed: no cc"
    )


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny problems: the subprocess tests check that the scripts run and
# report, not how fast.
_HEAD_TINY = [
    "--classes", "12", "--batch", "8", "--dim", "16", "--repeats", "2",
    "--warmup", "2", "--inner", "2",
]  # fmt: skip
_SCHEDULER_TINY = [
    "--scheduler-overhead", "--classes", "5", "--batch", "8", "--dim", "8",
    "--fit-batches", "3", "--epochs", "2", "--repeats", "2", "--warmup", "1",
]  # fmt: skip


def _installed(*backends):
    """`backends` as pytest parameters, each skipped (with the reason) when
    its package is not installed."""
    return [
        pytest.param(
            backend,
            marks=pytest.mark.skipif(
                importlib.util.find_spec(backend) is None,
                reason=f"{backend} is not installed",
            ),
        )
        for backend in backends
    ]


def _run_script(tmp_path, script, backend, args, environment_backend=None):
    """Runs benchmarks/`script` as a program with `--backend backend` and
    KERAS_BACKEND=`environment_backend` (default: `backend`); returns its
    JSON results."""
    out = tmp_path / f"{script}.{backend}.json"
    env = {
        **os.environ,
        "KERAS_BACKEND": environment_backend or backend,
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    command = [
        sys.executable, os.path.join(_REPO, "benchmarks", script),
        "--backend", backend, *args, "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(
        command, cwd=_REPO, env=env, capture_output=True, text=True,
        timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["config"]["backend"] == backend
    return data


def _check_head_rows(rows, backend, jit_modes, features):
    assert {(r["features"], r["jit"], r["variant"]) for r in rows} == {
        (f, jit, v)
        for f in features
        for jit in jit_modes
        for v in ("dense", "lsoftmax")
    }
    for r in rows:
        assert r["backend"] == backend
        if r["unavailable"]:  # a compiler this machine lacks, with reason
            assert r["median_ms"] is None and r["samples_ms"] == []
            continue
        assert len(r["samples_ms"]) == 2 and r["median_ms"] > 0
        assert math.isfinite(r["ratio_to_dense"]) and r["ratio_to_dense"] > 0
        assert math.isfinite(r["final_loss"])


def _check_scheduler_rows(rows, backend):
    assert sorted(r["variant"] for r in rows) == [
        "callable", "none", "schedule"
    ]  # fmt: skip
    by_variant = {r["variant"]: r for r in rows}
    for r in rows:
        assert r["backend"] == backend and r["mode"] == "scheduler_overhead"
        assert len(r["samples_ms"]) == 2 and r["median_ms"] > 0
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0
        assert r["steps_per_sample"] == 6
    assert by_variant["none"]["ratio"] == 1.0
    assert by_variant["none"]["final_lambda"] == 0.0
    # Both callbacks drove λ to its value at the last of the 18 steps
    # (3 fits of 3 batches × 2 epochs): in the step and from the host.
    expected = bench_fit.host_inverse_decay(18)
    for name in ("schedule", "callable"):
        assert by_variant[name]["final_lambda"] == pytest.approx(
            expected, rel=1e-5
        )


# Once, from the default (TensorFlow) run: each runs the script in a
# subprocess with `--backend`; the JAX and PyTorch suites time their own
# backend in process with the tests above.
@pytest.mark.tensorflow
@pytest.mark.parametrize("backend", _installed("jax", "torch"))
def test_bench_head_runs_on_backend(tmp_path, backend):
    # torch.compile takes minutes on a small CPU: eager only here, the
    # compiled step in the slow test below.
    jit_args = ["--no-jit"] if backend == "torch" else []
    data = _run_script(
        tmp_path, "bench_head.py", backend,
        [*_HEAD_TINY, *jit_args, "--features", "trained", "frozen",
         "--memory", "none"],
        # The flag wins over the environment: it is read before Keras.
        environment_backend="tensorflow",
    )  # fmt: skip
    modes = [False] if backend == "torch" else [True, False]
    _check_head_rows(data["rows"], backend, modes, ["trained", "frozen"])
    assert all(r["unavailable"] is None for r in data["rows"])
    assert data["config"]["variants"] == ["dense", "lsoftmax"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", _installed("jax", "torch"))
def test_bench_head_compiled_with_memory_probe(tmp_path, backend):
    data = _run_script(
        tmp_path, "bench_head.py", backend,
        [*_HEAD_TINY, "--memory", "rss", "--memory-probes", "1"],
    )  # fmt: skip
    _check_head_rows(data["rows"], backend, [True, False], ["trained"])
    assert data["config"]["memory_method"] == "rss"
    for r in data["rows"]:
        if not r["unavailable"]:
            assert r["peak_bytes"] is not None and r["peak_bytes"] >= 0


# Once, from the default (TensorFlow) run: each runs the script in a
# subprocess with `--backend`; the JAX and PyTorch suites time their own
# backend in process with the tests above.
@pytest.mark.tensorflow
@pytest.mark.parametrize("backend", _installed("jax", "torch"))
def test_bench_fit_runs_on_backend(tmp_path, backend):
    data = _run_script(tmp_path, "bench_fit.py", backend, ["--smoke"])
    assert sorted(
        (r["classes"], r["api"], r["variant"]) for r in data["rows"]
    ) == [
        (c, api, v)
        for c in (10, 100)
        for api in ("fit", "train_on_batch")
        for v in ("dense", "lsoftmax")
    ]
    for r in data["rows"]:
        assert r["backend"] == backend and r["median_ms"] > 0
        assert math.isfinite(r["ratio_to_dense"]) and r["ratio_to_dense"] > 0


# Once, from the default (TensorFlow) run: each runs the script in a
# subprocess with `--backend`; the JAX and PyTorch suites time their own
# backend in process with the tests above.
@pytest.mark.tensorflow
@pytest.mark.parametrize("backend", _installed("jax", "torch"))
def test_bench_fit_scheduler_overhead_on_backend(tmp_path, backend):
    data = _run_script(tmp_path, "bench_fit.py", backend, _SCHEDULER_TINY)
    _check_scheduler_rows(data["rows"], backend)


_TIMING_FLAGS = [
    "--backend", "--classes", "--batch", "--dim", "--repeats", "--warmup",
    "--inner", "--min-sample-ms",
]
_RUN_FLAGS = ["--seed", "--out", "--smoke"]


@pytest.mark.parametrize(
    "script, flags",
    [
        (bench_head, [*_TIMING_FLAGS, "--device", "--no-jit", "--jit-only",
                      "--margin", "--lam", "--variants", "--features",
                      "--memory", "--memory-probes", *_RUN_FLAGS]),
        (bench_fit, [*_TIMING_FLAGS, "--fit-batches", "--api",
                     "--jit-compile", "--device", "--margin", "--lam",
                     "--variants", "--scheduler-overhead", "--schedulers",
                     "--epochs", *_RUN_FLAGS]),
        (bench_mnist, ["--data", "--limit", "--epochs", "--batch-size",
                       *_RUN_FLAGS]),
        (bench_sharded, ["--classes", "--dim", "--batch", "--input-dim",
                         "--margin", "--sample-rate", "--optimizer",
                         "--devices",
                         "--configs", "--steps",
                         "--repeats", "--warmup", *_RUN_FLAGS]),
        (bench_partial_fc, ["--backend", "--classes", "--dim", "--batch",
                            "--input-dim", "--heads", "--sample-rates",
                            "--margin", "--lambda-minimum", "--steps",
                            "--repeats", "--warmup", "--accuracy", "--train-per-class",
                            "--test-per-class", "--noise", "--epochs",
                            "--optimizer", "--learning-rate", "--jit-compile",
                            *_RUN_FLAGS]),
    ],
)
def test_help_states_every_default(capsys, script, flags):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert re.findall(r"^  (--[\w-]+)", help_text, re.MULTILINE) == flags
    for flag in flags:
        # The flag's line and the more deeply indented ones below it.
        entry = re.search(
            rf"^  {flag}\b.*(?:\n {{3,}}\S.*)*", help_text, re.MULTILINE
        )
        assert "default" in entry.group(), entry.group()


def test_duration():
    assert [duration(s) for s in (0.44, 38.4, 249.0, 5400.0, 9000.0)] == [
        "0.4 s", "38 s", "4.2 min", "90.0 min", "2.5 h"
    ]


def _progress_lines(err):
    return [line for line in err.splitlines() if line.startswith("[")]


def test_lazy_optimizers_and_their_dense_counterparts():
    lazy = common.make_optimizer("lazymomentum", 0.1)
    assert isinstance(lazy, LazySGD)
    assert lazy.momentum == 0.9
    dense = common.make_optimizer("lazymomentum", 0.1, dense=True)
    # isinstance: on PyTorch Keras's SGD and Adam are backend subclasses.
    assert isinstance(dense, keras.optimizers.SGD) and dense.momentum == 0.9
    adam = common.make_optimizer("lazyadam", 0.1, dense=True)
    assert isinstance(adam, keras.optimizers.Adam)
    assert not isinstance(adam, LazyAdam)
    assert common.optimizer_words("lazymomentum") == (
        "lazymomentum (Dense: momentum)"
    )
    assert common.optimizer_words("sgd") == "sgd"


@pytest.mark.jax
def test_bench_head_xla_memory_of_the_compiled_step(tmp_path, capsys):
    def run(name):
        out = tmp_path / name
        bench_head.main(
            [*_HEAD_TINY, "--variants", "dense", "cosface", "--memory", "xla",
             "--out", str(out)]
        )  # fmt: skip
        return json.loads(out.read_text())

    first, second = run("first.json"), run("second.json")
    assert first["config"]["memory_method"] == "xla"
    peaks = {(r["variant"], r["jit"]): r["peak_bytes"] for r in first["rows"]}
    # The compiled step's buffers hold at least the (B, C) logits; the steps
    # that are not compiled have no buffer assignment to read.
    for name in ("dense", "cosface"):
        assert peaks[(name, True)] >= 8 * 12 * 4
        assert peaks[(name, False)] is None
    # Read from the compiled program, not sampled: the same in every run.
    assert peaks == {
        (r["variant"], r["jit"]): r["peak_bytes"] for r in second["rows"]
    }


@pytest.mark.tensorflow
def test_bench_head_xla_memory_is_jax_only(capsys):
    with pytest.raises(SystemExit, match="not available on the tensorflow"):
        bench_head.main([*_HEAD_TINY, "--memory", "xla"])


def test_bench_head_smoke(tmp_path, capsys):
    out = tmp_path / "smoke.json"
    # torch.compile takes minutes on a small CPU: eager there.
    eager = ["--no-jit"] if keras.backend.backend() == "torch" else []
    results = bench_head.main(["--smoke", *eager, "--out", str(out)])
    captured = capsys.readouterr()
    data = json.loads(out.read_text())
    config = data["config"]
    assert (config["classes"], config["batch"], config["dim"]) == (
        [10, 100], 16, 32
    )
    assert config["memory_method"] == "none" and config["repeats"] == 2
    modes = [False] if eager else [True, False]
    rows = data["rows"]
    assert len(rows) == 2 * len(modes) * len(config["variants"])
    assert {r["classes"] for r in rows} == {10, 100}
    for r in rows:
        assert r["unavailable"] is None and r["inner"] == 2
        assert len(r["samples_ms"]) == 2 and r["median_ms"] > 0
        assert math.isfinite(r["final_loss"]) and r["ratio_to_dense"] > 0
    assert results["markdown"] == data["markdown"]
    assert len(_table_rows(captured.out)) == len(rows)
    progress = _progress_lines(captured.err)
    assert [line.split(" ")[:3] for line in progress] == [
        ["[1/2]", "timed", "C=10"], ["[2/2]", "timed", "C=100"]
    ]
    assert all(re.search(r"\(elapsed [\d.]+ s, about [\d.]+ s left\)$", line)
               for line in progress)
    assert progress[-1].endswith("about 0.0 s left)")


@pytest.mark.parametrize("mode", [[], ["--scheduler-overhead"]])
def test_bench_fit_smoke(tmp_path, capsys, mode):
    out = tmp_path / "smoke.json"
    bench_fit.main(["--smoke", *mode, "--out", str(out)])
    captured = capsys.readouterr()
    data = json.loads(out.read_text())
    config = data["config"]
    assert (config["classes"], config["batch"], config["dim"]) == (
        [10, 100], 16, 32
    )
    assert (config["repeats"], config["fit_batches"]) == (2, 3)
    rows = data["rows"]
    per_c = 3 if mode else 4  # λ callbacks, or APIs × variants
    assert len(rows) == 2 * per_c
    for r in rows:
        assert len(r["samples_ms"]) == 2 and r["median_ms"] > 0
        assert math.isfinite(r["final_loss"])
    if mode:
        # One epoch of 3 batches per fit: the warm-up fit and the two timed
        # ones drove λ to its value at step 9.
        for r in rows:
            assert r["steps_per_sample"] == 3
            if r["variant"] != "none":
                assert r["final_lambda"] == pytest.approx(
                    bench_fit.host_inverse_decay(9), rel=1e-5
                )
    assert len(_table_rows(captured.out)) == len(rows)
    progress = _progress_lines(captured.err)
    assert [line.split(" ")[:3] for line in progress] == [
        ["[1/2]", "timed", "C=10"], ["[2/2]", "timed", "C=100"]
    ]


# JAX only; each configuration runs in a process with 4 host devices.
@pytest.mark.jax
def test_bench_sharded_smoke(tmp_path, capsys):
    out = tmp_path / "smoke.json"
    bench_sharded.main(["--smoke", "--out", str(out)])
    captured = capsys.readouterr()
    data = json.loads(out.read_text())
    config = data["config"]
    assert (config["classes"], config["dim"], config["devices"]) == (4000, 32, 4)
    rows = {r["config"]: r for r in data["rows"]}
    assert list(rows) == ["sharded", "unsharded"]
    assert rows["sharded"]["kernel_shards"] == [[1000, 32]] * 4
    assert rows["unsharded"]["kernel_shards"] == [[4000, 32]]
    for r in rows.values():
        assert r["devices"] == 4 and len(r["samples_ms"]) == 2
        assert r["median_ms"] > 0 and math.isfinite(r["final_loss"])
        assert r["peak_mb"] >= r["peak_before_model_mb"] > 0
    # The same seeded weights and batches: the same training.
    assert rows["sharded"]["final_loss"] == pytest.approx(
        rows["unsharded"]["final_loss"], abs=1e-5
    )
    assert rows["unsharded"]["ratio_to_unsharded"] == 1.0
    assert len(_table_rows(captured.out)) == 2
    assert [line.split(" ")[:3] for line in _progress_lines(captured.err)] == [
        ["[1/2]", "sharded", "C=4000:"], ["[2/2]", "unsharded", "C=4000:"]
    ]


@pytest.mark.jax
def test_bench_sharded_smoke_with_sampling(tmp_path):
    out = tmp_path / "smoke.json"
    bench_sharded.main(
        ["--smoke", "--sample-rate", "0.1", "--configs", "sharded",
         "sharded_dense", "--out", str(out)]
    )  # fmt: skip
    data = json.loads(out.read_text())
    row, dense = data["rows"]
    assert data["config"]["sample_rate"] == row["sample_rate"] == 0.1
    assert row["kernel_shards"] == [[1000, 32]] * 4
    # A Dense kernel is (D, C): split by column.
    assert (dense["config"], dense["sample_rate"]) == ("sharded_dense", None)
    assert dense["kernel_shards"] == [[32, 1000]] * 4
    for r in (row, dense):
        assert r["median_ms"] > 0 and math.isfinite(r["final_loss"])
        assert r["ratio_to_unsharded"] is None


# Each configuration runs in a process of its own, on the suite's backend.
def test_bench_partial_fc_smoke(tmp_path, capsys):
    out = tmp_path / "smoke.json"
    results = bench_partial_fc.main(["--smoke", "--out", str(out)])
    captured = capsys.readouterr()
    data = json.loads(out.read_text())
    assert data["rows"] == json.loads(json.dumps(results["rows"]))
    config = data["config"]
    assert config["mode"] == "time" and config["backend"] == keras.backend.backend()
    assert (config["classes"], config["batch"], config["steps"]) == (200, 32, 2)
    rows = {r["config"]: r for r in data["rows"]}
    assert list(rows) == ["dense", "lsoftmax@0.1"]
    # S = min(C, max(int(r·C), B)): the batch, not r·C = 20.
    assert rows["dense"]["kept_classes"] == 200
    assert rows["lsoftmax@0.1"]["kept_classes"] == 32
    for r in rows.values():
        assert len(r["samples_ms"]) == 2 and r["median_ms"] > 0
        assert r["first_fit_s"] > 0 and math.isfinite(r["final_loss"])
        assert r["peak_mb"] >= r["peak_after_build_mb"]
        assert r["peak_after_build_mb"] >= r["peak_before_model_mb"] > 0
        assert r["peak_above_baseline_mb"] == pytest.approx(
            r["peak_mb"] - r["peak_before_model_mb"]
        )
        assert isinstance(r["fits_peak_above_baseline_mb"], float)  # Linux
        assert r["ratio_to_dense"] > 0
        assert len(r["round_ratios_to_dense"]) == 2
        assert r["median_round_ratio_to_dense"] > 0
    dense = rows["dense"]
    assert dense["ratio_to_dense"] == dense["median_round_ratio_to_dense"] == 1.0
    # A tiny model may not raise the peak of the imports: no ratio then.
    assert dense["peak_ratio_to_dense"] == (
        1.0 if dense["peak_above_baseline_mb"] > 0 else None
    )
    assert len(_table_rows(captured.out)) == 2
    assert [line.split(":")[0] for line in _progress_lines(captured.err)] == [
        "[1/1] built and warmed up 2 processes",
        "[1/2] round 1, C=200", "[2/2] round 2, C=200",
    ]


@pytest.mark.parametrize("flags, expected", [([], "auto"), (["--jit-compile"], True)])
def test_bench_partial_fc_jit_compile_reaches_the_models(flags, expected):
    args = bench_partial_fc.parse_args(["--smoke", *flags])
    # "auto" resolves to Keras's own choice for the backend and device.
    plain = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    plain.compile(loss="mse", jit_compile=expected)
    for config in bench_partial_fc.configs(args):
        model = bench_partial_fc.build_model(config, args)
        assert model.jit_compile == plain.jit_compile
    if expected is True:
        assert model.jit_compile is True
    assert f"jit_compile={expected}" in bench_partial_fc.describe_time(args)


def test_bench_partial_fc_accuracy_smoke(tmp_path, capsys):
    out = tmp_path / "smoke.json"
    bench_partial_fc.main(["--accuracy", "--smoke", "--out", str(out)])
    captured = capsys.readouterr()
    data = json.loads(out.read_text())
    config = data["config"]
    assert config["mode"] == "accuracy"
    assert (config["classes"], config["train_per_class"], config["epochs"]) == (
        200, 4, 2
    )
    assert (config["margin"], config["lambda_minimum"]) == (4, 10.0)
    assert "lsoftmax (m = 4, λ floor 10)" in config["description"]
    rows = data["rows"]
    assert [(r["head"], r["sample_rate"], r["kept_classes"]) for r in rows] == [
        ("lsoftmax", 1.0, 200), ("lsoftmax", 0.1, 32),
        ("cosface", 1.0, 200), ("cosface", 0.1, 32),
    ]  # fmt: skip
    for r in rows:
        assert 0 <= r["test_accuracy"] <= 1 and r["train_s"] > 0
        assert math.isfinite(r["final_train_loss"])
    for full, sampled in (rows[:2], rows[2:]):
        assert full["points_to_r1"] == 0
        assert sampled["points_to_r1"] == pytest.approx(
            100 * (sampled["test_accuracy"] - full["test_accuracy"])
        )
    # The header, the rule and a line per trained model.
    assert len(data["markdown"].splitlines()) == 2 + 4
    assert data["markdown"] in captured.out
    assert len(_progress_lines(captured.err)) == 4


def test_bench_mnist_smoke_needs_no_download(tmp_path, capsys):
    out = tmp_path / "mnist.json"
    result = bench_mnist.main(["--smoke", "--out", str(out)])
    captured = capsys.readouterr()
    saved = json.loads(out.read_text())
    assert saved["data"] == "random (--smoke)"
    assert (saved["images"], saved["batch_size"], saved["epochs_timed"]) == (
        320, 64, 1
    )
    assert saved["backend"] == keras.backend.backend()
    assert result["ratio"] == pytest.approx(saved["ratio"], rel=1e-9)
    assert "| LSoftmaxDense(m=4) |" in captured.out
    assert [line.split(":")[0] for line in _progress_lines(captured.err)] == [
        "[1/4] dense epoch 0/1 (warm-up)",
        "[2/4] lsoftmax epoch 0/1 (warm-up)",
        "[3/4] dense epoch 1/1",
        "[4/4] lsoftmax epoch 1/1",
    ]


def test_docs_page_is_the_generated_one():
    with open(report.PAGE, encoding="utf-8") as f:
        committed = f.read()
    assert committed == report.render()
    assert report.main(["--check"]) == 0
    lines = committed.splitlines()
    assert lines[0] == "# Benchmarks"
    assert "costs about what a `Dense` step costs" in lines[2]
    for command in report.SMOKE_COMMANDS:
        assert f"\n{command}\n" in committed
    # One section per JSON file, each with its file's table.
    for section in report.SECTIONS:
        assert f"\n## {section['title']}\n" in committed
        path = os.path.join(report.RESULTS, section["file"])
        with open(path) as f:
            assert report.table(json.load(f)) in committed


def test_report_check_fails_on_a_stale_page(tmp_path, monkeypatch, capsys):
    page = tmp_path / "benchmarks.md"
    page.write_text(report.render().replace("0.95", "0.96", 1))
    monkeypatch.setattr(report, "PAGE", str(page))
    assert report.main(["--check"]) == 1
    assert "run python benchmarks/report.py" in capsys.readouterr().err
    assert report.main([]) == 0
    assert report.main(["--check"]) == 0


def test_report_refuses_a_result_without_a_section(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(report.RESULTS, results)
    (results / "bench_new.json").write_text("{}")
    with pytest.raises(SystemExit, match="no section .* for bench_new.json"):
        report.render(str(results))


def test_memory_device_names():
    assert backend_steps.memory_device("/CPU:0") == "CPU:0"
    assert backend_steps.memory_device("/gpu:1") == "GPU:1"
    assert (
        backend_steps.memory_device("/job:localhost/device:GPU:0") == "GPU:0"
    )


def _random_problem(seed, batch=16, dim=8, classes=12):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    x = tf.constant(rng.standard_normal((batch, dim)))
    # The reference's (D, C) layout, that of a Dense kernel.
    w = tf.constant(rng.standard_normal((dim, classes)))
    # Repeated labels, so one class weight collects several margin terms.
    labels = tf.constant(rng.integers(0, classes // 2, batch), tf.int32)
    upstream = tf.constant(rng.standard_normal((batch, classes)))
    return x, w, labels, upstream


@pytest.mark.tensorflow
@pytest.mark.parametrize("margin", [1, 2, 3, 4])
@pytest.mark.parametrize("lam", [0.0, 0.5, 7.0])
def test_autodiff_reference_matches_op_float64(margin, lam):
    import tensorflow as tf

    from benchmarks.autodiff_reference import autodiff_lsoftmax_logits

    x, w, labels, upstream = _random_problem(seed=10 * margin + int(lam))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, w])
        ref = autodiff_lsoftmax_logits(x, w, labels, margin, lam)
        # The op takes one row per class: the transpose, inside the tape.
        got = ops.lsoftmax_logits(x, tf.transpose(w), labels, margin, lam)
        ref_loss = tf.reduce_sum(upstream * ref)
        got_loss = tf.reduce_sum(upstream * got)
    assert got.dtype == tf.float64 and ref.dtype == tf.float64
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-12, atol=1e-12)
    # The non-target logits are exactly the plain ones in both. (The op may
    # sum its product in another order than x @ w: a last-bit difference.)
    mask = tf.one_hot(labels, w.shape[1], True, False).numpy()
    np.testing.assert_array_equal(ref.numpy()[~mask], (x @ w).numpy()[~mask])
    plain = ops.plain_logits(x, tf.transpose(w))
    np.testing.assert_array_equal(got.numpy()[~mask], plain.numpy()[~mask])
    for ref_grad, got_grad in zip(
        tape.gradient(ref_loss, [x, w]), tape.gradient(got_loss, [x, w])
    ):
        np.testing.assert_allclose(
            tf.convert_to_tensor(got_grad).numpy(),
            tf.convert_to_tensor(ref_grad).numpy(),
            rtol=1e-10,
            atol=1e-10,
        )


@pytest.mark.tensorflow
def test_autodiff_reference_psi_values():
    import tensorflow as tf

    from benchmarks.autodiff_reference import autodiff_lsoftmax_logits

    # ψ(θ) at known angles for m = 4: the target logit is ‖x‖‖w‖ψ(θ).
    for theta, expected in [
        (0.0, 1.0),
        (math.pi / 8, 0.0),
        (math.pi / 2, -3.0),
        (math.pi, -7.0),
    ]:
        x = tf.constant([[1.0, 0.0]], tf.float64)
        w = tf.constant([[math.cos(theta)], [math.sin(theta)]], tf.float64)
        logits = autodiff_lsoftmax_logits(x, w, tf.constant([0]), 4, 0.0)
        np.testing.assert_allclose(logits.numpy(), [[expected]], atol=1e-12)


@pytest.mark.tensorflow
def test_autodiff_layer_matches_lsoftmax_dense():
    import tensorflow as tf

    from benchmarks.autodiff_reference import AutodiffLSoftmaxDense
    from keras_lsoftmax import LSoftmaxDense

    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 3, 3], np.int32)
    # Seeded kernels: the same logits on every run. (The reference's own,
    # of another seed, is overwritten by ours below.)
    ours = LSoftmaxDense(
        4,
        margin=3,
        initial_lambda=2.0,
        kernel_initializer=keras.initializers.GlorotUniform(seed=3),
    )
    ref = AutodiffLSoftmaxDense(
        4,
        margin=3,
        initial_lambda=2.0,
        kernel_initializer=keras.initializers.GlorotUniform(seed=4),
    )
    ours.build(x.shape)
    ref.build(x.shape)
    # The reference keeps Dense's (D, C) layout; ours is (C, D).
    ref.kernel.assign(tf.transpose(ours.kernel))
    np.testing.assert_allclose(
        ref(x, labels=y, training=True).numpy(),
        ours(x, labels=y, training=True).numpy(),
        rtol=1e-5,
        atol=1e-5,
    )
    # x @ W and x @ (Wᵀ)ᵀ may sum in another order: a last-bit difference,
    # which on a near-zero logit is a large relative one, hence the atol.
    np.testing.assert_allclose(
        ref(x).numpy(), ours(x).numpy(), rtol=1e-6, atol=1e-6
    )


def test_bench_mnist_tiny_run(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "mnist.npz"
    np.savez(
        data,
        x_train=rng.integers(0, 256, (64, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, 64, dtype=np.uint8),
    )
    out = tmp_path / "bench_mnist.json"
    result = bench_mnist.main(
        ["--data", str(data), "--limit", "64", "--epochs", "1",
         "--batch-size", "32", "--out", str(out)]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["images"] == 64
    assert len(saved["epoch_seconds"]["dense"]) == 1
    assert len(saved["epoch_seconds"]["lsoftmax"]) == 1
    medians = saved["median_seconds"]
    assert saved["ratio"] == pytest.approx(
        medians["lsoftmax"] / medians["dense"], rel=1e-6, abs=1e-9
    )
    assert result["ratio"] == saved["ratio"]
    assert "| LSoftmaxDense(m=4) |" in capsys.readouterr().out
