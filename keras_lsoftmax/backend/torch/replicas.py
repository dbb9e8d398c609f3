"""The labels of the whole batch under PyTorch's `DistributedDataParallel`.

Keras's `fit` on PyTorch runs on one device, where a step sees the whole
batch. In a DDP training loop (Keras's guide "Multi-GPU distributed training
with PyTorch"), each process runs the step on its part of the batch: a
sampling head must keep the classes labelled in every process's part, and
the same random negatives (DDP broadcasts rank 0's module state, the layer's
seed state included, when it wraps the model), so that the processes'
softmaxes cover the same classes. The labels are gathered across the default process
group, as Partial FC gathers them. Parts of different sizes are padded to
the longest for the collective and cut back after it.
"""

from typing import Any

import torch
import torch.distributed as dist


def global_labels(labels: Any) -> Any:
    """The labels of every process, int (B_global,), process by process."""
    if not (dist.is_available() and dist.is_initialized()):
        return labels
    processes = dist.get_world_size()
    if processes == 1:
        return labels
    size = torch.tensor([labels.shape[0]], device=labels.device)
    sizes = [torch.zeros_like(size) for _ in range(processes)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros(max(sizes), dtype=labels.dtype, device=labels.device)
    padded[: labels.shape[0]] = labels
    parts = [torch.empty_like(padded) for _ in range(processes)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])
