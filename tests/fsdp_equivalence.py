"""Run by tests/integration/test_fsdp.py under torchrun: train the tiny DINOv2 for a few steps on fixed global batches,
each rank taking its slice of every batch, and write per-step losses, the gradient reduce-scatters per optimizer
step, a consolidated state dict and a sharded checkpoint to OUT.

Usage: torchrun --nproc-per-node W tests/fsdp_equivalence.py OUT fsdp|ddp [key=value ...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from biodino.config.recipe import load_config
from biodino.distributed.strategy import build_strategy
from biodino.run.trainer import build_module

STEPS, GLOBAL_BATCH, N_LOCAL = 5, 8, 2


def global_batch(step: int, global_size: int, local_size: int, patches: int) -> dict[str, torch.Tensor]:
    """The same normalized crops and iBOT masks for every world size (crop-major, as the collate lays them out)."""
    g = torch.Generator().manual_seed(1000 + step)
    return {"global_crops": torch.randn(2, GLOBAL_BATCH, 3, global_size, global_size, generator=g),
            "local_crops": torch.randn(N_LOCAL, GLOBAL_BATCH, 3, local_size, local_size, generator=g),
            "masks": torch.rand(2, GLOBAL_BATCH, patches, generator=g) < 0.3}


def rank_slice(batch: dict[str, torch.Tensor], rank: int, world: int, step: int) -> dict[str, torch.Tensor]:
    per_rank = GLOBAL_BATCH // world
    part = {k: v[:, rank * per_rank:(rank + 1) * per_rank].flatten(0, 1) for k, v in batch.items()}
    return {**part, "batch_index": torch.tensor(step)}


class Losses(L.Callback):
    """Per optimizer step: the losses, the gradient norm and the reduce-scatters FSDP issued during the step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.reduce_scatters = 0
        real = torch.distributed.reduce_scatter_single  # what FSDP2 calls to reduce gradients

        def counted(*args: object, **kwargs: object) -> object:
            self.reduce_scatters += 1
            return real(*args, **kwargs)

        torch.distributed.reduce_scatter_single = counted

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        for m in module.step_metrics.read().values():
            self.steps.append({**{k: v for k, v in m.items() if k.startswith("loss/") or k == "grad_norm"},
                               "reduce_scatters": self.reduce_scatters})
        self.reduce_scatters = 0


def main(out: Path, strategy: str, overrides: list[str]) -> None:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cfg = load_config("tiny", [f"schedule.batch_size={GLOBAL_BATCH // world}", f"trainer.devices={world}",
                               "objective.koleo.weight=0", "model.drop_path_rate=0", "objective.ibot.weight=1",
                               "objective.ibot.mask_sample_probability=1", "optim.clip_grad=0.05",
                               "optim.warmup_epochs=0", *overrides])
    L.seed_everything(cfg.seed, verbose=False)  # as `biodino train` does: FSDP2 needs equal weights on every rank
    module = build_module(cfg)
    patches = (cfg.crops.global_size // module.student.backbone.cfg.patch_size) ** 2
    accumulate = cfg.schedule.accumulate_grad_batches
    batches = [rank_slice(global_batch(s, cfg.crops.global_size, cfg.crops.local_size, patches), rank, world, s)
               for s in range(STEPS * accumulate)]
    losses = Losses()
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=build_strategy(strategy), max_steps=STEPS,
                        accumulate_grad_batches=accumulate,
                        callbacks=[losses], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    trainer.save_checkpoint(out / "sharded.ckpt")
    (out / f"losses_rank{rank}.json").write_text(json.dumps(losses.steps))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, out / "consolidated.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
