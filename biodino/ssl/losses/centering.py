"""Teacher targets: softmax centering (EMA center) and Sinkhorn-Knopp, both synchronized across ranks."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
                group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t, op=op, group=group)
    return t


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = 3,
                   group: Optional[dist.ProcessGroup] = None, queue: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Equipartitioned soft assignments (rows sum to 1) of ``logits`` (n, K) over the global batch.

    Runs in fp32 on ``exp(logits / T)``; prototype (column) sums are all-reduced so the rows of all
    ranks form one batch. A global scalar shift keeps ``exp`` finite and cancels in the normalizations.
    ``queue`` rows (earlier teacher logits, Franca) join the prototype sums; only ``logits``' rows return.
    """
    n = logits.shape[0]
    if queue is not None:
        logits = torch.cat([logits.float(), queue.float()])
    q = logits.float() / temperature
    shift = _all_reduce(q.max().reshape(1) if q.numel() else q.new_full((1,), -torch.inf), dist.ReduceOp.MAX, group)
    q = torch.exp(q - shift)
    tiny = torch.finfo(torch.float32).tiny  # an all-underflowed row or column stays 0 instead of NaN
    for _ in range(iterations):
        q = q / _all_reduce(q.sum(dim=0, keepdim=True), group=group).clamp_min(tiny)  # prototypes: equal mass
        q = q / q.sum(dim=1, keepdim=True).clamp_min(tiny)  # each sample's row sums to 1
    return q[:n]


class SinkhornQueue(nn.Module):
    """FIFO of the last ``size`` teacher logit rows of every nesting level, used once full (Franca)."""

    def __init__(self, size: int, widths: list[int]) -> None:
        super().__init__()
        self.widths = widths
        self.register_buffer("rows", torch.zeros(size, sum(widths)))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("full", torch.zeros((), dtype=torch.bool))

    def levels(self) -> Optional[list[torch.Tensor]]:
        """The queued rows split by level, or None until the queue has filled once."""
        return list(self.rows.split(self.widths, dim=1)) if bool(self.full) else None

    @torch.no_grad()
    def push(self, levels: list[torch.Tensor]) -> None:
        values = torch.cat([v.float() for v in levels], dim=1)[-self.rows.shape[0]:]
        size, n = self.rows.shape[0], values.shape[0]
        index = (self.ptr + torch.arange(n, device=values.device)) % size
        self.rows[index] = values
        self.full |= self.ptr + n >= size
        self.ptr.copy_((self.ptr + n) % size)


class SoftmaxCenter(nn.Module):
    """DINO's centering: ``softmax((t - c) / T)`` with ``c`` an EMA of the global mean of teacher logits."""

    def __init__(self, num_prototypes: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, num_prototypes))

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Targets from the current center; then the center moves toward this step's global mean."""
        probs = F.softmax((logits.float() - self.center) / temperature, dim=-1)
        self.update(logits)
        return probs

    @torch.no_grad()
    def update(self, logits: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> None:
        stats = torch.cat([logits.float().sum(dim=0), logits.new_full((1,), logits.shape[0], dtype=torch.float32)])
        stats = _all_reduce(stats, group=group)
        count = stats[-1]
        moved = self.momentum * self.center + (1.0 - self.momentum) * stats[:-1].unsqueeze(0) / count.clamp_min(1.0)
        self.center.copy_(torch.where(count > 0, moved, self.center))  # no tokens anywhere: keep the center
