"""Gradient-norm clipping by the global norm, also when gradients are sharded over ranks (FSDP2 DTensors)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch.distributed.tensor import DTensor


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale gradients so their joint L2 norm is at most ``max_norm``; return the norm before clipping.

    A sharded gradient's norm is a partial result: ``full_tensor()`` reduces it across ranks, so every rank
    clips by the norm of the whole model rather than of its own shard.
    """
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
