"""The JAX implementation of the L-Softmax op (`jax.custom_vjp`)."""
