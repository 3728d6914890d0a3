"""The ranks of a job launched by ``torchrun`` or ``srun`` outside a Lightning Trainer (``biodino embed``), joined
in a gloo group used only for barriers. Launch detection and the rendezvous address come from Lightning's
cluster environments, the same that training relies on."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


@contextmanager
def joined_world(timeout: timedelta = timedelta(hours=12)) -> Iterator[World]:
    """This process's place in its job; with more than one rank, a process group for the duration (joined once:
    inside another ``joined_world`` it is that one's). The timeout bounds a barrier: how long a finished rank
    waits for the slowest."""
    if dist.is_initialized():
        yield World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return
    env = next((cls() for cls in (TorchElasticEnvironment, SLURMEnvironment)  # (Slurm's detect() warns outside)
                if (cls is TorchElasticEnvironment or "SLURM_NTASKS" in os.environ) and cls.detect()), None)
    if env is None or env.world_size() == 1:
        yield World()
        return
    world = World(env.global_rank(), env.world_size(), env.local_rank())
    dist.init_process_group("gloo", init_method=f"tcp://{env.main_address}:{env.main_port}", rank=world.rank,
                            world_size=world.size, timeout=timeout)
    try:
        yield world
    finally:
        dist.destroy_process_group()
