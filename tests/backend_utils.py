"""Backend-neutral helpers for tests that run on every Keras backend."""

import keras
import numpy as np

BACKEND = keras.backend.backend()


def gradients(fn, *args):
    """`fn(*args)` and the gradient of its sum w.r.t. each float argument.

    Args:
        fn: a function of backend tensors returning one tensor.
        *args: NumPy arrays; float ones are differentiated, others are
            passed as tensors of their dtype.

    Returns:
        `(value, grads)`: NumPy arrays; `grads` has one entry per float
        argument (None for the others).
    """
    floats = [np.asarray(a).dtype.kind == "f" for a in args]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        tensors = [tf.convert_to_tensor(a) for a in args]
        with tf.GradientTape() as tape:
            tape.watch([t for t, f in zip(tensors, floats) if f])
            value = fn(*tensors)
        diffed = iter(
            tape.gradient(value, [t for t, f in zip(tensors, floats) if f])
        )
        grads = [_numpy(next(diffed)) if f else None for f in floats]
        return value.numpy(), grads
    if BACKEND == "jax":
        import jax

        positions = [i for i, f in enumerate(floats) if f]
        tensors = [jax.numpy.asarray(a) for a in args]

        def total(*diffed):
            full = list(tensors)
            for i, d in zip(positions, diffed):
                full[i] = d
            out = fn(*full)
            return out.sum(), out

        (_, value), grads = jax.value_and_grad(
            total, argnums=tuple(range(len(positions))), has_aux=True
        )(*[tensors[i] for i in positions])
        result = [None] * len(args)
        for i, g in zip(positions, grads):
            result[i] = np.asarray(g)
        return np.asarray(value), result
    import torch

    tensors = [
        torch.tensor(np.asarray(a), requires_grad=f)
        for a, f in zip(args, floats)
    ]
    value = fn(*tensors)
    value.sum().backward()
    grads = [t.grad.numpy() if f else None for t, f in zip(tensors, floats)]
    return value.detach().numpy(), grads


def differentiable_gradient(fn, x):
    """∂sum(fn(x))/∂x for a backend tensor x, itself differentiable: the
    tape or graph of an enclosing differentiation records it."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(fn(x))
        return tape.gradient(total, x)
    if BACKEND == "jax":
        import jax

        return jax.grad(lambda x: fn(x).sum())(x)
    import torch

    x = torch.as_tensor(x)
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
    return grad


def _numpy(t):
    return None if t is None else np.asarray(t)
