"""Tests of `keras_lsoftmax.schedules`: values, tensors, config, validation."""

import json
import math
import re
from decimal import Decimal

import keras
import numpy as np
import pytest

import keras_lsoftmax  # noqa: F401 (registers the serializable classes)
from keras_lsoftmax import schedules

STEPS = (1, 1000, 2000, 5000, 7500, 10000, 12000, 15000, 20000, 30000)

# λ from the authors' Caffe settings, as printed in the reference table
# (lsoftmax-caffe-reference.md §4): (base, gamma, power) -> values at STEPS.
CAFFE_TABLE = {
    "mnist": (
        (1000.0, 2.5e-5, 35.0),
        "999.1 421.4 181.3 16.21 2.442 0.406 0.103 0.0144 6.9e-4 3.1e-6",
    ),
    "cifar10": (
        (1000.0, 2e-5, 45.0),
        "999.1 410.2 171.2 13.72 1.856 0.273 0.0625 0.0075 2.7e-4 6.5e-7",
    ),
    "cifar10+": (
        (1000.0, 1e-5, 45.0),
        "999.6 639.1 410.2 111.3 38.6 13.72 6.10 1.856 0.273 0.0075",
    ),
}


def half_unit_in_last_place(printed: str) -> float:
    """Half a unit in the last printed digit: '16.21' -> 0.005."""
    exponent = Decimal(printed).as_tuple().exponent
    return float(Decimal(1).scaleb(exponent)) / 2


@pytest.mark.parametrize("data", sorted(CAFFE_TABLE))
def test_inverse_decay_matches_caffe_table(data):
    args, printed_row = CAFFE_TABLE[data]
    schedule = schedules.InverseDecay(*args, minimum=0.0)
    for step, printed in zip(STEPS, printed_row.split()):
        value = float(schedule(step))
        tolerance = half_unit_in_last_place(printed)
        if data == "cifar10+" and step == 1:
            # The exact value is 999.55010, which float32 (as Caffe's powf)
            # gives as 999.5495: on the rounding boundary of the table.
            tolerance += 1e-6 * 1000
        assert abs(value - float(printed)) <= tolerance, (data, step, value)


def test_inverse_decay_cifar10_issue_10_log():
    # wy1iu/LargeMargin_Softmax_Loss#10 logged λ = 0.0624753 at iteration
    # 12000 with the cifar10 settings.
    schedule = schedules.InverseDecay(1000.0, 2e-5, 45.0)
    assert float(schedule(1)) == pytest.approx(999.1, abs=0.05)
    assert float(schedule(12000)) == pytest.approx(0.0625, abs=5e-5)
    assert float(schedule(12000)) == pytest.approx(0.0624753, rel=1e-3, abs=1e-6)


def test_inverse_decay_floor_sphereface():
    # wy1iu/sphereface: base 1000, gamma 0.12, power 1, lambda_min 5.
    schedule = schedules.InverseDecay(1000.0, 0.12, 1.0, minimum=5.0)
    assert float(schedule(1)) == pytest.approx(892.857, rel=1e-5, abs=1e-6)
    assert float(schedule(100)) == pytest.approx(76.923, rel=1e-5, abs=1e-6)
    assert float(schedule(1000)) == pytest.approx(8.2645, rel=1e-5, abs=1e-6)
    assert float(schedule(1659)) == 5.0
    assert float(schedule(10**6)) == 5.0


def test_inverse_decay_degenerate_settings():
    assert float(schedules.InverseDecay(0.0, 1.0, 1.0)(10)) == 0.0
    assert float(schedules.InverseDecay(0.0, 1.0, 1.0, minimum=2.0)(10)) == 2.0
    assert float(schedules.InverseDecay(7.0, 0.0, 35.0)(10**5)) == 7.0
    assert float(schedules.InverseDecay(7.0, 0.5, 0.0)(10**5)) == 7.0
    assert float(schedules.InverseDecay(1000.0, 2.5e-5, 35.0)(0)) == 1000.0


def test_exponential_decay_values():
    schedule = schedules.ExponentialDecay(100.0, 0.99)
    for step in (0, 1, 2, 100, 1000):
        assert float(schedule(step)) == pytest.approx(
            100.0 * 0.99**step, rel=1e-5, abs=1e-9  # down to 4.3e-3
        )
    every_ten = schedules.ExponentialDecay(8.0, 0.5, decay_steps=10)
    assert float(every_ten(10)) == pytest.approx(4.0, rel=1e-6, abs=1e-6)
    assert float(every_ten(25)) == pytest.approx(8.0 * 0.5**2.5, rel=1e-6, abs=1e-6)
    floored = schedules.ExponentialDecay(1000.0, 0.99, minimum=5.0)
    assert float(floored(100)) == pytest.approx(1000.0 * 0.99**100, rel=1e-5, abs=1e-6)
    assert float(floored(10**4)) == 5.0
    assert float(schedules.ExponentialDecay(3.0, 1.0)(10**6)) == 3.0


def test_constant():
    schedule = schedules.Constant(2.5)
    assert float(schedule(0)) == 2.5
    assert float(schedule(10**7)) == 2.5
    assert float(schedules.Constant(0)(3)) == 0.0


# Their values at the steps below are >= 0.5: an absolute tolerance of
# 1e-7 is a floor for float32 that never loosens the relative 1e-6.
ALL_SCHEDULES = [
    schedules.InverseDecay(1000.0, 2.5e-5, 35.0),
    schedules.InverseDecay(1000.0, 0.12, 1.0, minimum=5.0),
    schedules.ExponentialDecay(100.0, 0.99, decay_steps=2, minimum=0.5),
    schedules.Constant(3.0),
]


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=repr)
def test_step_types_and_output(schedule):
    expected = float(schedule(1000))
    for step in (
        1000,
        1000.0,
        np.int64(1000),
        keras.ops.convert_to_tensor(1000),
        keras.ops.convert_to_tensor(1000, "int64"),
        keras.ops.convert_to_tensor(1000.0),
        keras.Variable(1000, dtype="int64", trainable=False),
    ):
        value = schedule(step)
        assert keras.ops.dtype(value) == "float32"
        assert tuple(value.shape) == ()
        assert float(value) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    steps = [1, 1000, 5000]
    values = keras.ops.convert_to_numpy(
        schedule(keras.ops.convert_to_tensor(steps, "int64"))
    )
    assert values.shape == (3,)
    np.testing.assert_allclose(
        values, [float(schedule(s)) for s in steps], rtol=1e-6, atol=1e-7
    )


@pytest.mark.tensorflow  # counts tf.function traces
@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=repr)
def test_inside_tf_function(schedule):
    import tensorflow as tf

    iterations = tf.Variable(0, dtype=tf.int64)

    @tf.function
    def next_lambda():
        iterations.assign_add(1)
        return schedule(iterations)

    traced = [float(next_lambda()) for _ in range(3)]
    assert traced == pytest.approx(
        [float(schedule(t)) for t in (1, 2, 3)], rel=1e-6, abs=1e-7
    )
    assert next_lambda.experimental_get_tracing_count() == 1
    assert float(tf.function(schedule)(tf.constant(1000))) == pytest.approx(
        float(schedule(1000)), rel=1e-6, abs=1e-7
    )


@pytest.mark.jax  # counts jax.jit traces
@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=repr)
def test_inside_jax_jit(schedule):
    import jax

    traces = []

    @jax.jit
    def at(step):
        traces.append(step)
        return schedule(step)

    steps = (1, 2, 1000)
    traced = [float(at(jax.numpy.asarray(t, "int32"))) for t in steps]
    assert traced == pytest.approx(
        [float(schedule(t)) for t in steps], rel=1e-6, abs=1e-7
    )
    assert len(traces) == 1


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=repr)
def test_config_round_trip(schedule):
    config = schedule.get_config()
    json.dumps(config)
    rebuilt = type(schedule).from_config(config)
    assert rebuilt.get_config() == config

    serialized = keras.saving.serialize_keras_object(schedule)
    assert serialized["registered_name"] == (
        f"keras_lsoftmax>{type(schedule).__name__}"
    )
    restored = keras.saving.deserialize_keras_object(
        json.loads(json.dumps(serialized))
    )
    assert type(restored) is type(schedule)
    assert restored.get_config() == config
    assert repr(restored) == repr(schedule)
    for step in (1, 1000, 30000):
        assert float(restored(step)) == float(schedule(step))


def test_config_values_are_floats():
    config = schedules.InverseDecay(1000, 0, 35, minimum=5).get_config()
    assert config == {
        "base": 1000.0,
        "gamma": 0.0,
        "power": 35.0,
        "minimum": 5.0,
    }
    assert all(type(value) is float for value in config.values())
    assert schedules.ExponentialDecay(10, 0.5).get_config() == {
        "initial": 10.0,
        "decay_rate": 0.5,
        "decay_steps": 1.0,
        "minimum": 0.0,
    }


@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (schedules.InverseDecay, {"base": -1.0}, "base"),
        (schedules.InverseDecay, {"gamma": -1e-5}, "gamma"),
        (schedules.InverseDecay, {"power": -1.0}, "power"),
        (schedules.InverseDecay, {"minimum": -0.5}, "minimum"),
        (schedules.InverseDecay, {"base": math.inf}, "base"),
        (schedules.InverseDecay, {"gamma": math.nan}, "gamma"),
        (schedules.InverseDecay, {"power": "35"}, "power"),
        (schedules.InverseDecay, {"base": None}, "base"),
        (schedules.InverseDecay, {"minimum": True}, "minimum"),
        (schedules.ExponentialDecay, {"initial": -1.0}, "initial"),
        (schedules.ExponentialDecay, {"decay_rate": 0.0}, "decay_rate"),
        (schedules.ExponentialDecay, {"decay_rate": 1.01}, "decay_rate"),
        (schedules.ExponentialDecay, {"decay_rate": -0.5}, "decay_rate"),
        (schedules.ExponentialDecay, {"decay_steps": 0}, "decay_steps"),
        (schedules.ExponentialDecay, {"decay_steps": -3}, "decay_steps"),
        (schedules.ExponentialDecay, {"decay_steps": [1]}, "decay_steps"),
        (schedules.ExponentialDecay, {"minimum": -1.0}, "minimum"),
        (schedules.Constant, {"value": -1.0}, "value"),
        (schedules.Constant, {"value": math.inf}, "value"),
        (schedules.Constant, {"value": "1"}, "value"),
    ],
)
def test_invalid_arguments(cls, kwargs, name):
    defaults = {
        schedules.InverseDecay: {"base": 1000.0, "gamma": 1e-5, "power": 35.0},
        schedules.ExponentialDecay: {"initial": 100.0, "decay_rate": 0.99},
        schedules.Constant: {"value": 1.0},
    }[cls]
    received = re.escape(f"{name}={kwargs[name]!r}")
    with pytest.raises(ValueError, match=rf"`{name}`.*{received}"):
        cls(**{**defaults, **kwargs})


def test_numpy_numbers_are_accepted():
    schedule = schedules.InverseDecay(
        np.float32(1000.0), np.float64(2.5e-5), np.int64(35)
    )
    assert schedule.get_config() == {
        "base": 1000.0,
        "gamma": 2.5e-5,
        "power": 35.0,
        "minimum": 0.0,
    }


def test_base_class_must_be_overridden():
    class Incomplete(schedules.LambdaSchedule):
        pass

    with pytest.raises(NotImplementedError, match="__call__"):
        Incomplete()(1)
    with pytest.raises(NotImplementedError, match="get_config"):
        Incomplete().get_config()
    assert repr(Incomplete()) == "<Incomplete>"


def test_custom_subclass_from_config():
    class Halving(schedules.LambdaSchedule):
        def __init__(self, initial, steps):
            self.initial = initial
            self.steps = steps

        def __call__(self, step):
            step = keras.ops.cast(step, "float32")
            return self.initial * keras.ops.power(
                0.5, keras.ops.floor(step / self.steps)
            )

        def get_config(self):
            return {"initial": self.initial, "steps": self.steps}

    schedule = Halving.from_config({"initial": 8.0, "steps": 10})
    assert float(schedule(25)) == 2.0
    assert repr(schedule) == "Halving(initial=8.0, steps=10)"


@pytest.mark.parametrize("total_steps", [10, 1000, 123456])
def test_auto_schedule_crosses_one_at_30_percent_of_the_run(total_steps):
    schedule = schedules.auto_schedule(total_steps)
    assert (schedule.base, schedule.power, schedule.minimum) == (1000.0, 35.0, 2.0)
    unfloored = schedules.InverseDecay(1000.0, schedule.gamma, 35.0)
    assert float(unfloored(0.3 * total_steps)) == pytest.approx(1.0, rel=1e-4)
    assert float(schedule(0)) == pytest.approx(1000.0, rel=1e-6)
    assert float(schedule(total_steps)) == 2.0


def test_auto_schedule_of_unknown_length_is_the_mnist_setting():
    schedule = schedules.auto_schedule(None)
    assert schedule.get_config() == {
        "base": 1000.0,
        "gamma": 2.5e-5,
        "power": 35.0,
        "minimum": 2.0,
    }


@pytest.mark.parametrize("total_steps", [0, -5, 2.5, True, "100"])
def test_auto_schedule_rejects_invalid_lengths(total_steps):
    with pytest.raises(ValueError, match=re.escape(f"total_steps={total_steps!r}")):
        schedules.auto_schedule(total_steps)
