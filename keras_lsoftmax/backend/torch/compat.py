"""The private Keras names the PyTorch backend uses.

Checked on Keras 3.15.1 and PyTorch 2.13.0.
"""

from typing import Any

import keras

# Keras's PyTorch backend has an optimizer class of its own for each public
# one (`keras.optimizers.get("adam")` is a
# `keras.src.backend.torch.optimizers.torch_adam.Adam`), and serializes it
# under that private module with a `registered_name`. No upstream issue
# tracks it; the public class has the same config.
_BACKEND_MODULES = "keras.src.backend."


def public_optimizers(config: Any) -> Any:
    """`config` with every PyTorch optimizer class named by its public class.

    A compile config naming the private module imports PyTorch wherever the
    file is loaded: on TensorFlow, TensorFlow and the `triton` of CUDA
    builds of PyTorch crash one process together. Entries of other modules,
    and classes `keras.optimizers` does not export, are left as they are.
    """
    if isinstance(config, list):
        return [public_optimizers(item) for item in config]
    if not isinstance(config, dict):
        return config
    config = {key: public_optimizers(value) for key, value in config.items()}
    module = config.get("module")
    name = config.get("class_name")
    if (
        isinstance(module, str)
        and module.startswith(_BACKEND_MODULES)
        and hasattr(keras.optimizers, str(name))
    ):
        config.update(module="keras.optimizers", registered_name=None)
    return config
