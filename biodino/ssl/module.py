"""The objective-independent LightningModule: teacher EMA, schedules, parameter groups, optimizer, logging."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict
from typing import Any, Callable, Optional

import lightning as L
import torch
from torch.distributed.fsdp import FSDPModule

from biodino.data.masking import masked_positions
from biodino.data.photometric import Photometric
from biodino.data.stream import BATCH_MODEL, BATCH_PHOTOMETRIC, derived_seed
from biodino.ssl.ema import ema_update_, local_shards
from biodino.ssl.grad_norm import clip_grad_norm_
from biodino.ssl.network import SSLNetwork
from biodino.ssl.param_groups import param_groups
from biodino.ssl.schedules import Schedules
from biodino.ssl.step_metrics import StepMetrics
from biodino.config.schema import TrainConfig


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; training stops instead of corrupting the weights."""


class SSLModule(L.LightningModule):
    """Owns ``student`` and its EMA ``teacher``; subclasses build the network and compute the losses."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.check(cfg)
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"config": asdict(cfg)})
        self.schedules = Schedules(cfg)
        self.student = self.build_network()
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.photometric = Photometric(cfg.crops)
        # Applied in ``configure_model`` by whoever runs the module (compile, FSDP2): see distributed.sharding.
        self.parallelize: Optional[Callable[["SSLModule"], None]] = None
        self.step_metrics = StepMetrics()
        self._skip: Optional[torch.Tensor] = None  # on the device: a non-finite step happened, skip updates
        self._batch_index: Optional[int] = None  # of the batch being trained on, from the data pipeline

    mask_shape: Any  # the iBOT mask generator class (data.masking) the data workers draw for this objective

    @staticmethod
    def check(cfg: TrainConfig) -> None:
        """Config errors of this objective that the value ranges cannot tell, raised as ConfigError."""

    def build_network(self) -> SSLNetwork:
        raise NotImplementedError

    def compile_losses(self, backend: str) -> None:
        """``torch.compile`` what the objective's losses compute (``trainer.compile``); nothing by default."""

    def train(self, mode: bool = True) -> "SSLModule":
        """The teacher stays in eval mode: no stochastic depth, no dropout."""
        super().train(mode)
        self.teacher.eval()
        return self

    # -- data on the device ------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """On the host, before the copy to the device: the batch's stream position and corrupt-sample count become
        plain ints (reading them after the copy would wait for the device), and batches built without the
        masked-token index list (tests, callers of the module) get one."""
        index = batch.pop("batch_index", None)
        self._batch_index = int(index) if index is not None else None
        corrupt = batch.pop("corrupt", None)
        if corrupt is not None:
            self.step_metrics.log(self.global_step, "data/corrupt_samples", int(corrupt), total=True)
        if "masks" in batch and "mask_indices" not in batch:
            batch["mask_indices"], batch["mask_weights"] = masked_positions(batch["masks"].cpu(), 0)
        return batch

    def batch_index(self) -> int:
        """The batch's position in this rank's stream (the data pipeline numbers them): keys every random draw."""
        return self.global_step if self._batch_index is None else self._batch_index

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """uint8 crops from the workers get their photometric augmentation here, batched on the device.

        Its randomness is seeded by (seed, rank, batch index), so a resumed run draws the same parameters.
        """
        if batch["global_crops"].dtype != torch.uint8:
            return batch  # already augmented and normalized by the caller
        if self.trainer is not None and self.trainer.training:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(derived_seed(self.cfg.seed, self.global_rank, BATCH_PHOTOMETRIC, self.batch_index()))
            batch["global_crops"], batch["local_crops"] = self.photometric(
                batch["global_crops"], batch["local_crops"], gen)
        else:
            batch["global_crops"] = self.photometric.normalize(batch["global_crops"])
            batch["local_crops"] = self.photometric.normalize(batch["local_crops"])
        return batch

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Seed torch's global generators (stochastic depth draws from them) by (seed, rank, batch index): a resumed
        run, on any world size, draws what an uninterrupted one would, with no generator state in checkpoints.

        Under FSDP, gradients are reduce-scattered only on the last micro-batch of an optimizer step; the others
        accumulate unsharded gradients locally (one fp32 copy of the student's parameters per rank)."""
        torch.manual_seed(derived_seed(self.cfg.seed, self.global_rank, BATCH_MODEL, self.batch_index()))
        if isinstance(self.student, FSDPModule) and self.trainer is not None:
            self.student.set_requires_gradient_sync((batch_idx + 1) % self.trainer.accumulate_grad_batches == 0)

    def configure_model(self) -> None:
        """The distribution the runner chose (``self.parallelize``), applied once the device mesh exists."""
        if self.parallelize is not None:
            self.parallelize(self)

    # -- optimization --------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Fused AdamW (on CPU too): its ``found_inf`` input skips a non-finite step on the device, without a sync."""
        o = self.cfg.optim
        groups = param_groups(self.student, o)
        return torch.optim.AdamW(groups, lr=0.0, betas=(o.beta1, o.beta2), fused=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Set this step's lr and weight decay on every group. While frozen, the heads' last layers get lr 0
        (``zero_lr``) or lose their gradients before clipping, so AdamW skips them (``drop_grads``)."""
        step = self.global_step
        lr, wd = self.schedules.lr(step), self.schedules.weight_decay(step)
        frozen = self.schedules.last_layer_frozen(step)
        drop = frozen and self.cfg.objective.last_layer_freeze == "drop_grads"
        for group in optimizer.param_groups:
            group["lr"] = 0.0 if (frozen and not drop and group["last_layer"]) else lr * group["lr_mult"]
            group["weight_decay"] = wd * group["wd_mult"]
            if drop and group["last_layer"]:
                for p in group["params"]:
                    p.grad = None
        self.log_step({"lr": lr, "wd": wd})

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        """Clip the student's global gradient norm to ``optim.clip_grad`` and log the norm before clipping.

        A non-finite norm (the same on every rank: it is the norm of all gradients) marks this and every later
        step as not to be applied: the fused optimizer skips them on the device (the EMA teacher keeps following
        the unchanged student), and the next read of the metrics (at the latest before a checkpoint is written)
        stops the run, naming the step and the terms."""
        max_norm = self.cfg.optim.clip_grad if self.cfg.optim.clip_grad is not None else float("inf")
        norm = clip_grad_norm_(self.student.parameters(), max_norm)
        self._skip = ~torch.isfinite(norm) if self._skip is None else self._skip | ~torch.isfinite(norm)
        optimizer.found_inf = self._skip.float()
        self.log_step({"grad_norm": norm})

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimizer step, then the teacher's EMA update (once per optimizer step, not per micro-batch)."""
        step = self.global_step
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        momentum = self.schedules.momentum(step)
        ema_update_(local_shards(self.teacher.parameters()), local_shards(self.student.parameters()), momentum)
        self.step_metrics.log(step, "momentum", momentum)

    # -- metrics and loss bookkeeping ----------------------------------------------------------------
    def log_step(self, values: dict[str, Any]) -> None:
        """Record this optimizer step's scalars, on the device or the host, without reading them (see StepMetrics)."""
        self.step_metrics.log_dict(self.global_step, values)

    def total_loss(self, terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
        """Weighted sum of the terms, each logged (finiteness is checked when the metrics are read)."""
        total = sum(weights[k] * v for k, v in terms.items())
        self.log_step({**{f"loss/{k}": v for k, v in terms.items()}, "loss/total": total})
        return total

    def check_finite(self, steps: dict[int, dict[str, float]]) -> None:
        """Raise NonFiniteLossError, on every rank alike, if a read step has a non-finite loss term or gradient
        norm (such a step and the ones after it were not applied to the weights)."""
        bad = next(((step, names) for step, m in steps.items()
                    if (names := [k for k, v in m.items() if _watched(k) and not math.isfinite(v)])), None)
        if self.trainer is not None and self.trainer.world_size > 1:
            anywhere = self.trainer.strategy.reduce(torch.tensor(float(bad is not None), device=self.device),
                                                    reduce_op="max")
            if bad is None and anywhere > 0:
                raise NonFiniteLossError("non-finite loss or gradient on another rank; no update was applied")
        if bad is not None:
            step, names = bad
            values = ", ".join(f"{k}={v:.4g}" for k, v in steps[step].items() if _watched(k))
            raise NonFiniteLossError(f"non-finite loss at step {step}: {', '.join(names)} ({values}); this step and "
                                     "any after it were not applied to the weights")


def _watched(name: str) -> bool:
    return name.startswith("loss/") or name == "grad_norm"
