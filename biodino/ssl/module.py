"""The objective-independent LightningModule: teacher EMA, schedules, parameter groups, optimizer, logging."""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any, Callable, Optional

import lightning as L
import torch

from biodino.data.photometric import Photometric
from biodino.data.stream import BATCH_MODEL, BATCH_PHOTOMETRIC, derived_seed
from biodino.ssl.ema import ema_update_, local_shards
from biodino.ssl.grad_norm import clip_grad_norm_
from biodino.ssl.network import SSLNetwork
from biodino.ssl.param_groups import param_groups
from biodino.ssl.schedules import Schedules
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

    mask_shape: Any  # the iBOT mask generator class (data.masking) the data workers draw for this objective

    @staticmethod
    def check(cfg: TrainConfig) -> None:
        """Config errors of this objective that the value ranges cannot tell, raised as ConfigError."""

    def build_network(self) -> SSLNetwork:
        raise NotImplementedError

    def train(self, mode: bool = True) -> "SSLModule":
        """The teacher stays in eval mode: no stochastic depth, no dropout."""
        super().train(mode)
        self.teacher.eval()
        return self

    # -- data on the device ------------------------------------------------------------------------
    def batch_index(self, batch: dict[str, Any]) -> int:
        """The batch's position in this rank's stream (the data pipeline numbers them): keys every random draw."""
        return int(batch.get("batch_index", torch.tensor(self.global_step)))

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """uint8 crops from the workers get their photometric augmentation here, batched on the device.

        Its randomness is seeded by (seed, rank, batch index), so a resumed run draws the same parameters.
        """
        if batch["global_crops"].dtype != torch.uint8:
            return batch  # already augmented and normalized by the caller
        if self.trainer is not None and self.trainer.training:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(derived_seed(self.cfg.seed, self.global_rank, BATCH_PHOTOMETRIC, self.batch_index(batch)))
            batch["global_crops"], batch["local_crops"] = self.photometric(
                batch["global_crops"], batch["local_crops"], gen)
        else:
            batch["global_crops"] = self.photometric.normalize(batch["global_crops"])
            batch["local_crops"] = self.photometric.normalize(batch["local_crops"])
        return batch

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Seed torch's global generators (stochastic depth draws from them) by (seed, rank, batch index): a resumed
        run, on any world size, draws what an uninterrupted one would, with no generator state in checkpoints."""
        torch.manual_seed(derived_seed(self.cfg.seed, self.global_rank, BATCH_MODEL, self.batch_index(batch)))

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        if "corrupt" in batch:
            self.log("data/corrupt_samples", batch["corrupt"].float(), on_step=False, on_epoch=True,
                     reduce_fx="sum")

    def configure_model(self) -> None:
        """The distribution the runner chose (``self.parallelize``), applied once the device mesh exists."""
        if self.parallelize is not None:
            self.parallelize(self)

    # -- optimization --------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        groups = param_groups(self.student, o.layerwise_decay, o.patch_embed_lr_mult)
        fused = self.device.type == "cuda" or None
        return torch.optim.AdamW(groups, lr=0.0, betas=(o.beta1, o.beta2), fused=fused)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Set this step's lr and weight decay on every group; the heads' last layers get lr 0 while frozen."""
        step = self.global_step
        lr, wd = self.schedules.lr(step), self.schedules.weight_decay(step)
        frozen = self.schedules.last_layer_frozen(step)
        for group in optimizer.param_groups:
            group["lr"] = 0.0 if (frozen and group["last_layer"]) else lr * group["lr_mult"]
            group["weight_decay"] = wd * group["wd_mult"]
        self.log_dict({"lr": lr, "wd": wd}, on_step=True, on_epoch=False)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        """Clip the student's global gradient norm to ``optim.clip_grad`` and log the norm before clipping."""
        max_norm = self.cfg.optim.clip_grad if self.cfg.optim.clip_grad is not None else float("inf")
        norm = clip_grad_norm_(self.student.parameters(), max_norm)
        self.log("grad_norm", norm, on_step=True, on_epoch=False)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimizer step, then the teacher's EMA update (once per optimizer step, not per micro-batch)."""
        step = self.global_step
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        momentum = self.schedules.momentum(step)
        ema_update_(local_shards(self.teacher.parameters()), local_shards(self.student.parameters()), momentum)
        self.log("momentum", momentum, on_step=True, on_epoch=False)

    # -- loss bookkeeping ----------------------------------------------------------------------------
    def total_loss(self, terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
        """Weighted sum of the terms; logs each term and stops on a non-finite one, naming it."""
        total = sum(weights[k] * v for k, v in terms.items())
        if not torch.isfinite(total):
            bad = [k for k, v in terms.items() if not torch.isfinite(v)] or ["total"]
            raise NonFiniteLossError(
                f"non-finite loss at step {self.global_step}: {', '.join(bad)} "
                f"({', '.join(f'{k}={float(v):.4g}' for k, v in terms.items())})"
            )
        self.log_dict({f"loss/{k}": v.detach() for k, v in terms.items()}, on_step=True, on_epoch=False)
        self.log("loss/total", total.detach(), on_step=True, on_epoch=False, prog_bar=True)
        return total

