"""The benchmarks run on tiny inputs, and the autodiff reference is right.

No test here asserts a time.
"""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from benchmarks import bench_fit
from benchmarks import bench_head
from benchmarks import bench_mnist
from benchmarks.autodiff_reference import AutodiffLSoftmaxDense
from benchmarks.autodiff_reference import autodiff_lsoftmax_logits
from keras_lsoftmax import ops

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


def test_bench_head_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_head.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in (
        "--classes",
        "--batch",
        "--dim",
        "--repeats",
        "--warmup",
        "--device",
        "--no-jit",
        "--jit-only",
        "--margin",
        "--out",
        "--variants",
    ):
        assert flag in help_text


def test_memory_device_names():
    assert bench_head.memory_device("/CPU:0") == "CPU:0"
    assert bench_head.memory_device("/gpu:1") == "GPU:1"
    assert bench_head.memory_device("/job:localhost/device:GPU:0") == "GPU:0"


def _random_problem(seed, batch=16, dim=8, classes=12):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.standard_normal((batch, dim)))
    # The reference's (D, C) layout, that of a Dense kernel.
    w = tf.constant(rng.standard_normal((dim, classes)))
    # Repeated labels, so one class weight collects several margin terms.
    labels = tf.constant(rng.integers(0, classes // 2, batch), tf.int32)
    upstream = tf.constant(rng.standard_normal((batch, classes)))
    return x, w, labels, upstream


@pytest.mark.parametrize("margin", [1, 2, 3, 4])
@pytest.mark.parametrize("lam", [0.0, 0.5, 7.0])
def test_autodiff_reference_matches_op_float64(margin, lam):
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


def test_autodiff_reference_psi_values():
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


def test_autodiff_layer_matches_lsoftmax_dense():
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
