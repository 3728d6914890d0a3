"""The EMA teacher update: one fused lerp over all parameters, on whatever shards this rank holds."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch.distributed.tensor import DTensor


@torch.no_grad()
def ema_update_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float) -> None:
    """``t <- m * t + (1 - m) * s`` for paired parameter lists (same order, same sharding)."""
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} parameters, student {len(student)}")
    torch._foreach_lerp_(list(teacher), list(student), 1.0 - momentum)


def local_shards(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's part of each parameter: the local tensor of a sharded (DTensor) one, else the tensor itself."""
    return [p.to_local() if isinstance(p, DTensor) else p for p in params]
