"""The example scripts run end to end in smoke mode and write their files.

Each script runs as users run it, in a subprocess, on a small synthetic
.npz in the keras.datasets format (no download), with `--smoke`: a few
hundred images, one epoch.
"""

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_npz(path, shape, n_train, n_test, label_shape):
    """Random images with labels 0..9 cycling, so every class occurs."""
    rng = np.random.default_rng(0)

    def labels(n):
        return (np.arange(n) % 10).astype("uint8").reshape((n,) + label_shape)

    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train,) + shape, dtype=np.uint8),
        y_train=labels(n_train),
        x_test=rng.integers(0, 256, (n_test,) + shape, dtype=np.uint8),
        y_test=labels(n_test),
    )
    return str(path)


@pytest.fixture(scope="module")
def mnist_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "mnist.npz"
    return _fake_npz(path, (28, 28), 400, 200, ())


@pytest.fixture(scope="module")
def cifar_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "cifar10.npz"
    return _fake_npz(path, (32, 32, 3), 64, 32, (1,))


def _run(script, *args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, (
        f"{script} {' '.join(args)} failed:\n{completed.stdout[-4000:]}\n"
        f"{completed.stderr[-4000:]}"
    )
    return completed.stdout


# The examples are TensorFlow scripts (tf.data, tf.distribute): smoke-run
# once, from the default run.
@pytest.mark.tensorflow
def test_features_2d_smoke(mnist_npz, tmp_path):
    out = tmp_path / "fig2"
    stdout = _run(
        "mnist_features_2d.py", "--data", mnist_npz, "--smoke",
        "--out", str(out), "--verbose", "2", cwd=tmp_path,
    )
    png = out / "features_2d.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert png.stat().st_size > 10_000
    summary = json.loads((out / "features_2d.json").read_text())
    assert [r["margin"] for r in summary["results"]] == [1, 2, 3, 4]
    assert summary["epochs"] == 1 and summary["train_images"] == 320
    assert summary["network"] == "shrunk: 3×3 convs 16/64/128, 2 per group"
    for result in summary["results"]:
        assert 0.0 <= result["test_accuracy"] <= 1.0
        assert 0.0 <= result["angles_deg"]["intra"] <= 180.0
    assert "wrote" in stdout and "m=4: test accuracy" in stdout
    assert "m=4 · epoch 1/1 · " in stdout and "0 s in all" in stdout


# Trains six models: in `-m slow`; the smoke test above runs the script.
@pytest.mark.slow
@pytest.mark.tensorflow
def test_features_2d_jobs_train_the_same_models(mnist_npz, tmp_path):
    results = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        stdout = _run(
            "mnist_features_2d.py", "--data", mnist_npz, "--smoke",
            "--margins", "1", "2", "3", "--jobs", jobs, "--out", str(out),
            cwd=tmp_path,
        )
        assert "3 models trained in " in stdout
        assert f"({jobs} at a time)" in stdout
        summary = json.loads((out / "features_2d.json").read_text())
        assert summary["jobs"] == int(jobs) and summary["train_seconds"] > 0
        results[jobs] = summary["results"]
    # Process 0 trains m = 1 and 3, process 1 m = 2: the order is restored.
    assert [r["margin"] for r in results["2"]] == [1, 2, 3]
    for one, two in zip(results["1"], results["2"]):
        assert two["test_accuracy"] == pytest.approx(
            one["test_accuracy"], rel=0, abs=1e-6
        )
        for key, angle in one["angles_deg"].items():
            assert two["angles_deg"][key] == pytest.approx(
                angle, rel=0, abs=1e-4
            )


def _broken_test_split(path):
    """An MNIST-format .npz whose test split is empty: a script that reads it
    under --validation fails."""
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (5400, 28, 28), dtype=np.uint8),
        y_train=(np.arange(5400) % 10).astype("uint8"),
        x_test=np.zeros((0, 28, 28), dtype=np.uint8),
        y_test=np.zeros((0,), dtype=np.uint8),
    )
    return str(path)


# The examples are TensorFlow scripts (tf.data, tf.distribute): smoke-run
# once, from the default run.
@pytest.mark.tensorflow
def test_features_2d_validation_without_feature_bn(examples_module, tmp_path):
    out = tmp_path / "val"
    stdout = _run(
        "mnist_features_2d.py", "--data",
        _broken_test_split(tmp_path / "mnist.npz"), "--smoke", "--validation",
        "--no-feature-bn", "--margins", "1", "--out", str(out), cwd=tmp_path,
    )
    summary = json.loads((out / "features_2d.json").read_text())
    assert summary["split"] == "validation"
    assert "m=1: validation accuracy" in stdout

    import keras

    model = examples_module("mnist_features_2d").build_model(
        1, False, 0.0, feature_bn=False
    )
    assert isinstance(model.get_layer("features"), keras.layers.Dense)
    assert not any(
        isinstance(layer, keras.layers.BatchNormalization)
        for layer in model.layers[-3:]
    )


def test_features_2d_shift(examples_module, capsys):
    import keras

    module = examples_module("mnist_features_2d")
    shifted = module.build_model(1, False, 0.0, shift=2, seed=0)
    assert isinstance(shifted.layers[1], keras.layers.RandomTranslation)
    assert shifted.layers[1].height_factor == pytest.approx(2 / 28, abs=1e-9)
    plain = module.build_model(1, False, 0.0, shift=0)
    assert not any(
        isinstance(layer, keras.layers.RandomTranslation)
        for layer in plain.layers
    )
    with pytest.raises(SystemExit):
        module.parse_args(["--shift", "-1"])
    assert "--shift must be in [0, 13] pixels, got -1" in capsys.readouterr().err


def test_features_2d_convs_per_group(examples_module, capsys):
    import keras

    module = examples_module("mnist_features_2d")

    def conv_filters(model):
        return [
            layer.filters
            for layer in model.layers
            if isinstance(layer, keras.layers.Conv2D)
        ]

    default = module.build_model(1, False, 0.0, channels=(8, 16, 32))
    assert conv_filters(default) == [8, 8, 16, 16, 32, 32]
    one = module.build_model(
        1, False, 0.0, channels=(8, 16, 32), convs_per_group=1
    )
    assert conv_filters(one) == [8, 16, 32]
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--convs-per-group", "0"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--convs-per-group must be at least 1, got 0" in error


def test_features_2d_rejects_zero_jobs(examples_module, capsys):
    module = examples_module("mnist_features_2d")
    assert module.parse_args([]).jobs == 1
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--jobs", "0"])
    assert exit_info.value.code == 2
    assert "--jobs must be at least 1, got 0" in capsys.readouterr().err


# The examples are TensorFlow scripts (tf.data, tf.distribute): smoke-run
# once, from the default run.
@pytest.mark.tensorflow
def test_margin_comparison_smoke(mnist_npz, tmp_path):
    out = tmp_path / "cmp"
    stdout = _run(
        "mnist_margin_comparison.py", "--data", mnist_npz, "--smoke",
        "--seeds", "0", "1", "--heads", "softmax", "lsoftmax4", "arcface",
        "--out", str(out), "--verbose", "0", cwd=tmp_path,
    )
    table = (out / "results.md").read_text()
    assert table in stdout.replace("\r", "")
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| head | test error % (mean ± std) |")
    assert rows[1].startswith("| softmax | ")
    assert rows[2].startswith("| L-Softmax m=4 | ")
    assert rows[3].startswith("| ArcFace m=0.5, s=30 | ")
    assert " ± " in rows[1]
    summary = json.loads((out / "results.json").read_text())
    assert summary["scale"] == 30.0
    runs = summary["runs"]
    assert [(r["name"], r["seed"]) for r in runs] == [
        ("softmax", 0), ("softmax", 1), ("lsoftmax4", 0), ("lsoftmax4", 1),
        ("arcface", 0), ("arcface", 1),
    ]
    for run in runs:
        assert 0.0 <= run["error_percent"] <= 100.0
        assert set(run["angles_deg"]) == {"intra", "inter_means",
                                          "inter_weights"}
    # Only the annealed heads report λ; ArcFace's is the constant 0.
    assert runs[0]["final_lambda"] is None
    assert runs[2]["final_lambda"] >= 0.0
    assert runs[4]["final_lambda"] is None
    for head, first in (("L-Softmax m=4", 2), ("ArcFace m=0.5, s=30", 4)):
        deltas = [runs[i]["error_percent"] - runs[i - first]["error_percent"]
                  for i in (first, first + 1)]
        assert f"\n| {head} | " + ", ".join(f"{d:+.2f}" for d in deltas) + (
            " | "
        ) in table
    assert "softmax, seed 1 · epoch 1/1 · " in stdout
    assert "ArcFace m=0.5, s=30, seed 1 · epoch 1/1 · " in stdout


@pytest.mark.tensorflow  # the script imports TensorFlow
def test_margin_comparison_heads(examples_module, capsys):
    import keras

    import keras_lsoftmax

    comparison = examples_module("mnist_margin_comparison")
    assert comparison.parse_args([]).heads == [
        "softmax", "lsoftmax2", "lsoftmax4", "sphereface", "cosface",
        "arcface",
    ]
    args = comparison.parse_args(["--heads", "lsoftmax3", "CosFace",
                                  "--scale", "16"])
    assert args.heads == ["lsoftmax3", "cosface"] and args.scale == 16.0

    def head(name):
        model = comparison.build_model(name, False, 5e-4, scale=16.0)
        return model.get_layer("head")

    softmax = head("softmax")
    assert type(softmax) is keras.layers.Dense and not softmax.use_bias
    assert head("lsoftmax3").margin == 3
    sphereface = head("sphereface")
    assert isinstance(sphereface, keras_lsoftmax.SphereFaceDense)
    assert sphereface.margin == 4 and sphereface.lambda_schedule == "auto"
    cosface = head("cosface")
    assert isinstance(cosface, keras_lsoftmax.CosFaceDense)
    assert (cosface.margin, cosface.scale) == (
        pytest.approx(0.35, abs=1e-9), 16.0
    )
    arcface = head("arcface")
    assert isinstance(arcface, keras_lsoftmax.ArcFaceDense)
    assert (arcface.margin, arcface.scale, arcface.sub_centers) == (
        pytest.approx(0.5, abs=1e-9), 16.0, 1
    )
    # The network's kernel initialization and weight decay on every head.
    for layer in (softmax, sphereface, cosface, arcface):
        assert isinstance(layer.kernel_initializer, keras.initializers.HeNormal)
        assert layer.kernel_regularizer.l2 == pytest.approx(2.5e-4, abs=1e-12)

    for argv, message in (
        (["--heads", "lsoftmax1"], "expected softmax, lsoftmaxM with an "
         "integer M ≥ 2 (e.g. lsoftmax4), sphereface, cosface or arcface, "
         "got 'lsoftmax1'"),
        (["--heads", "normface"], "got 'normface'"),
        (["--scale", "0"], "--scale must be positive, got 0.0"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            comparison.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


# The examples are TensorFlow scripts (tf.data, tf.distribute): smoke-run
# once, from the default run.
@pytest.mark.tensorflow
def test_margin_comparison_validation_never_reads_the_test_set(tmp_path):
    out = tmp_path / "val"
    stdout = _run(
        "mnist_margin_comparison.py", "--data",
        _broken_test_split(tmp_path / "mnist.npz"), "--smoke",
        "--validation", "--seeds", "0", "--heads", "lsoftmax2", "--out",
        str(out),
        "--verbose", "0", cwd=tmp_path,
    )
    assert "| head | validation error % (mean ± std) |" in stdout
    assert json.loads((out / "results.json").read_text())["split"] == (
        "validation"
    )


# The examples are TensorFlow scripts (tf.data, tf.distribute): smoke-run
# once, from the default run.
@pytest.mark.tensorflow
def test_cifar10_smoke(cifar_npz, tmp_path):
    out = tmp_path / "cifar"
    _run(
        "cifar10.py", "--data", cifar_npz, "--smoke", "--augment",
        "--out", str(out), "--verbose", "2", cwd=tmp_path,
    )
    result = json.loads((out / "results.json").read_text())
    assert result["dataset"] == "CIFAR-10+"
    assert result["head"] == "L-Softmax m=4"
    assert result["epochs"] == 1 and result["steps"] == 1
    assert 0.0 <= result["error_percent"] <= 100.0
    assert result["lambda_schedule"] == {
        "base": 1000.0, "gamma": 1e-5, "power": 45.0, "minimum": 0.0
    }

    import keras

    import keras_lsoftmax  # noqa: F401 (registers the classes)

    model = keras.saving.load_model(out / "model.keras")
    logits = model.predict(np.zeros((2, 32, 32, 3), "float32"), verbose=0)
    assert logits.shape == (2, 10)


@pytest.fixture
def examples_module(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))

    def load(name):
        return importlib.import_module(name)

    return load


# cifar10, mnist_margin_comparison and multi_worker import TensorFlow (tf.data,
# tf.distribute): loaded only in the TensorFlow suite.
@pytest.mark.parametrize(
    "script, flags",
    [
        ("mnist_features_2d", ["--data", "--seed", "--out", "--smoke",
                               "--margins", "--paper", "--validation",
                               "--no-feature-bn", "--lr-drops", "--shift",
                               "--jobs", "--convs-per-group"]),
        pytest.param(
            "mnist_margin_comparison",
            ["--data", "--seeds", "--heads", "--scale", "--out", "--smoke",
             "--validation", "--paper", "--lambda-min"],
            marks=pytest.mark.tensorflow,
        ),
        pytest.param(
            "cifar10",
            ["--data", "--seed", "--out", "--smoke", "--margin", "--augment",
             "--lr-drops"],
            marks=pytest.mark.tensorflow,
        ),
        pytest.param(
            "multi_worker",
            ["--worker-index", "--ports", "--data", "--synthetic", "--steps",
             "--out"],
            marks=pytest.mark.tensorflow,
        ),
    ],
)
def test_help(examples_module, capsys, script, flags):
    module = examples_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in flags:
        assert flag in text
    # One entry per option ("  --flag ..." and its indented lines): each
    # but --help states its default, or that it is required.
    entries = re.split(r"\n  (?=-)", text.split("\noptions:\n", 1)[1])
    assert len(entries) > len(flags)
    for entry in entries:
        if not entry.lstrip().startswith("-h, --help"):
            assert "default" in entry or "(required)" in entry, entry


def test_scaled_gamma_reproduces_the_authors_mnist_setting(examples_module):
    common = examples_module("common")
    # 30k iterations, crossing at 8.7k: the authors' gamma 2.5e-5.
    assert common.scaled_gamma(30000) == pytest.approx(2.5e-5, rel=0.01, abs=1e-9)
    schedule = common.scaled_inverse_decay(1000)
    assert float(schedule(290)) == pytest.approx(1.0, rel=1e-3, abs=1e-6)
    assert float(schedule(1)) > 900.0


def test_step_learning_rate_boundaries(examples_module):
    common = examples_module("common")
    lr = common.step_learning_rate(18000)
    assert [float(lr(t)) for t in (0, 11999, 12001, 15001)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.001], rel=1e-6, abs=1e-9
    )
    tiny = common.step_learning_rate(2)  # still valid for a 2-step smoke run
    assert float(tiny(0)) == pytest.approx(0.1, rel=1e-6, abs=1e-8)


def test_step_learning_rate_custom_drops(examples_module):
    common = examples_module("common")
    lr = common.step_learning_rate(1000, 0.1, [0.4, 0.7])
    assert [float(lr(t)) for t in (0, 399, 401, 699, 701)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001], rel=1e-6, abs=1e-9
    )


@pytest.mark.parametrize(
    "drops", [["0.7", "0.4"], ["0.5", "0.5"], ["0"], ["1.2"]]
)
def test_lr_drops_rejects_bad_values(examples_module, capsys, drops):
    module = examples_module("mnist_features_2d")
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--lr-drops", *drops])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--lr-drops must be strictly increasing fractions" in error
    assert str([float(d) for d in drops]) in error


def test_lr_drops_parsed(examples_module):
    module = examples_module("mnist_features_2d")
    assert module.parse_args(["--lr-drops", "0.3", "0.9"]).lr_drops == [0.3, 0.9]


def test_angle_stats(examples_module):
    common = examples_module("common")
    # Two classes on the x and y axes, each spread ±10° around its axis.
    spread = np.radians([-10.0, 10.0])
    features = np.concatenate(
        [np.stack([np.cos(spread), np.sin(spread)], 1),
         np.stack([-np.sin(spread), np.cos(spread)], 1)]
    )
    labels = np.array([0, 0, 1, 1])
    # One row per class: W_0 at 0°, W_1 at 45°, W_2 at 270°. (Read as
    # columns, the two 3-D weights would be 60° apart.)
    kernel = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    stats = common.angle_stats(features, labels, kernel)
    assert stats["intra"] == pytest.approx(10.0, rel=1e-6, abs=1e-6)
    assert stats["inter_means"] == pytest.approx(90.0, rel=1e-6, abs=1e-6)
    assert stats["inter_weights"] == pytest.approx(45.0, rel=1e-6, abs=1e-6)


@pytest.mark.tensorflow  # the script imports TensorFlow
def test_paired_table(examples_module):
    comparison = examples_module("mnist_margin_comparison")
    runs = [
        {"head": comparison.head_label(h, 30.0), "name": h, "seed": s,
         "error_percent": e}
        for h, s, e in [("softmax", 0, 0.80), ("softmax", 1, 0.90),
                        ("softmax", 2, 0.70), ("cosface", 0, 0.70),
                        ("cosface", 1, 0.70), ("cosface", 2, 0.70),
                        ("lsoftmax2", 0, 0.8000009),
                        ("lsoftmax2", 1, 0.8999991)]
    ]
    rows = comparison.paired_table(
        runs, ["softmax", "lsoftmax2", "cosface"], "test"
    ).splitlines()
    assert rows[0].startswith("| head | Δ test error vs softmax")
    # m = 2 only ran seeds 0 and 1: equal to softmax on both, up to float32
    # noise, which is no win.
    assert rows[2] == (
        "| L-Softmax m=2 | +0.00, +0.00 | 0.00 ± 0.00 | 0 of 2 seeds | – |"
    )
    # Deltas -0.1, -0.2, 0: mean -0.1, std 0.1, t = -0.1 / (0.1 / √3).
    assert rows[3] == (
        "| CosFace m=0.35, s=30 | -0.10, -0.20, +0.00 | -0.10 ± 0.10 | 2 of 3 "
        "seeds | -1.73 |"
    )
    assert comparison.paired_table(runs[3:6], ["cosface"], "test") == ""


def test_format_duration(examples_module):
    common = examples_module("common")
    assert common.format_duration(38.4) == "38 s"
    assert common.format_duration(249) == "4 min 09 s"
    assert common.format_duration(3900) == "1 h 05 min"


def test_progress_prints_each_epoch_with_the_time_left(
    examples_module, capsys
):
    common = examples_module("common")
    import keras

    # A seeded initializer: keras.utils.set_random_seed would import
    # TensorFlow under every backend.
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(
            2, kernel_initializer=keras.initializers.GlorotUniform(seed=0)
        ),
    ])
    model.compile(optimizer="sgd", loss="mse")
    progress = common.Progress(total_epochs=5)
    x, y = np.zeros((8, 3), "float32"), np.zeros((8, 2), "float32")
    model.fit(x, y, epochs=2, verbose=0, callbacks=[progress.run("first")])
    model.fit(x, y, epochs=3, verbose=0, callbacks=[progress.run("second")])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" · ")[:2] for line in lines] == [
        ["first", "epoch 1/2"], ["first", "epoch 2/2"],
        ["second", "epoch 1/3"], ["second", "epoch 2/3"],
        ["second", "epoch 3/3"],
    ]
    assert lines[0].split(" · ")[2] == "loss 0"
    assert lines[-1].endswith("left: 0 s this run, 0 s in all")
    assert progress.epochs_done == 5


def test_command_line_leaves_out_the_local_data_path(examples_module):
    common = examples_module("common")
    argv = ["--data", "/home/me/mnist.npz", "--seeds", "0", "--data=x.npz",
            "--out", "docs"]
    assert common.command_line("run.py", argv) == (
        "python examples/run.py --seeds 0 --out docs"
    )
