"""Row updates of an optimizer's variables on JAX.

Keras compiles the JAX step with static shapes, so the masked update of
`keras_lsoftmax.backend.rows` is the path: XLA fuses it into one pass.
"""

from keras_lsoftmax.backend.rows import update_masked_rows as update_rows

__all__ = ["update_rows"]
