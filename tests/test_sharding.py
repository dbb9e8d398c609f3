"""Class-sharded heads on JAX: `ModelParallel` with a `LayoutMap` entry for
the head's kernel (the recipe of docs/sharding.md), on 4 CPU devices.

The work runs in a subprocess (`tests/sharding_worker.py`): the number of
host devices is fixed by `XLA_FLAGS` before JAX is imported. Checked:

- each device holds C/4 rows of the kernel and of both Adam slots;
- the compiled train step's collectives carry (B, ·) pieces only: no
  all-gather (or other collective) of a (C, D) or (C/4, D) array, and no
  (C, D) array at all in the step of a device;
- `fit` gives the weights and loss of the same seeded run on one device;
- the `.keras` file loads back with the same values, sharded again under
  the distribution and whole on one device without it;
- a Partial-FC head (`sample_rate=0.1`) samples each device's shard on its
  own: one step updates max(int(0.1 · C/4), B) rows of each shard, the
  labelled ones among them, reproducibly, and exchanges no class rows.

Run `pytest -s` to see the worker's report.
"""

import json
import subprocess
import sys

import pytest

from tests.workers import ROOT
from tests.workers import worker_env

TIMEOUT = 120  # seconds
DEVICES = 4
# The heads of tests/sharding_worker.py (not imported: it imports JAX).
HEADS = ["arcface_2_subcenters", "lsoftmax"]


def _run_worker(tmp_path_factory, head):
    path = tmp_path_factory.mktemp("sharding") / "model.keras"
    env = worker_env(
        KERAS_BACKEND="jax",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.sharding_worker",
            str(path),
            head,
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout.strip().splitlines()[-1])
    print(data)
    return data


@pytest.fixture(scope="module", params=HEADS)
def report(request, tmp_path_factory):
    return _run_worker(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def sampled_report(tmp_path_factory):
    return _run_worker(tmp_path_factory, "sampled")


def _dims(shape):
    return [int(d) for d in shape.split("[")[1][:-1].split(",") if d]


@pytest.mark.jax
def test_each_device_holds_its_rows_of_kernel_and_adam_state(report):
    rows = report["rows"] // DEVICES
    shard = [rows, report["dim"]]
    assert report["devices"] == DEVICES
    assert report["kernel_path"].endswith("/head/kernel")
    assert report["kernel_spec"] == "P('model', None)"
    assert report["kernel_shards"] == [shard] * DEVICES
    assert report["kernel_shard_devices"] == list(range(DEVICES))
    assert [name.rsplit("_", 1)[-1] for name in report["slot_names"]] == [
        "momentum",
        "velocity",
    ]
    assert report["slot_shards"] == [[shard] * DEVICES] * 2


@pytest.mark.jax
def test_compiled_step_never_gathers_the_kernel(report):
    batch, classes = 64, report["classes"]
    collectives = report["collectives"]
    assert collectives  # the sharded softmax does communicate
    for op, shapes in collectives:
        for shape in shapes:
            dims = _dims(shape)
            # Per-sample pieces, (B,) or (B, ·): the labelled rows, the
            # softmax's max and sum, the gradient of the features; never
            # class rows, neither all of them nor one device's share.
            assert dims[0] == batch, (op, shape)
            rows = report["rows"]
            assert not {classes, rows, rows // DEVICES} & set(dims), (op, shape)
    # Nor is a whole (C, D) array made on a device: only (C/4, D) shards.
    assert report["full_kernel_arrays"] == 0
    assert report["shard_arrays"] > 0


@pytest.mark.jax
def test_sharded_fit_equals_one_device(report):
    assert report["max_update"] > 1e-2  # the steps moved the kernel
    # Float32 sums in another order, amplified where Adam divides
    # near-zero gradients by their own size: 1e-5 of a weight at
    # scale 64 (ArcFace), 5e-7 without a scale (L-Softmax).
    assert report["max_weight_diff"] <= 1e-3 * report["max_update"]
    for name, value in report["single"].items():
        assert report["sharded"][name] == pytest.approx(value, abs=1e-5)


@pytest.mark.jax
def test_saved_sharded_model_loads_equal_and_sharded(report):
    assert report["loaded_max_diff"] == 0.0
    rows = report["rows"] // DEVICES
    assert report["loaded_kernel_shards"] == [[rows, report["dim"]]] * DEVICES


@pytest.mark.jax
def test_saved_sharded_model_loads_on_one_device(report):
    assert report["unsharded_load_max_diff"] == 0.0
    assert report["unsharded_load_kernel_shards"] == [
        [report["rows"], report["dim"]]
    ]


@pytest.mark.jax
def test_sampling_keeps_rows_of_every_shard_and_the_labelled_ones(
    sampled_report,
):
    # C = 4000 on 4 devices: max(int(0.1 · 1000), B = 64) = 100 per shard.
    assert sampled_report["changed_rows_per_shard"] == [100] * DEVICES
    assert sampled_report["labelled_rows_changed"]
    assert sampled_report["rerun_max_diff"] == 0.0
    assert 0.0 < sampled_report["loss"] < 50.0


@pytest.mark.jax
def test_lazy_adam_moves_only_kept_rows_of_every_shard(sampled_report):
    # Keras's Adam would also move the 400 rows kept by the first step.
    moved = sampled_report["lazy_moved_rows_per_shard"]
    assert all(0 < rows <= 100 for rows in moved)
    assert sum(moved) >= 4 * 100 - 8  # a kept row's gradient may be 0
    assert sampled_report["lazy_labelled_rows_moved"]
    shard = [4000 // DEVICES, 32]
    assert sampled_report["lazy_slot_shards"] == [[shard] * DEVICES] * 2


@pytest.mark.jax
def test_sampled_step_exchanges_no_class_rows(sampled_report):
    batch, classes = 64, 4000
    for op, shapes in sampled_report["collectives"]:
        for shape in shapes:
            dims = _dims(shape)
            if dims[0] == batch:
                continue
            # The draw's scores, one float per class: the only collective
            # that is not per sample.
            assert (op, shape) == ("all-gather", f"f32[{DEVICES},"
                                   f"{classes // DEVICES}]")
    assert sampled_report["full_kernel_arrays"] == 0
    assert sampled_report["shard_arrays"] > 0
