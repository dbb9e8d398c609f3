"""Row updates of an optimizer's variables on PyTorch.

In eager mode the touched rows are gathered, updated and copied back in
place: the work is proportional to the touched rows. Under
`torch.compile`, whose shapes are static, the masked update of
`keras_lsoftmax.backend.rows`.
"""

from typing import Any, Callable, Sequence

import keras
import torch

from keras_lsoftmax.backend.rows import update_masked_rows


def update_rows(
    optimizer: keras.optimizers.Optimizer,
    step: Callable[..., Sequence[Any]],
    gradient: Any,
    variables: Sequence[keras.Variable],
) -> None:
    """See `keras_lsoftmax.backend.rows.update_masked_rows`."""
    dtype = variables[0].value.dtype
    gradient = torch.as_tensor(gradient).to(dtype)
    if torch.compiler.is_compiling() or gradient.ndim == 0:
        return update_masked_rows(optimizer, step, gradient, variables)
    flat = gradient.reshape(gradient.shape[0], -1)
    indices = torch.nonzero(flat.any(dim=1)).reshape(-1)
    old = [v.value.index_select(0, indices) for v in variables]
    with torch.no_grad():
        news = step(gradient.index_select(0, indices), *old)
        for variable, new in zip(variables, news):
            variable.value.index_copy_(0, indices, new)
