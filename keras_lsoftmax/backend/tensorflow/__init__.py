"""The TensorFlow implementation: `tf.custom_gradient` op, GradientTape step."""
