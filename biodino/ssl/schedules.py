"""Per-optimizer-step schedules: pure functions of the step, so a checkpoint needs only the step."""

from __future__ import annotations

import math
from dataclasses import dataclass

from biodino.config.schema import TrainConfig


def cosine(start: float, end: float, step: int, total: int) -> float:
    """Cosine from ``start`` at step 0 to ``end`` at step ``total - 1``, then ``end``."""
    if total <= 1 or step >= total - 1:
        return end if total >= 1 else start
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * step / (total - 1)))


def warmup_cosine(base: float, final: float, step: int, total: int, warmup: int, start: float = 0.0) -> float:
    """Linear from ``start`` to ``base`` over ``warmup`` steps, then cosine to ``final`` at step ``total - 1``."""
    if step < warmup:
        return start + (base - start) * step / warmup
    return cosine(base, final, step - warmup, total - warmup)


def sqrt_scaled_lr(base_lr: float, global_batch: int) -> float:
    """DINOv2's scaling rule: ``base_lr * sqrt(global_batch / 1024)``."""
    return base_lr * math.sqrt(global_batch / 1024)


@dataclass(frozen=True)
class Schedules:
    """Learning rate, weight decay, teacher momentum and temperature, last-layer freeze, by step."""

    cfg: TrainConfig

    def _steps(self, epochs: float) -> int:
        return int(round(epochs * self.cfg.schedule.steps_per_epoch))

    @property
    def total(self) -> int:
        return self.cfg.schedule.total_steps

    def lr(self, step: int) -> float:
        o = self.cfg.optim
        peak = sqrt_scaled_lr(o.base_lr, self.cfg.global_batch_size)
        return warmup_cosine(peak, o.min_lr, step, self.total, self._steps(o.warmup_epochs), o.warmup_start * peak)

    def weight_decay(self, step: int) -> float:
        return cosine(self.cfg.optim.weight_decay, self.cfg.optim.weight_decay_end, step, self.total)

    def momentum(self, step: int) -> float:
        o = self.cfg.objective
        return cosine(o.momentum_teacher, o.final_momentum_teacher, step, self.total)

    def teacher_temp(self, step: int) -> float:
        """Linear from the warmup temperature at step 0 to the final one at the end of warmup, then constant."""
        o = self.cfg.objective
        warmup = self._steps(o.warmup_teacher_temp_epochs)
        if step >= warmup:
            return o.teacher_temp
        return o.warmup_teacher_temp + (o.teacher_temp - o.warmup_teacher_temp) * step / warmup

    def last_layer_frozen(self, step: int) -> bool:
        return step < self._steps(self.cfg.objective.freeze_last_layer_epochs)
