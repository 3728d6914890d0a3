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
                   group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Equipartitioned soft assignments (rows sum to 1) of ``logits`` (n, K) over the global batch.

    Runs in fp32 on ``exp(logits / T)``; prototype (column) sums are all-reduced so the rows of all
    ranks form one batch. A global scalar shift keeps ``exp`` finite and cancels in the normalizations.
    """
    q = logits.float() / temperature
    shift = _all_reduce(q.max().reshape(1) if q.numel() else q.new_full((1,), -torch.inf), dist.ReduceOp.MAX, group)
    q = torch.exp(q - shift)
    tiny = torch.finfo(torch.float32).tiny  # an all-underflowed row or column stays 0 instead of NaN
    for _ in range(iterations):
        q = q / _all_reduce(q.sum(dim=0, keepdim=True), group=group).clamp_min(tiny)  # prototypes: equal mass
        q = q / q.sum(dim=1, keepdim=True).clamp_min(tiny)  # each sample's row sums to 1
    return q


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
