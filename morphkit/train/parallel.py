"""Data-parallel training: each process takes its rows of the global batch, and gradients are averaged.

Under `accelerate launch` (or torchrun) every process draws the same global batch (the draws depend on
(seed, step) alone), keeps rows `rank * b … (rank + 1) * b`, and after its backward pass the gradients
of every trained tensor are averaged across processes in one all-reduce. Each process then takes the same
optimizer step, so the weights stay identical everywhere, and the run equals one process training on the
whole global batch (within fp32 rounding). This is what DDP does, written out over the LoRA's tensors:
they are few and small, so one flat all-reduce per step costs little.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Share:
    """This process's part of the work: process `rank` of `count`."""

    rank: int = 0
    count: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, per_process: int) -> slice:
        """This process's rows of a global batch of `per_process * count` rows."""
        return slice(self.rank * per_process, (self.rank + 1) * per_process)


ALONE = Share()


def average_gradients(params: list[torch.Tensor], share: Share) -> None:
    """Replace every gradient by its mean across the processes (one all-reduce of all of them, flattened)."""
    if share.count == 1:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= share.count
    for grad, mean in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(mean)


def mean_across(value: float, share: Share, device=None) -> float:
    """The mean of `value` over the processes (each one's loss of its rows: their mean is the batch's loss)."""
    if share.count == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / share.count
