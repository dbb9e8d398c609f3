"""The training step that `bench_head.py` times, on each Keras backend.

Every backend runs the same step on the same problem:

    logits = head(x, labels=y, training=True)   # head(x) for Dense
    loss = mean sparse softmax cross-entropy of (y, logits)
    grads = gradients of loss w.r.t. [x, kernel]   # [kernel] for frozen x
    SGD(learning_rate=1e-3, momentum=0.9) applies grads

with the backend's own cross-entropy (which makes no one-hot (B, C) tensor):

- TensorFlow: `tf.GradientTape` and `optimizer.apply`, run as
  `tf.function` (jit off) or `tf.function(jit_compile=True)` (jit on);
- JAX: `jax.value_and_grad` of `head.stateless_call` and
  `optimizer.stateless_apply`, run as it is (jit off: op by op, the op's
  own passes are compiled functions of their own) or as one `jax.jit` with
  the state donated, as Keras's JAX trainer does (jit on);
- PyTorch: `loss.backward()` and `optimizer.apply` under `torch.no_grad()`,
  eager (jit off) or through `torch.compile` (jit on), as Keras's PyTorch
  trainer does.

The `autodiff` reference head is written in TensorFlow ops: TensorFlow only.
"""

import functools
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

import keras_lsoftmax
from benchmarks.common import device_scope

BACKEND = keras.backend.backend()

if BACKEND == "tensorflow":
    import tensorflow as tf

    from benchmarks.autodiff_reference import AutodiffLSoftmaxDense
elif BACKEND == "jax":
    import jax
    import jax.numpy as jnp
elif BACKEND == "torch":
    import torch
    import torch._dynamo
    import torch.nn.functional as torch_functional

    # Past its recompile limit Dynamo would run a "compiled" step eagerly
    # without a word; make that an error, which reports the row unavailable.
    torch._dynamo.config.fail_on_recompile_limit_hit = True

# The large-margin family, on every backend: name -> sub-centres K.
FAMILY = {"sphereface": 1, "cosface": 1, "arcface": 1, "arcface_sc3": 3}
# The heads timed by default on each backend; `dense` is the baseline of
# the ratios.
DEFAULT_VARIANTS = {
    "tensorflow": ("dense", "lsoftmax", "autodiff"),
    "jax": ("dense", "lsoftmax"),
    "torch": ("dense", "lsoftmax"),
}
# Every head of each backend: the defaults and the family.
VARIANTS = {
    backend: (*names, *FAMILY) for backend, names in DEFAULT_VARIANTS.items()
}
# At most this many characters of an error say why a step is unavailable.
_REASON_CHARS = 500


class StepUnavailable(RuntimeError):
    """A compiled step this machine cannot build (e.g. `torch.compile`)."""


def memory_device(device: str) -> str:
    """'/GPU:0' or '/job:localhost/device:GPU:0' -> 'GPU:0'."""
    name = device.rsplit("/", 1)[-1]
    if name.lower().startswith("device:"):
        name = name[len("device:"):]
    kind, _, index = name.partition(":")
    return f"{kind.upper()}:{index or 0}"


def allocator_stats_available(device: str | None) -> bool:
    """Whether TensorFlow keeps allocator statistics for `device` (a GPU).

    Only TensorFlow's are read; other backends are probed by RSS or not.
    """
    if BACKEND != "tensorflow" or device is None:
        return False
    try:
        tf.config.experimental.get_memory_info(memory_device(device))
    except (ValueError, RuntimeError):
        return False
    return True


def allocator_extra_bytes(device: str, run: Callable[[], Any]) -> int:
    """Peak bytes TensorFlow's allocator for `device` adds while `run()` runs.

    `get_memory_info(device)["peak"]` after `reset_memory_stats(device)`,
    minus `["current"]` just before the call.
    """
    name = memory_device(device)
    tf.config.experimental.reset_memory_stats(name)
    before = tf.config.experimental.get_memory_info(name)["current"]
    run()
    return tf.config.experimental.get_memory_info(name)["peak"] - before


def runs_on_cpu(device: str | None) -> bool:
    """Whether a tensor made in `device_scope(device)` lives on the CPU."""
    with device_scope(device):
        probe = keras.ops.zeros(())
    if BACKEND == "jax":
        return all(d.platform == "cpu" for d in probe.devices())
    if BACKEND == "torch":
        return probe.device.type == "cpu"
    return "CPU" in probe.device.upper()


def build_head(
    name: str, num_classes: int, margin: int, lam: float
) -> keras.layers.Layer:
    """The head `name` with C = `num_classes` outputs and no bias."""
    if name == "dense":
        return keras.layers.Dense(num_classes, use_bias=False, name="dense")
    if name == "lsoftmax":
        return keras_lsoftmax.LSoftmaxDense(
            num_classes, margin=margin, initial_lambda=lam, name="lsoftmax"
        )
    if name == "autodiff" and BACKEND == "tensorflow":
        return AutodiffLSoftmaxDense(
            num_classes, margin=margin, initial_lambda=lam, name="autodiff"
        )
    # The family at its papers' margins and scale, λ fixed (no annealing).
    if name == "sphereface":
        return keras_lsoftmax.SphereFaceDense(
            num_classes, margin=margin, lambda_schedule=lam, name=name
        )
    if name == "cosface":
        return keras_lsoftmax.CosFaceDense(
            num_classes, lambda_schedule=lam, name=name
        )
    if name in FAMILY:
        return keras_lsoftmax.ArcFaceDense(
            num_classes, sub_centers=FAMILY[name], lambda_schedule=lam,
            name=name,
        )
    raise ValueError(f"unknown variant {name!r} on the {BACKEND} backend")


def _kernel_of(name: str, kernel0: np.ndarray) -> np.ndarray:
    """The kernel of head `name` from the (D, C) Dense kernel `kernel0`.

    Identical weights for all heads: the margin heads store one row per
    class, (C, D); with K sub-centres, row y·K + k is class y's row plus a
    small seeded perturbation, so that the closest sub-centre varies.
    """
    if name in ("dense", "autodiff"):
        return kernel0
    rows = kernel0.T
    sub_centers = FAMILY.get(name, 1)
    if sub_centers == 1:
        return rows
    rng = np.random.default_rng(sub_centers)
    rows = np.repeat(rows, sub_centers, axis=0)
    return rows + 0.1 * np.abs(rows).mean() * rng.standard_normal(
        rows.shape
    ).astype(rows.dtype)


class Variant:
    """One head with its own features, optimizer and step functions.

    The backend subclasses define `steps`, the step as a callable that runs
    one step and returns its loss, keyed by jit (True: compiled), and
    `sync`, which waits for the steps run so far.

    Args:
        name: the head, one of `VARIANTS[BACKEND]`.
        num_classes: C.
        x0: the features (B, D), float32.
        labels: the labels (B,), int32.
        kernel0: the kernel in the (D, C) layout of a Dense kernel.
        features: "trained" (x a trainable variable, gradients w.r.t.
            x and the kernel) or "frozen" (x a constant, kernel only).
        margin: the margin m of the L-Softmax and SphereFace heads.
        lam: λ of the margin heads.
    """

    def __init__(
        self, name: str, num_classes: int, x0: np.ndarray, labels: np.ndarray,
        kernel0: np.ndarray, features: str, margin: int, lam: float,
    ):
        self.name = name
        self.features = features
        self.head = build_head(name, num_classes, margin, lam)
        self.head.build(x0.shape)
        self.head.kernel.assign(_kernel_of(name, kernel0))
        if features == "trained":
            self.x = keras.Variable(x0, trainable=True, name="features")
            self.variables = [self.x, self.head.kernel]
        else:  # frozen: a constant no gradient is taken for
            self.x = keras.ops.convert_to_tensor(x0)
            self.variables = [self.head.kernel]
        self.y = keras.ops.convert_to_tensor(labels)
        self.optimizer = keras.optimizers.SGD(learning_rate=1e-3, momentum=0.9)
        self.optimizer.build(self.variables)
        self.steps: dict[bool, Callable[[], Any]] = {}
        self.unavailable: dict[bool, str] = {}

    def call_kwargs(self, y: Any) -> dict[str, Any]:
        """The head's call arguments besides the features."""
        if self.name == "dense":
            return {}
        return {"labels": y, "training": True}

    def available(self, modes: list[bool]) -> list[bool]:
        """The jit modes of `modes` whose step could be built."""
        return [jit for jit in modes if jit not in self.unavailable]

    def sync(self, loss: Any) -> float:
        """Waits for the steps run so far; returns `loss` as a float."""
        raise NotImplementedError


class TensorFlowVariant(Variant):
    """The step under `tf.GradientTape`, as `tf.function` with and without
    XLA."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)

        def step():
            with tf.GradientTape() as tape:
                logits = self.head(self.x, **self.call_kwargs(self.y))
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(
                        labels=self.y, logits=logits
                    )
                )
            grads = tape.gradient(loss, self.variables)
            self.optimizer.apply(grads, self.variables)
            return loss

        self.steps = {
            True: tf.function(step, jit_compile=True),
            False: tf.function(step, jit_compile=False),
        }

    def sync(self, loss: Any) -> float:
        # Reading the kernel waits for this step's update too (on GPU).
        self.head.kernel.value[0, 0].numpy()
        return float(loss.numpy())


class JaxVariant(Variant):
    """The stateless step of Keras's JAX trainer, with and without `jax.jit`.

    The variant holds the state (the trainable values, the head's
    non-trainable ones and the optimizer's), as `fit` does between steps.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        trained = self.features == "trained"
        # Copies: the compiled step donates the buffers of its state.
        self.state = tuple(
            [jnp.array(v.value, copy=True) for v in variables]
            for variables in (
                self.variables,
                self.head.non_trainable_variables,
                self.optimizer.variables,
            )
        )
        self.frozen_x = None if trained else self.x

        def loss_fn(trainable, non_trainable, frozen_x, y):
            if trained:
                x, kernel = trainable[0], trainable[1:]
            else:
                x, kernel = frozen_x, trainable
            logits, _ = self.head.stateless_call(
                kernel, non_trainable, x, **self.call_kwargs(y)
            )
            # Sparse cross-entropy without a one-hot (B, C) tensor.
            return jnp.mean(
                jax.nn.logsumexp(logits, axis=-1)
                - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
            )

        # The labels (and frozen features) are arguments, not constants of
        # the trace, as the batches of a real training loop are.
        def step(state, frozen_x, y):
            trainable, non_trainable, optimizer_vars = state
            loss, grads = jax.value_and_grad(loss_fn)(
                trainable, non_trainable, frozen_x, y
            )
            trainable, optimizer_vars = self.optimizer.stateless_apply(
                optimizer_vars, grads, trainable
            )
            return loss, (trainable, non_trainable, optimizer_vars)

        self.compiled = jax.jit(step, donate_argnums=0)
        self.steps = {
            True: functools.partial(self._advance, self.compiled),
            False: functools.partial(self._advance, step),
        }

    def _advance(self, step: Callable[..., Any]) -> Any:
        loss, self.state = step(self.state, self.frozen_x, self.y)
        return loss

    def compiled_step_bytes(self) -> int:
        """The bytes XLA allocates for one compiled step beyond its inputs.

        Its preallocated temporaries plus the outputs that do not reuse a
        donated input, from the buffer assignment of the compiled step.
        """
        compiled = self.compiled.lower(
            self.state, self.frozen_x, self.y
        ).compile()
        memory = compiled.memory_analysis()
        return int(
            memory.temp_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
        )

    def sync(self, loss: Any) -> float:
        jax.block_until_ready(self.state)
        return float(loss)


class TorchVariant(Variant):
    """The step of Keras's PyTorch trainer, eager and through
    `torch.compile`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # `cross_entropy` takes int64 class ids.
        self.loss_labels = self.y.long()
        # Static shapes: the variants share the code of `_step` and of the
        # optimizer, and after a shape change Dynamo would otherwise
        # recompile them for symbolic shapes, slower than the first
        # variant's.
        self.steps = {
            True: self._guarded(torch.compile(self._step, dynamic=False)),
            False: self._step,
        }

    def _step(self) -> Any:
        for variable in self.variables:
            variable.value.grad = None
        logits = self.head(self.x, **self.call_kwargs(self.y))
        loss = torch_functional.cross_entropy(logits, self.loss_labels)
        loss.backward()
        with torch.no_grad():
            self.optimizer.apply(
                [v.value.grad for v in self.variables], self.variables
            )
        return loss.detach()

    @staticmethod
    def _guarded(compiled: Callable[[], Any]) -> Callable[[], Any]:
        """`compiled`, raising `StepUnavailable` if it fails to compile."""

        def step():
            try:
                return compiled()
            except Exception as error:  # any compiler failure, with reason
                reason = f"torch.compile failed: {type(error).__name__}: "
                # One line: the reason goes into a table's notes.
                reason += " ".join(str(error).split())
                raise StepUnavailable(reason[:_REASON_CHARS]) from error

        return step

    def sync(self, loss: Any) -> float:
        # Reading the kernel waits for this step's update too (on GPU).
        self.head.kernel.value[0, 0].item()
        return float(loss)


_VARIANT_CLASSES = {
    "tensorflow": TensorFlowVariant,
    "jax": JaxVariant,
    "torch": TorchVariant,
}


def make_variants(
    names: list[str], features: list[str], num_classes: int, x0: np.ndarray,
    labels: np.ndarray, kernel0: np.ndarray, margin: int, lam: float,
) -> dict[tuple[str, str], Variant]:
    """The heads of one C on this backend, keyed by (features, name).

    Call it inside the device scope the steps run in.
    """
    if BACKEND == "torch":
        # Dynamo caches compiled code per code object, and every variant
        # compiles the same `_step`, up to a recompile limit beyond which it
        # silently runs eager: start every C with an empty cache.
        torch.compiler.reset()
    cls = _VARIANT_CLASSES[BACKEND]
    return {
        (feature, name): cls(
            name, num_classes, x0, labels, kernel0, feature, margin, lam
        )
        for feature in features
        for name in names
    }
