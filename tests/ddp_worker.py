"""Subprocess half of the PyTorch DDP test of `tests/test_sampling.py`.

`python tests/ddp_worker.py OUT.json RANK PROCESSES PORT` (with
KERAS_BACKEND=torch) trains a `CosFaceDense(CLASSES, sample_rate=RATE)` head
for three plain-SGD steps of a global batch of BATCH rows, in the training
loop of Keras's guide "Multi-GPU distributed training with PyTorch": the
model wrapped in `DistributedDataParallel` over a gloo process group of
PROCESSES processes on 127.0.0.1:PORT, each on its contiguous part of the
batch; with 2 processes the parts of the last step are 20 and 12 rows.
PROCESSES = 1 trains on the whole batch without a process group. Rank 0
writes the kernel after the two even steps, the rows each step moved and
the losses of the even steps.
"""

import json
import sys

import keras
import numpy as np
import torch
import torch.distributed as dist

import keras_lsoftmax

CLASSES = 200
RATE = 0.25
BATCH = 32
FEATURES = 8


def _batch_mean(loss: torch.Tensor, processes: int) -> torch.Tensor:
    """The mean of the processes' mean losses: the whole batch's loss."""
    if processes > 1:
        dist.all_reduce(loss)
    return loss / processes


def main(out_path: str, rank: int, processes: int, port: int) -> None:
    if processes > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=processes,
        )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3 * BATCH, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, 3 * BATCH).astype("int64")
    # Seeds that differ by process: DDP broadcasts rank 0's module state,
    # the seed state included, when it wraps the model.
    head = keras_lsoftmax.CosFaceDense(
        CLASSES, scale=16.0, sample_rate=RATE, seed=3 + rank
    )
    model = keras.Sequential([keras.Input((FEATURES,)), head])
    kernel = rng.normal(size=(CLASSES, FEATURES)).astype("float32")
    head.kernel.assign(kernel)
    trained = (
        torch.nn.parallel.DistributedDataParallel(model)
        if processes > 1
        else model
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # Each process's [start, end) in each batch.
    even = np.linspace(0, BATCH, processes + 1).astype(int)
    last = [0, 20, BATCH] if processes == 2 else even
    moved, losses = [], []
    for step, bounds in enumerate([even, even, last]):
        start = step * BATCH
        rows = slice(start + bounds[rank], start + bounds[rank + 1])
        before = keras.ops.convert_to_numpy(head.kernel)
        with keras_lsoftmax.label_scope(y[rows]) as scope:
            logits = trained(torch.tensor(x[rows]), training=True)
        targets = scope.records[0].targets
        loss = torch.nn.functional.cross_entropy(logits, targets.long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after = keras.ops.convert_to_numpy(head.kernel)
        moved.append(int(np.sum(np.any(after != before, axis=1))))
        if step < 2:
            losses.append(float(_batch_mean(loss.detach(), processes)))
            kernel = after
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(
                {
                    "kernel": kernel.tolist(),
                    "rows_moved": moved,
                    "labelled": [
                        len(set(y[i : i + BATCH])) for i in range(0, len(y), BATCH)
                    ],
                    "losses": losses,
                },
                f,
            )
    if processes > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
