"""Large-Margin Softmax (L-Softmax) for Keras 3 on TensorFlow, JAX and PyTorch."""

from keras_lsoftmax import cloning  # noqa: F401 (wraps keras.models.clone_model)
from keras_lsoftmax import margins
from keras_lsoftmax import ops
from keras_lsoftmax import optimizers
from keras_lsoftmax import schedules
from keras_lsoftmax.callbacks import LambdaScheduler
from keras_lsoftmax.heads import ArcFaceDense
from keras_lsoftmax.heads import CosFaceDense
from keras_lsoftmax.heads import SphereFaceDense
from keras_lsoftmax.label_scope import label_scope
from keras_lsoftmax.layers import LSoftmaxDense
from keras_lsoftmax.layers import MarginDense
from keras_lsoftmax.models import MarginTrainingMixin
from keras_lsoftmax.models import Model
from keras_lsoftmax.models import Sequential
from keras_lsoftmax.version import __version__

__all__ = [
    "ArcFaceDense",
    "CosFaceDense",
    "LambdaScheduler",
    "LSoftmaxDense",
    "MarginDense",
    "MarginTrainingMixin",
    "Model",
    "Sequential",
    "__version__",
    "SphereFaceDense",
    "label_scope",
    "margins",
    "ops",
    "optimizers",
    "schedules",
]
