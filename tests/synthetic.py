"""Tiny configs and a synthetic multi-crop dataset for CPU tests of the objectives."""

from __future__ import annotations

import dataclasses
import random

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from biodino.data.collate import collate_crops
from biodino.data.masking import BlockMasking, MaskSampler, masked_positions
from biodino.config.schema import HeadConfig, TrainConfig


def tiny_config(**sections) -> TrainConfig:
    """vit_tiny_p8 on 32 px global and 16 px local crops, small heads, 3 epochs of 10 steps, batch 8."""
    cfg = TrainConfig()
    cfg.model.preset = "vit_tiny_p8"
    cfg.crops.global_size, cfg.crops.local_size, cfg.crops.num_local = 32, 16, 4
    cfg.objective.dino.head = HeadConfig(num_prototypes=256, hidden_dim=64, bottleneck_dim=32)
    cfg.objective.ibot.head = HeadConfig(num_prototypes=128, hidden_dim=64, bottleneck_dim=32)
    cfg.objective.warmup_teacher_temp_epochs = 1
    cfg.optim.warmup_epochs = 1
    cfg.optim.base_lr = 2e-2
    cfg.schedule.epochs, cfg.schedule.steps_per_epoch, cfg.schedule.batch_size = 3, 10, 8
    for name, changes in sections.items():
        setattr(cfg, name, dataclasses.replace(getattr(cfg, name), **changes))
    return cfg


class PatternCrops(Dataset):
    """Images of 4 stripe patterns with noise; global and local crops are random windows (uint8)."""

    def __init__(self, n: int, cfg: TrainConfig, seed: int = 0) -> None:
        self.n, self.cfg, self.seed = n, cfg, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        side = self.cfg.crops.global_size + 8
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        angle = (i % 4) * torch.pi / 4
        stripes = torch.sin((xs * torch.cos(torch.tensor(angle)) + ys * torch.sin(torch.tensor(angle))) * 0.8)
        img = 0.5 + 0.35 * stripes + 0.1 * torch.randn(3, side, side, generator=g)
        img = (img.clamp(0, 1) * 255).to(torch.uint8)

        def crop(size: int) -> torch.Tensor:
            top, left = (int(v) for v in torch.randint(0, side - size + 1, (2,), generator=g))
            return img[:, top : top + size, left : left + size]

        return {"global_crops": [crop(self.cfg.crops.global_size) for _ in range(2)],
                "local_crops": [crop(self.cfg.crops.local_size) for _ in range(self.cfg.crops.num_local)]}


def loader(cfg: TrainConfig, n: int = 256, seed: int = 0) -> DataLoader:
    grid = cfg.crops.global_size // 8
    sampler = MaskSampler(BlockMasking((grid, grid), min_patches=2), grid * grid,
                          cfg.objective.ibot.mask_sample_probability, cfg.objective.ibot.mask_ratio_min,
                          cfg.objective.ibot.mask_ratio_max)
    rng = random.Random(seed)

    def collate(samples: list[dict]) -> dict:
        batch = collate_crops(samples)
        n = batch["global_crops"].shape[0]
        batch["masks"] = sampler(n, rng)
        batch["mask_indices"], batch["mask_weights"] = masked_positions(batch["masks"], sampler.capacity(n))
        return batch

    return DataLoader(PatternCrops(n, cfg, seed), batch_size=cfg.schedule.batch_size, shuffle=True,
                      collate_fn=collate, drop_last=True, generator=torch.Generator().manual_seed(seed))


def fit(module, cfg: TrainConfig, steps: int, callbacks=(), accumulate: int = 1):
    """Train ``module`` for ``steps`` optimizer steps on CPU with a plain Lightning Trainer."""
    import lightning as L

    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate,
                        callbacks=list(callbacks), deterministic=True)
    trainer.fit(module, loader(cfg, n=cfg.schedule.batch_size * steps * accumulate))
    return trainer


class Recorder(L.Callback):
    """Per step: logged metrics, teacher before the step, student and teacher after it."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.teacher_before: list[dict[str, torch.Tensor]] = []
        self.after: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.teacher_before.append({k: v.clone() for k, v in pl_module.teacher.state_dict().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:  # one record per optimizer step
            self.metrics.extend(pl_module.step_metrics.read().values())
        self.after.append(({k: v.clone() for k, v in pl_module.student.state_dict().items()},
                           {k: v.clone() for k, v in pl_module.teacher.state_dict().items()}))
        assert all(p.grad is None and not p.requires_grad for p in pl_module.teacher.parameters())
