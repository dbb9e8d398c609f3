"""Tests of Partial-FC class sampling (`sample_rate`, `sampling` module).

Covers the draw (labelled classes kept, S distinct classes, labels mapped to
their positions, seeded reproducibility, each shard's own share), the head's
sampled logits against the columns of its full logits, `fit` with a sampling
head (kept rows only updated by plain SGD, equality with the unsampled run
when every class is kept, learning 1000 classes at r = 0.1, XLA on
TensorFlow), the classes of the global batch kept by two `MirroredStrategy`
replicas, by two `MultiWorkerMirroredStrategy` workers and by two PyTorch DDP
processes, evaluation and prediction over
all classes, and the argument's validation and config. Every test runs on
each Keras backend unless marked.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_lsoftmax
from keras_lsoftmax import sampling
from tests.workers import ROOT
from tests.workers import free_ports
from tests.workers import tf_config
from tests.workers import worker_env

WORKER = os.path.join(ROOT, "tests", "distribute_worker.py")
DDP_WORKER = os.path.join(ROOT, "tests", "ddp_worker.py")
SPARSE_CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _draw(labels, num_classes, rate, seed=0, sub_centers=1, shards=1):
    generator = keras.random.SeedGenerator(seed)
    drawn = sampling.sample_classes(
        keras.ops.convert_to_tensor(np.asarray(labels, "int32")),
        num_classes,
        rate,
        generator,
        sub_centers,
        shards,
    )
    return [
        keras.ops.convert_to_numpy(t)
        for t in (drawn.classes, drawn.rows, drawn.labels)
    ]



def test_kept_classes_hold_every_label_once_and_labels_map_to_them():
    labels = np.array([7, 3, 7, 99, 0, 3])
    classes, rows, mapped = _draw(labels, num_classes=100, rate=0.2)
    assert classes.shape == (20,)
    assert len(set(classes.tolist())) == 20
    assert np.all(np.diff(classes) > 0)  # sorted
    assert set(labels.tolist()) <= set(classes.tolist())
    np.testing.assert_array_equal(classes[mapped], labels)
    np.testing.assert_array_equal(rows, classes)


def test_kept_rows_with_sub_centres_are_each_kept_class_rows():
    labels = np.array([4, 1])
    classes, rows, mapped = _draw(labels, 10, 0.3, sub_centers=3)
    assert classes.shape == (3,)
    expected = (classes[:, None] * 3 + np.arange(3)[None, :]).reshape(-1)
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_array_equal(classes[mapped], labels)


def test_at_least_one_class_per_row_is_kept():
    # int(0.01 · 50) = 0 < B = 4: S = B, every label fits.
    assert sampling.num_sampled(50, 0.01, 4) == 4
    assert sampling.num_sampled(50, 0.5, 4) == 25
    assert sampling.num_sampled(5, 0.5, 8) == 5
    classes, _, mapped = _draw([1, 2, 3, 4], 50, 0.01)
    np.testing.assert_array_equal(classes, [1, 2, 3, 4])
    np.testing.assert_array_equal(mapped, [0, 1, 2, 3])


def test_each_shard_keeps_its_labelled_classes_and_its_share():
    labels = np.array([1, 2, 55, 99])
    # 4 blocks of 25 classes, each keeps max(int(0.1 · 25), B = 4) = 4.
    classes, rows, mapped = _draw(labels, 100, 0.1, sub_centers=2, shards=4)
    np.testing.assert_array_equal(
        np.bincount(classes // 25, minlength=4), [4, 4, 4, 4]
    )
    assert np.all(np.diff(classes) > 0)
    np.testing.assert_array_equal(classes[mapped], labels)
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(200, 3)).astype("float32")
    kept = sampling.kept_rows(
        keras.ops.convert_to_tensor(kernel),
        keras.ops.convert_to_tensor(rows),
        shards=4,
    )
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(kept), kernel[rows])


def test_classes_that_do_not_split_over_the_shards_raise():
    sampling.check_shards(100, 4, "head")
    with pytest.raises(ValueError, match="multiple of 3.*units=100"):
        sampling.check_shards(100, 3, "head")


def test_the_draw_is_reproducible_from_its_seed_and_varies_with_it():
    labels = [5, 6]
    first = _draw(labels, 200, 0.1, seed=3)[0]
    np.testing.assert_array_equal(first, _draw(labels, 200, 0.1, seed=3)[0])
    assert not np.array_equal(first, _draw(labels, 200, 0.1, seed=4)[0])


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5, True, "0.1", None])
def test_invalid_sample_rate_is_rejected(value):
    with pytest.raises(ValueError, match="sample_rate"):
        keras_lsoftmax.CosFaceDense(10, sample_rate=value)


def test_invalid_seed_is_rejected():
    with pytest.raises(ValueError, match="seed"):
        keras_lsoftmax.ArcFaceDense(10, sample_rate=0.5, seed=1.5)


def test_sample_rate_and_seed_round_trip_through_the_config():
    head = keras_lsoftmax.ArcFaceDense(
        10, sub_centers=2, sample_rate=0.25, seed=7
    )
    config = head.get_config()
    assert config["sample_rate"] == 0.25 and config["seed"] == 7
    clone = keras_lsoftmax.ArcFaceDense.from_config(config)
    assert clone.sample_rate == 0.25 and clone.seed == 7
    assert clone.get_config() == config


def test_rate_one_adds_no_variable():
    default = keras_lsoftmax.CosFaceDense(10)
    explicit = keras_lsoftmax.CosFaceDense(10, sample_rate=1.0)
    sampled = keras_lsoftmax.CosFaceDense(10, sample_rate=0.5)
    for head in (default, explicit, sampled):
        head.build((None, 4))
    assert explicit.seed_generator is None
    assert len(explicit.variables) == len(default.variables)
    assert len(sampled.variables) == len(default.variables) + 1


@pytest.mark.parametrize("sub_centers", [1, 2])
def test_sampled_logits_are_the_full_logits_of_the_kept_classes(sub_centers):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8)).astype("float32")
    y = np.array([3, 17, 3, 29])
    kwargs = dict(margin=0.3, scale=10.0, sub_centers=sub_centers)
    sampled = keras_lsoftmax.ArcFaceDense(30, sample_rate=0.2, seed=1, **kwargs)
    full = keras_lsoftmax.ArcFaceDense(30, **kwargs)
    sampled.build((None, 8))
    full.build((None, 8))
    full.kernel.assign(sampled.kernel)
    with keras_lsoftmax.label_scope(y) as scope:
        out = keras.ops.convert_to_numpy(sampled(x, training=True))
    record = scope.records[0]
    classes = keras.ops.convert_to_numpy(record.classes)
    targets = keras.ops.convert_to_numpy(record.targets)
    assert out.shape == (4, 6)
    np.testing.assert_array_equal(classes[targets], y)
    reference = keras.ops.convert_to_numpy(full(x, labels=y, training=True))
    np.testing.assert_allclose(out, reference[:, classes], atol=1e-5)


def test_one_hot_labels_with_sampling_raise():
    head = keras_lsoftmax.CosFaceDense(5, sample_rate=0.5)
    x = np.zeros((2, 3), "float32")
    with pytest.raises(ValueError, match="one-hot"):
        head(x, labels=np.eye(5, dtype="float32")[[0, 1]], training=True)


def test_ignored_rows_keep_the_ignored_class_as_loss_target():
    head = keras_lsoftmax.CosFaceDense(20, sample_rate=0.2, seed=0)
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    with keras_lsoftmax.label_scope(np.array([5, -1, 9]), ignore_class=-1) as s:
        head(x, training=True)
    record = s.records[0]
    classes = keras.ops.convert_to_numpy(record.classes)
    targets = keras.ops.convert_to_numpy(record.targets)
    assert targets[1] == -1
    np.testing.assert_array_equal(classes[targets[[0, 2]]], [5, 9])


def _blobs(num_classes, per_class, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)).astype("float32")
    y = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(y)
    x = centres[y] + 0.1 * rng.normal(size=(len(y), dim)).astype("float32")
    return x, y


def _model(head, dim=16, optimizer=None, jit_compile="auto"):
    model = keras_lsoftmax.Sequential(
        [keras.Input((dim,)), keras.layers.Dense(32), head]
    )
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(0.01),
        loss=SPARSE_CE,
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


def test_fit_with_sampling_learns_a_thousand_classes_and_infers_over_all():
    keras.utils.set_random_seed(0)
    x, y = _blobs(1000, 4)
    head = keras_lsoftmax.CosFaceDense(
        1000, margin=0.2, scale=20.0, sample_rate=0.1
    )
    model = _model(head)
    history = model.fit(x, y, batch_size=50, epochs=3, verbose=0)
    # The training accuracy is over the kept classes (≥ 100 per step).
    assert history.history["accuracy"][-1] > 0.5
    logs = model.evaluate(x, y, batch_size=500, verbose=0, return_dict=True)
    assert logs["accuracy"] > 0.5  # chance: 0.001
    assert model.predict(x[:7], verbose=0).shape == (7, 1000)


def test_classes_never_kept_are_not_updated_by_plain_sgd():
    keras.utils.set_random_seed(1)
    x, y = _blobs(50, 1)
    x, y = x[:4], y[:4]
    head = keras_lsoftmax.ArcFaceDense(50, scale=10.0, sample_rate=0.1)
    model = _model(head, optimizer=keras.optimizers.SGD(0.5))
    before = keras.ops.convert_to_numpy(head.kernel)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    changed = np.any(keras.ops.convert_to_numpy(head.kernel) != before, axis=1)
    # S = max(int(0.1 · 50), 4) = 5 rows move, among them the labelled ones.
    assert changed.sum() == 5
    assert np.all(changed[y])


def test_sampling_every_class_trains_as_the_unsampled_head():
    # B ≥ C keeps every class, in order: the step is the unsampled one.
    x, y = _blobs(6, 2)
    keras.utils.set_random_seed(2)
    models = [
        _model(
            keras_lsoftmax.CosFaceDense(6, scale=10.0, sample_rate=rate),
            optimizer=keras.optimizers.SGD(0.1),
        )
        for rate in (1.0, 0.5)
    ]
    for full, sampled in zip(*(m.trainable_variables for m in models)):
        sampled.assign(keras.ops.convert_to_numpy(full))
    for model in models:
        model.fit(x, y, batch_size=12, epochs=2, verbose=0)
    for full, sampled in zip(*(m.trainable_variables for m in models)):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(sampled),
            keras.ops.convert_to_numpy(full),
            atol=1e-6,
        )


def test_a_seeded_run_is_reproducible():
    x, y = _blobs(100, 2)
    runs = []
    for _ in range(2):
        keras.utils.set_random_seed(3)
        head = keras_lsoftmax.CosFaceDense(100, scale=10.0, sample_rate=0.1)
        model = _model(head, optimizer=keras.optimizers.SGD(0.1))
        model.fit(x, y, batch_size=20, epochs=1, verbose=0)
        runs.append(keras.ops.convert_to_numpy(head.kernel))
    np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.tensorflow
@pytest.mark.jax
def test_fit_with_sampling_compiles():
    # jit_compile=True: XLA on TensorFlow, jax.jit on JAX.
    keras.utils.set_random_seed(4)
    x, y = _blobs(200, 2)
    head = keras_lsoftmax.ArcFaceDense(
        200, margin=0.2, scale=20.0, sub_centers=2, sample_rate=0.1
    )
    model = _model(head, jit_compile=True)
    history = model.fit(x, y, batch_size=40, epochs=4, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert model.predict(x[:3], verbose=0).shape == (3, 200)


def test_a_sampling_head_must_give_a_model_output():
    head = keras_lsoftmax.CosFaceDense(20, scale=10.0, sample_rate=0.2)
    model = keras_lsoftmax.Sequential(
        [keras.Input((4,)), head, keras.layers.Rescaling(2.0)]
    )
    model.compile(optimizer="sgd", loss=SPARSE_CE)
    x, y = _blobs(20, 1, dim=4)
    with pytest.raises(ValueError, match="must be a model output"):
        model.fit(x, y, batch_size=20, epochs=1, verbose=0)


@pytest.mark.tensorflow
def test_mirrored_replicas_keep_the_global_batch_classes(tmp_path):
    # Two replicas must keep the classes of the whole batch, and the same
    # negatives: the step is then one device's step on that batch.
    out = tmp_path / "sampled.json"
    proc = subprocess.run(
        [sys.executable, WORKER, str(out), "sampled"],
        env=worker_env(), capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        result = json.load(f)
    # 200 classes at r = 0.25: 50 rows per step, holding every label. With
    # LazyAdam too: the replicas' gradients of the kept rows are summed.
    for optimizer in ("", "_lazy"):
        one, two = result["single" + optimizer], result["mirrored" + optimizer]
        assert one["rows_moved"] == two["rows_moved"] == [50, 50]
        assert min(one["labelled"]) >= 25
        np.testing.assert_allclose(
            two["losses"], one["losses"], rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            two["kernel"], one["kernel"], rtol=0, atol=1e-5
        )
    error = result["mirrored_xla"]["error"]
    assert "sample_rate < 1 cannot train under XLA on 2" in error
    assert "jit_compile=False" in error


@pytest.mark.tensorflow
def test_multi_worker_replicas_keep_the_global_batch_classes(tmp_path):
    # Two workers of one cluster, one replica each: the labels are gathered
    # across processes, as across the devices of a MirroredStrategy.
    ports = free_ports(2)
    envs = {
        "worker0": worker_env(TF_CONFIG=tf_config(ports, 0)),
        "worker1": worker_env(TF_CONFIG=tf_config(ports, 1)),
        "single": worker_env(),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, WORKER, str(tmp_path / f"{name}.json"),
             "multi_worker_sampled"],
            env=env, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for name, env in envs.items()
    }
    try:
        for proc in procs.values():
            _, stderr = proc.communicate(timeout=200)
            assert proc.returncode == 0, stderr[-4000:]
    finally:
        for proc in procs.values():  # a failed worker leaves the other waiting
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    chief, other, single = (
        json.loads((tmp_path / f"{name}.json").read_text()) for name in procs
    )
    assert [r["replicas"] for r in (chief, other, single)] == [2, 2, 1]
    for optimizer in ("sgd", "lazy"):
        one, runs = single[optimizer], (chief[optimizer], other[optimizer])
        assert min(one["labelled"]) >= 25
        for run in runs:
            # 50 rows per step, as on one worker; each worker's own 16
            # labels would keep more than 60.
            assert run["rows_moved"] == one["rows_moved"] == [50, 50]
            np.testing.assert_allclose(
                run["losses"], one["losses"], rtol=1e-5, atol=1e-6
            )
            np.testing.assert_allclose(
                run["kernel"], one["kernel"], rtol=0, atol=1e-5
            )
        np.testing.assert_array_equal(runs[0]["kernel"], runs[1]["kernel"])


def _ddp_run(out, processes, port):
    """Starts the processes of one `tests/ddp_worker.py` run."""
    return [
        subprocess.Popen(
            [sys.executable, DDP_WORKER, str(out), str(rank), str(processes),
             str(port)],
            env=worker_env(KERAS_BACKEND="torch"), cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for rank in range(processes)
    ]


@pytest.mark.torch
def test_ddp_processes_keep_the_global_batch_classes(tmp_path):
    # Two DDP processes must keep the classes of the whole batch, also when
    # their parts differ in size: one process's step on that batch.
    port = free_ports(1)[0]
    runs = {
        "one": _ddp_run(tmp_path / "one.json", 1, 0),
        "two": _ddp_run(tmp_path / "two.json", 2, port),
    }
    for procs in runs.values():
        for proc in procs:
            _, stderr = proc.communicate(timeout=200)
            assert proc.returncode == 0, stderr[-4000:]
    one, two = (
        json.loads((tmp_path / f"{name}.json").read_text()) for name in runs
    )
    # 200 classes at r = 0.25: 50 rows per step; the last step's parts are
    # 20 and 12 rows.
    assert one["rows_moved"] == two["rows_moved"] == [50, 50, 50]
    assert min(one["labelled"]) >= 25
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two["kernel"], one["kernel"], rtol=0, atol=1e-5)
