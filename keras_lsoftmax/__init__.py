"""Large-Margin Softmax (L-Softmax) for Keras 3 on TensorFlow."""

from keras_lsoftmax import ops
from keras_lsoftmax.layers import LSoftmaxDense
from keras_lsoftmax.version import __version__

__all__ = ["LSoftmaxDense", "ops", "__version__"]
