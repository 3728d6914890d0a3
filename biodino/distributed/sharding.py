"""Distribution applied from outside the model, as one function (``parallelize``): ``torch.compile`` of every block
(and of the objective's losses), and FSDP2 over the units each network declares (``SSLNetwork.sharding_units``:
every block, each head), then each network's root. Student and teacher are sharded alike, so the EMA runs on local
shards."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from biodino.ssl.network import SSLNetwork
from biodino.config.schema import FSDPConfig, TrainerConfig


def mixed_precision(cfg: FSDPConfig, device_type: str) -> MixedPrecisionPolicy:
    """Gathered parameters in ``param_dtype`` (bf16 on GPU by default), gradients reduced in ``reduce_dtype``
    (names from ``config.DTYPES``, checked with the config)."""
    param = cfg.param_dtype or ("bfloat16" if device_type == "cuda" else "float32")
    return MixedPrecisionPolicy(param_dtype=getattr(torch, param), reduce_dtype=getattr(torch, cfg.reduce_dtype))


def shard_network(net: SSLNetwork, mesh: DeviceMesh, policy: MixedPrecisionPolicy, reshard: bool) -> None:
    """Blocks, heads, then the root (embeddings, final norm, mask token): the order FSDP2 wants, inner first."""
    for unit in [*net.sharding_units(), net]:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)


def shard(student: SSLNetwork, teacher: SSLNetwork, mesh: DeviceMesh, cfg: FSDPConfig, device_type: str) -> None:
    """The teacher has no backward pass, so its gathered blocks are always freed right after their forward."""
    policy = mixed_precision(cfg, device_type)
    shard_network(student, mesh, policy, cfg.reshard_after_forward)
    shard_network(teacher, mesh, policy, True)


def is_sharded(net: SSLNetwork) -> bool:
    return isinstance(net, FSDPModule)


def compile_blocks(networks: Iterable[SSLNetwork], backend: str = "inductor") -> None:
    """``torch.compile`` each transformer block in place (before sharding, as FSDP2 expects).

    All blocks share one compiled code: their stochastic-depth rates are tensors, not constants, and one call of a
    block serves every crop size, so student blocks compile once (training) and teacher blocks once (no grad)."""
    for net in networks:
        for block in net.backbone.blocks:
            block.compile(backend=backend)


def parallelize(module: Any, cfg: TrainerConfig) -> None:
    """Compile (``trainer.compile``) and shard (when the strategy gave the module a device mesh) its student and
    teacher; a module already sharded is left as it is (``configure_model`` may run again on a resumed fit)."""
    if is_sharded(module.student):
        return
    if cfg.compile:
        compile_blocks((module.student, module.teacher), cfg.compile_backend)
        module.compile_losses(cfg.compile_backend)
    if module.device_mesh is not None:
        shard(module.student, module.teacher, module.device_mesh["data_parallel"], cfg.fsdp, module.device.type)
