"""The labels of the whole batch on JAX: `keras_lsoftmax.backend.replicas`."""

from keras_lsoftmax.backend.replicas import global_labels

__all__ = ["global_labels"]
