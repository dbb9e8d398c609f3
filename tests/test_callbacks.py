"""Tests of `keras_lsoftmax.LambdaScheduler` in real `fit` runs."""

import math
import os
import warnings

import keras
import numpy as np
import pytest

import keras_lsoftmax
from keras_lsoftmax import LSoftmaxDense
from keras_lsoftmax import schedules
from keras_lsoftmax.callbacks import LambdaScheduler
from keras_lsoftmax.layers import find_margin_heads
from tests.datasets import random_classification

BACKEND = keras.backend.backend()
D, C = 6, 3  # features, classes
N, BATCH = 32, 8  # 4 steps per epoch
STEPS_PER_EPOCH = N // BATCH

# Moves every step, so an off-by-one step shows.
FAST = schedules.InverseDecay(1000.0, 0.05, 1.0)

# Python side effect of `call`: runs once per trace, not per step.
TRACES = {"count": 0}


class TraceCounter(keras.layers.Layer):
    """Identity layer that counts how often its `call` runs."""

    def call(self, inputs):
        TRACES["count"] += 1
        return inputs


def _data(seed=0):
    return random_classification(N, D, C, seed)


def _model(
    steps_per_execution=1, head_name="head", traced=False, optimizer=None
):
    """A compiled model; `traced`: with a TraceCounter, and jit on JAX.

    `optimizer` defaults to `keras.optimizers.SGD(0.01)`.
    """
    keras.utils.set_random_seed(0)
    layers = [keras.Input((D,)), keras.layers.Dense(8, activation="relu")]
    if traced:
        layers.append(TraceCounter())
    layers.append(
        LSoftmaxDense(C, margin=2, initial_lambda=1.0, name=head_name)
    )
    model = keras_lsoftmax.Sequential(layers)
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=steps_per_execution,
        # TensorFlow always traces the train function (tf.function; no XLA,
        # so that CPU and GPU runs trace alike). JAX traces it only under
        # jit, for the tests about traced steps; eagerly it runs these few
        # steps faster. PyTorch runs eagerly.
        jit_compile=BACKEND == "jax" and traced,
    )
    return model


def _fit(model, epochs=1, callbacks=(), batch_size=BATCH):
    x, y = _data()
    return model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    )


def _lam(layer):
    return float(np.asarray(layer.lambda_))


def _f32(value):
    return float(np.float32(value))


class Probe(keras.callbacks.Callback):
    """Records (step, λ) after each batch and (traces, λ) after each epoch.

    λ is read after the batch: a `LambdaSchedule` sets it inside the step.
    """

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.batches = []
        self.epochs = []

    def _step_and_lambda(self):
        # Reading `self.model` first puts the state of a running JAX `fit`
        # back into the variables.
        model = self.model
        return int(np.asarray(model.optimizer.iterations)), _lam(self.layer)

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append(self._step_and_lambda())

    def on_epoch_end(self, epoch, logs=None):
        _, lam = self._step_and_lambda()
        self.epochs.append((TRACES["count"], lam))


def test_step_mode_follows_the_optimizer_step():
    model = _model()
    head = model.get_layer("head")
    probe = Probe(head)
    history = _fit(model, epochs=2, callbacks=[LambdaScheduler(FAST), probe])
    n = 2 * STEPS_PER_EPOCH
    assert int(model.optimizer.iterations) == n
    # Batch k (1-based) ran with λ = schedule(k): the first step uses t = 1.
    assert probe.batches == [(k, _f32(FAST(k))) for k in range(1, n + 1)]
    assert _lam(head) == _f32(FAST(n))
    assert history.history["lsoftmax_lambda"] == pytest.approx(
        [float(FAST(STEPS_PER_EPOCH)), float(FAST(n))], rel=1e-6, abs=1e-6
    )


# Moves every step, and slowly enough that float32 keeps steps apart.
ANNEALING = schedules.InverseDecay(1000.0, 0.5, 2.0)


def _approx(values):
    return pytest.approx(values, rel=1e-6, abs=1e-6)


def _accumulating_sgd():
    return keras.optimizers.SGD(0.05, gradient_accumulation_steps=2)


def test_gradient_accumulation_counts_applied_updates():
    # traced: jax.jit on JAX, whose step reads the counter in its state.
    model = _model(traced=True, optimizer=_accumulating_sgd())
    probe = Probe(model.get_layer("head"))
    history = _fit(
        model, epochs=2, callbacks=[LambdaScheduler(ANNEALING), probe]
    )
    # Batches 2u - 1 and 2u make update u, both with λ = schedule(u).
    batches = range(1, 2 * STEPS_PER_EPOCH + 1)
    assert [step for step, _ in probe.batches] == [k // 2 for k in batches]
    assert [lam for _, lam in probe.batches] == _approx(
        [float(ANNEALING((k + 1) // 2)) for k in batches]
    )
    updates = STEPS_PER_EPOCH // 2
    assert history.history["lsoftmax_lambda"] == _approx(
        [float(ANNEALING(updates)), float(ANNEALING(2 * updates))]
    )
    # The same run with batches twice as large and no accumulation.
    doubled = _fit(
        _model(traced=True, optimizer=keras.optimizers.SGD(0.05)),
        epochs=2,
        callbacks=[LambdaScheduler(ANNEALING)],
        batch_size=2 * BATCH,
    )
    assert history.history["lsoftmax_lambda"] == _approx(
        doubled.history["lsoftmax_lambda"]
    )


@pytest.mark.parametrize(
    "steps_per_execution",
    [
        1,
        pytest.param(
            2,
            marks=pytest.mark.skipif(
                BACKEND == "torch",
                reason="Keras on PyTorch accepts steps_per_execution=1 only",
            ),
        ),
    ],
)
def test_recompiled_model_follows_the_new_optimizer(steps_per_execution):
    model = _model(traced=True)
    _fit(model, callbacks=[LambdaScheduler(ANNEALING)])
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=steps_per_execution,
        jit_compile=BACKEND == "jax",
    )
    probe = Probe(model.get_layer("head"))
    history = _fit(
        model, epochs=2, callbacks=[LambdaScheduler(ANNEALING), probe]
    )
    # The new optimizer starts from step 0; `fit` calls the batch hooks
    # once per execution of `steps_per_execution` steps.
    ends = range(
        steps_per_execution, 2 * STEPS_PER_EPOCH + 1, steps_per_execution
    )
    assert [step for step, _ in probe.batches] == list(ends)
    assert [lam for _, lam in probe.batches] == _approx(
        [float(ANNEALING(k)) for k in ends]
    )
    assert history.history["lsoftmax_lambda"] == _approx(
        [
            float(ANNEALING(STEPS_PER_EPOCH)),
            float(ANNEALING(2 * STEPS_PER_EPOCH)),
        ]
    )


@pytest.mark.parametrize("accumulation", [None, 2])
def test_loaded_model_follows_the_restored_optimizer(tmp_path, accumulation):
    x, y = _data()
    fit_args = dict(batch_size=BATCH, shuffle=False, verbose=0)
    optimizer = keras.optimizers.SGD(
        0.05, gradient_accumulation_steps=accumulation
    )
    first = _model(optimizer=optimizer)
    first.fit(
        x, y, epochs=1, callbacks=[LambdaScheduler(ANNEALING)], **fit_args
    )
    path = os.path.join(tmp_path, "model.keras")
    first.save(path)
    resumed = keras.saving.load_model(path)
    probe = Probe(resumed.get_layer("head"))
    history = resumed.fit(
        x,
        y,
        epochs=2,
        initial_epoch=1,
        callbacks=[LambdaScheduler(ANNEALING), probe],
        **fit_args,
    )
    per_update = accumulation or 1
    batches = range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1)
    assert [step for step, _ in probe.batches] == [
        k // per_update for k in batches
    ]
    # Batch k belongs to update ceil(k / per_update).
    assert [lam for _, lam in probe.batches] == _approx(
        [float(ANNEALING(-(-k // per_update))) for k in batches]
    )
    assert history.history["lsoftmax_lambda"] == _approx(
        [float(ANNEALING(2 * STEPS_PER_EPOCH // per_update))]
    )


@pytest.mark.tensorflow
@pytest.mark.jax  # the backends that trace (see `_model`)
def test_lambda_changes_do_not_retrace():
    model = _model(traced=True)
    head = model.get_layer("head")
    probe = Probe(head)
    TRACES["count"] = 0
    _fit(model, epochs=3, callbacks=[LambdaScheduler(FAST), probe])
    counts = [count for count, _ in probe.epochs]
    lambdas = [lam for _, lam in probe.epochs]
    assert counts[0] >= 1
    assert counts == [counts[0]] * 3, counts
    assert len(set(lam for _, lam in probe.batches)) == 3 * STEPS_PER_EPOCH
    assert lambdas[-1] == _f32(FAST(3 * STEPS_PER_EPOCH))


@pytest.mark.tensorflow
@pytest.mark.jax  # the backends that trace (see `_model`)
def test_schedule_stays_attached_and_a_second_fit_does_not_retrace():
    model = _model(traced=True)
    head = model.get_layer("head")
    scheduler = LambdaScheduler(FAST)
    _fit(model, callbacks=[scheduler])
    assert head.lambda_schedule is FAST
    traces = TRACES["count"]
    probe = Probe(head)
    _fit(model, callbacks=[scheduler, probe])
    assert TRACES["count"] == traces
    # The schedule goes on from the optimizer's step.
    steps = range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1)
    assert probe.batches == [(k, _f32(FAST(k))) for k in steps]


def test_set_lambda_after_a_scheduled_fit_detaches_the_schedule():
    model = _model(traced=True)
    head = model.get_layer("head")
    _fit(model, callbacks=[LambdaScheduler(FAST)])
    head.set_lambda(2.5)
    assert head.lambda_schedule is None
    probe = Probe(head)
    history = _fit(model, callbacks=[probe])
    # A train function traced with the schedule would still move λ.
    steps = range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1)
    assert probe.batches == [(k, 2.5) for k in steps]
    assert history.history["lsoftmax_lambda"] == [2.5]


def test_custom_loop_follows_the_attached_schedule():
    model = _model()
    head = model.get_layer("head")
    _fit(model, callbacks=[LambdaScheduler(FAST)])
    x, y = _data()
    iterations = model.optimizer.iterations
    for step in range(STEPS_PER_EPOCH + 1, STEPS_PER_EPOCH + 4):
        with keras_lsoftmax.label_scope(y[:BATCH]) as scope:
            model(x[:BATCH], training=True)
        # λ = schedule(iterations + 1), read from the optimizer's counter.
        assert _lam(head) == _f32(FAST(step))
        assert float(np.asarray(scope.records[0].lam)) == _f32(FAST(step))
        # What the optimizer step of a real loop does to the counter.
        iterations.assign_add(1)


def test_python_callable_runs_on_the_host_before_each_batch():
    calls = []

    def schedule(step):
        calls.append(step)
        return 100.0 / step

    model = _model()
    head = model.get_layer("head")
    probe = Probe(head)
    _fit(model, callbacks=[LambdaScheduler(schedule), probe])
    assert calls == list(range(1, STEPS_PER_EPOCH + 1))
    assert head.lambda_schedule is None
    expected = [(k, _f32(100.0 / k)) for k in range(1, STEPS_PER_EPOCH + 1)]
    assert probe.batches == expected


@pytest.mark.tensorflow
@pytest.mark.jax  # PyTorch allows steps_per_execution=1 only
def test_python_callable_and_steps_per_execution():
    calls = []

    def schedule(step):
        calls.append(step)
        return 100.0 / step

    model = _model(steps_per_execution=2)
    head = model.get_layer("head")
    _fit(model, callbacks=[LambdaScheduler(schedule)])
    # 4 steps in 2 executions: λ is set before each execution only.
    assert calls == [1, 3]
    assert int(model.optimizer.iterations) == 4
    assert _lam(head) == _f32(100.0 / 3)


def test_epoch_mode(capsys):
    model = _model()
    head = model.get_layer("head")
    probe = Probe(head)
    schedule = schedules.ExponentialDecay(8.0, 0.5)
    history = _fit(
        model,
        epochs=3,
        callbacks=[LambdaScheduler(schedule, unit="epoch", verbose=1), probe],
    )
    # Every step of epoch e (0-based) ran with λ = schedule(e).
    per_epoch = [8.0, 4.0, 2.0]
    assert [lam for _, lam in probe.batches] == [
        lam for lam in per_epoch for _ in range(STEPS_PER_EPOCH)
    ]
    assert history.history["lsoftmax_lambda"] == per_epoch
    assert _lam(head) == 2.0
    out = capsys.readouterr().out
    assert "Epoch 1: LambdaScheduler setting lambda to 8." in out
    assert "Epoch 3: LambdaScheduler setting lambda to 2." in out


def test_step_mode_verbose(capsys):
    _fit(_model(), callbacks=[LambdaScheduler(FAST, verbose=1)])
    expected = f"{float(FAST(STEPS_PER_EPOCH)):.6g}"
    assert (
        f"Epoch 1: LambdaScheduler lambda is {expected} (step 4)."
        in capsys.readouterr().out
    )


@pytest.mark.parametrize("unit", ["step", "epoch"])
def test_resume_from_keras_file_continues_the_schedule(tmp_path, unit):
    x, y = _data()
    fit_args = dict(batch_size=BATCH, shuffle=False, verbose=0)

    uninterrupted = _model()
    uninterrupted.fit(
        x, y, epochs=2, callbacks=[LambdaScheduler(FAST, unit=unit)], **fit_args
    )
    expected = _lam(uninterrupted.get_layer("head"))

    first = _model()
    first.fit(
        x, y, epochs=1, callbacks=[LambdaScheduler(FAST, unit=unit)], **fit_args
    )
    path = os.path.join(tmp_path, "model.keras")
    first.save(path)
    resumed = keras.saving.load_model(path)
    assert int(resumed.optimizer.iterations) == STEPS_PER_EPOCH
    history = resumed.fit(
        x,
        y,
        epochs=2,
        initial_epoch=1,
        callbacks=[LambdaScheduler(FAST, unit=unit)],
        **fit_args,
    )
    head = resumed.get_layer("head")
    assert int(resumed.optimizer.iterations) == 2 * STEPS_PER_EPOCH
    assert _lam(head) == expected
    at = 2 * STEPS_PER_EPOCH if unit == "step" else 1
    assert expected == _f32(FAST(at))
    assert history.history["lsoftmax_lambda"] == [expected]


def test_resume_with_backup_and_restore(tmp_path):
    x, y = _data()
    fit_args = dict(batch_size=BATCH, shuffle=False, verbose=0, epochs=3)
    backup_dir = os.path.join(tmp_path, "backup")

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        _model().fit(
            x,
            y,
            callbacks=[
                keras.callbacks.BackupAndRestore(backup_dir),
                LambdaScheduler(FAST),
                Interrupt(),
            ],
            **fit_args,
        )
    model = _model()
    history = model.fit(
        x,
        y,
        callbacks=[
            keras.callbacks.BackupAndRestore(backup_dir),
            LambdaScheduler(FAST),
        ],
        **fit_args,
    )
    n = 3 * STEPS_PER_EPOCH
    assert int(model.optimizer.iterations) == n
    assert _lam(model.get_layer("head")) == _f32(FAST(n))
    assert history.history["lsoftmax_lambda"] == [_f32(FAST(n))]


def test_bad_schedule_value_stops_fit_and_is_not_assigned():
    def schedule(step):
        return 10.0 / step if step < 3 else -1.0

    model = _model()
    head = model.get_layer("head")
    x, y = _data()
    with pytest.raises(ValueError, match=r"returned -1.0 at step 3"):
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=1,
            verbose=0,
            callbacks=[LambdaScheduler(schedule)],
        )
    assert int(model.optimizer.iterations) == 2
    assert _lam(head) == 5.0


# The remaining tests drive the callback's hooks directly: no training.


class Holder(keras.layers.Layer):
    """A plain layer that keeps an `LSoftmaxDense` in a list attribute."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [keras.layers.Dense(4), LSoftmaxDense(C, name="held")]

    def call(self, inputs):
        return self.blocks[1](self.blocks[0](inputs))


def _nested_model():
    keras.utils.set_random_seed(0)
    inner = keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(4),
            LSoftmaxDense(C, initial_lambda=1.0, name="inner_head"),
        ],
        name="inner",
    )
    inputs = keras.Input((D,))
    hidden = inner(inputs)
    outputs = LSoftmaxDense(C, initial_lambda=1.0, name="outer_head")(hidden)
    held = Holder(name="holder")(inputs)
    model = keras_lsoftmax.Model(inputs, [outputs, held])
    model.compile(optimizer="sgd")
    return model


def _start(callback, model):
    callback.set_model(model)
    callback.on_train_begin()
    return callback


def test_finds_nested_layers():
    model = _nested_model()
    names = [layer.name for layer in find_margin_heads(model)]
    assert sorted(names) == ["held", "inner_head", "outer_head"]
    schedule = schedules.Constant(7.0)
    _start(LambdaScheduler(schedule), model)
    heads = find_margin_heads(model)
    assert [layer.lambda_schedule for layer in heads] == [schedule] * 3
    _train_heads(model)
    assert [_lam(layer) for layer in heads] == [7.0] * 3


def _train_heads(model):
    """One forward pass in training mode, as a train step makes it."""
    x = np.zeros((2, D), "float32")
    with keras_lsoftmax.label_scope(np.zeros((2,), "int32")):
        model(x, training=True)


def test_step_mode_uses_iterations_plus_one():
    model = _nested_model()
    model.optimizer.iterations.assign(41)
    callback = _start(LambdaScheduler(FAST), model)
    _train_heads(model)
    head = model.get_layer("outer_head")
    assert _lam(head) == _f32(FAST(42))
    logs = {}
    callback.on_epoch_end(0, logs)
    assert logs == {"lsoftmax_lambda": _f32(FAST(42))}


def test_layer_name_selects_one_layer():
    model = _nested_model()
    callback = _start(
        LambdaScheduler(
            schedules.Constant(7.0), unit="epoch", layer_name="inner_head"
        ),
        model,
    )
    callback.on_epoch_begin(0)
    lambdas = {layer.name: _lam(layer) for layer in find_margin_heads(model)}
    assert lambdas == {"inner_head": 7.0, "outer_head": 1.0, "held": 0.0}


def test_unknown_layer_name():
    callback = LambdaScheduler(FAST, layer_name="nope")
    with pytest.raises(
        ValueError,
        match=r"no LSoftmaxDense layer named 'nope'.*"
        r"Available LSoftmaxDense layers: \['.*'\]",
    ) as info:
        _start(callback, _nested_model())
    for name in ("inner_head", "outer_head", "held"):
        assert f"'{name}'" in str(info.value)


def test_model_without_lsoftmax_layer():
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(C)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="found no LSoftmaxDense layer"):
        _start(LambdaScheduler(FAST), model)
    x, y = _data()
    with pytest.raises(ValueError, match="found no LSoftmaxDense layer"):
        model.fit(
            x, np.zeros((N, C)), verbose=0, callbacks=[LambdaScheduler(FAST)]
        )


def test_step_mode_needs_an_optimizer():
    model = keras.Sequential([keras.Input((D,)), LSoftmaxDense(C)])
    with pytest.raises(ValueError, match="has no optimizer"):
        _start(LambdaScheduler(FAST), model)
    # The epoch mode does not read the step.
    callback = _start(LambdaScheduler(FAST, unit="epoch"), model)
    callback.on_epoch_begin(0)
    assert _lam(model.layers[-1]) == 1000.0


@pytest.mark.parametrize(
    "output",
    [-1.0, math.nan, math.inf, -math.inf, None, "1.0", True, [1.0, 2.0]],
    ids=repr,
)
def test_invalid_schedule_output(output):
    model = _nested_model()
    callback = _start(LambdaScheduler(lambda step: output), model)
    with pytest.raises(ValueError, match=r"schedule .* returned .* at step 1"):
        callback.on_train_batch_begin(0)
    assert _lam(model.get_layer("outer_head")) == 1.0


@pytest.mark.parametrize(
    "output", [3, 3.0, np.float64(3.0), np.int32(3), np.array([3.0])], ids=repr
)
def test_accepted_schedule_outputs(output):
    model = _nested_model()
    callback = _start(LambdaScheduler(lambda step: output), model)
    callback.on_train_batch_begin(0)
    assert _lam(model.get_layer("outer_head")) == 3.0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"schedule": 3.0}, "schedule"),
        ({"unit": "batch"}, "unit"),
        ({"layer_name": 3}, "layer_name"),
        ({"verbose": 2}, "verbose"),
        ({"verbose": True}, "verbose"),
    ],
)
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=rf"`{name}`.*Received: {name}="):
        LambdaScheduler(**{"schedule": FAST, **kwargs})


def test_set_model_forgets_the_previous_model():
    callback = _start(LambdaScheduler(schedules.Constant(2.0)), _nested_model())
    other = _model()
    _start(callback, other)
    assert other.get_layer("head").lambda_schedule is callback.schedule


# ------------------------------------------- the layer's own λ schedule


def _default_model(**head_kwargs):
    keras.utils.set_random_seed(0)
    model = keras_lsoftmax.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(8, activation="relu"),
            LSoftmaxDense(C, margin=2, name="head", **head_kwargs),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _lambda_warnings(model, **fit_kwargs):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = _fit(model, **fit_kwargs)
    return history, [str(w.message) for w in record if "λ=" in str(w.message)]


def test_lambda_scheduler_overrides_the_layer_schedule():
    model = _default_model()
    head = model.get_layer("head")
    history = _fit(model, epochs=2, callbacks=[LambdaScheduler(FAST)])
    assert head.lambda_schedule is FAST
    steps = [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert history.history["lsoftmax_lambda"] == [_f32(FAST(s)) for s in steps]
    # The layer keeps its own (resolved) schedule for when set_lambda
    # detaches the scheduler's.
    head.set_lambda(4.0)
    assert _fit(model).history["lsoftmax_lambda"] == [4.0]


def test_constant_lambda_below_one_warns_at_fit():
    model = _default_model(lambda_schedule=0.0)
    _, messages = _lambda_warnings(model)
    assert len(messages) == 1
    assert "LSoftmaxDense 'head'" in messages[0] and "λ=0" in messages[0]
    assert 'lambda_schedule="auto"' in messages[0]
    # A second fit continues a run: fine-tuning at λ = 0 is a recipe.
    _, messages = _lambda_warnings(model)
    assert messages == []


@pytest.mark.parametrize(
    "head_kwargs, callbacks",
    [
        ({}, ()),
        ({"lambda_schedule": 1.0}, ()),
        ({"lambda_schedule": 0.0}, (LambdaScheduler(FAST),)),
    ],
    ids=["auto", "constant-1", "scheduler"],
)
def test_annealed_or_large_lambda_does_not_warn(head_kwargs, callbacks):
    model = _default_model(**head_kwargs)
    _, messages = _lambda_warnings(model, callbacks=callbacks)
    assert messages == []


# ------------------------------------------------- collapse of the logits


class ZeroFeatures(keras.callbacks.Callback):
    """Zeroes the ReLU feature layer after the first epoch.

    From then on every feature, so every logit, is 0 and gets no gradient:
    the state a collapsed run ends in, reached in one step.
    """

    def on_epoch_end(self, epoch, logs=None):
        # Reading `self.model` puts a running JAX fit's state back into the
        # variables, and the next epoch starts from them.
        features = self.model.layers[0]
        if epoch == 0:
            for weight in features.weights:
                weight.assign(keras.ops.zeros(weight.shape))


def _collapse_warnings(model, callbacks=(), epochs=4):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = _fit(model, epochs=epochs, callbacks=callbacks)
    return history, [str(w.message) for w in record if "log C" in str(w.message)]


def test_collapsed_logits_warn_once():
    # λ = 1 from the start: the margin logit puts the first epoch's loss
    # well above log C, as the margin does before a collapse.
    model = _default_model(lambda_schedule=1.0)
    history, messages = _collapse_warnings(model, [ZeroFeatures()], epochs=5)
    losses = history.history["loss"]
    assert losses[0] > 1.1 * math.log(C)
    np.testing.assert_allclose(losses[1:], math.log(C), rtol=1e-5)
    assert len(messages) == 1
    assert "LSoftmaxDense 'head' (AngularMargin(m=2))" in messages[0]
    assert f"log C = {math.log(C):.4f} (C = {C})" in messages[0]
    assert "epoch 3:" in messages[0] and "θ = 90.0°" in messages[0]
    assert "lambda_minimum=10" in messages[0]


def test_collapse_of_a_sampling_head_warns():
    keras.utils.set_random_seed(0)
    classes = 40  # S = int(0.1·40) = 4 of them per step, B = 4
    model = keras_lsoftmax.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(8, activation="relu"),
            LSoftmaxDense(
                classes, margin=2, lambda_schedule=1.0, sample_rate=0.1,
                seed=1, name="head",
            ),
        ]
    )  # fmt: skip
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = np.random.default_rng(0).normal(size=(N, D)).astype("float32")
    y = np.arange(N) % classes
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = model.fit(
            x, y, batch_size=4, epochs=4, shuffle=False, verbose=0,
            callbacks=[ZeroFeatures()],
        )  # fmt: skip
    messages = [str(w.message) for w in record if "log S" in str(w.message)]
    np.testing.assert_allclose(history.history["loss"][1:], math.log(4), rtol=1e-5)
    assert len(messages) == 1
    assert "log S = 1.3863 (S = 4 classes kept per step)" in messages[0]
    # 40 classes: the default floor is 10 already, so the advice is higher.
    assert "lambda_minimum=50" in messages[0]


def test_a_run_whose_loss_crosses_log_c_does_not_warn():
    model = _default_model(lambda_schedule=1.0)
    model.compile(
        optimizer=keras.optimizers.SGD(0.3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history, messages = _collapse_warnings(model, epochs=10)
    losses = history.history["loss"]
    # From above log C to below it, as a training margin loss goes.
    assert losses[0] > 1.1 * math.log(C) > math.log(C) > losses[-1]
    assert messages == []
