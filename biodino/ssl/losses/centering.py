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
                   group: Optional[dist.ProcessGroup] = None, queue: Optional[torch.Tensor] = None,
                   valid: Optional[torch.Tensor] = None, queue_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Equipartitioned soft assignments (rows sum to 1) of ``logits`` (n, K) over the global batch.

    Runs in fp32 on ``exp(logits / T)``, in place on one buffer; prototype (column) sums are all-reduced so the
    rows of all ranks form one batch. A global scalar shift keeps ``exp`` finite and cancels in the normalizations.
    ``queue`` rows (earlier teacher logits, Franca) join the prototype sums when ``queue_valid`` (a 0-d bool, no
    host read) is true; only ``logits``' rows return. Rows whose ``valid`` is false (padding) count for nothing.
    """
    n = logits.shape[0]
    top = _max_over(logits, valid) if n else logits.new_full((1,), -torch.inf, dtype=torch.float32)
    if queue is not None and queue.numel():
        queued = queue.max().float() if queue_valid is None else torch.where(queue_valid, queue.max(), -torch.inf)
        top = torch.maximum(top, queued.reshape(1))
    shift = _all_reduce(top, dist.ReduceOp.MAX, group)  # max(logits) / T == max(logits / T) for T > 0
    q = torch.sub(logits if queue is None else torch.cat([logits.float(), queue.float()]), shift)  # fp32, a new buffer
    q.div_(temperature).exp_()
    weights = _row_weights(n, q.shape[0], valid, queue_valid, q.device)
    if weights is not None:
        q.mul_(weights.unsqueeze(1))
    tiny = torch.finfo(torch.float32).tiny  # an all-underflowed row or column stays 0 instead of NaN
    for _ in range(iterations):
        q.div_(_all_reduce(q.sum(dim=0, keepdim=True), group=group).clamp_min_(tiny))  # prototypes: equal mass
        q.div_(q.sum(dim=1, keepdim=True).clamp_min_(tiny))  # each sample's row sums to 1
    return q[:n]


def _max_over(logits: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """(1,) the largest logit of the valid rows (padding may hold anything)."""
    if valid is None:
        return logits.max().float().reshape(1)
    return torch.where(valid, logits.amax(dim=1), -torch.inf).max().float().reshape(1)


def _row_weights(n: int, rows: int, valid: Optional[torch.Tensor], queue_valid: Optional[torch.Tensor],
                 device: torch.device) -> Optional[torch.Tensor]:
    """1 for rows that take part, 0 for padding and for a queue not yet full; None when all take part."""
    if valid is None and (queue_valid is None or rows == n):
        return None
    own = valid.float() if valid is not None else torch.ones(n, device=device)
    if rows == n:
        return own
    return torch.cat([own, queue_valid.float().expand(rows - n)])


class SinkhornQueue(nn.Module):
    """FIFO of the last ``size`` teacher logit rows of every nesting level, used once full (Franca). ``dtype`` is
    the storage (birder keeps it in bfloat16 under AMP, rounding the queued logits); Sinkhorn reads it in fp32."""

    def __init__(self, size: int, widths: list[int], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.widths = widths
        self.register_buffer("rows", torch.zeros(size, sum(widths), dtype=dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("full", torch.zeros((), dtype=torch.bool))

    def levels(self) -> list[torch.Tensor]:
        """The queued rows split by level (use them only where ``full``: a device flag, never read on the host)."""
        return list(self.rows.split(self.widths, dim=1))

    @torch.no_grad()
    def push(self, levels: list[torch.Tensor], valid: Optional[torch.Tensor] = None) -> None:
        """Append the rows of ``levels`` whose ``valid`` is true (all by default), keeping the newest ``size``:
        positions computed on the device, so padding is skipped without counting it on the host."""
        values = torch.cat([v.to(self.rows.dtype) for v in levels], dim=1)
        size = self.rows.shape[0]
        valid = torch.ones(values.shape[0], dtype=torch.bool, device=values.device) if valid is None else valid
        rank = valid.long().cumsum(0) - 1  # position among the valid rows
        count = valid.sum()
        dropped = (count - size).clamp_min(0)  # the oldest valid rows of this push that do not fit
        rel = rank - dropped
        keep = valid & (rel >= 0)
        slot = (self.ptr + rel.clamp_min(0)) % size
        hit = torch.zeros(size, device=values.device).index_add_(0, slot, keep.float())
        self.rows.mul_((hit == 0).unsqueeze(1))
        self.rows.index_add_(0, slot, torch.where(keep.unsqueeze(1), values, 0.0))
        kept = count - dropped
        self.full |= self.ptr + kept >= size
        self.ptr.copy_((self.ptr + kept) % size)


class SoftmaxCenter(nn.Module):
    """DINO's centering: ``softmax((t - c) / T)`` with ``c`` an EMA of the global mean of teacher logits."""

    def __init__(self, num_prototypes: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, num_prototypes))

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, temperature: float, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Targets from the current center; then the center moves toward this step's global mean (of the
        ``valid`` rows: padding rows get targets but do not move the center)."""
        x = logits.float()
        probs = torch.softmax((x - self.center).div_(temperature), dim=-1)
        self.update(x, valid=valid)
        return probs

    @torch.no_grad()
    def update(self, logits: torch.Tensor, group: Optional[dist.ProcessGroup] = None,
               valid: Optional[torch.Tensor] = None) -> None:
        if valid is None:
            total = logits.sum(dim=0, dtype=torch.float32)
            count = logits.new_full((1,), logits.shape[0], dtype=torch.float32)
        else:
            total = valid.to(logits.dtype) @ logits
            count = valid.sum(dtype=torch.float32).reshape(1)
        stats = _all_reduce(torch.cat([total.float(), count]), group=group)
        count = stats[-1]
        moved = self.momentum * self.center + (1.0 - self.momentum) * stats[:-1].unsqueeze(0) / count.clamp_min(1.0)
        self.center.copy_(torch.where(count > 0, moved, self.center))  # no tokens anywhere: keep the center
