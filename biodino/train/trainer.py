"""Building and running a training run: run directory, module, data, loggers, callbacks, Trainer."""

from __future__ import annotations

import netrc
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from biodino.data.datamodule import ShardDataModule
from biodino.ssl.dinov2 import DINOv2Module, check_objective
from biodino.ssl.franca import FrancaModule, check_franca
from biodino.ssl.module import SSLModule
from biodino.train import full_weights
from biodino.train.checkpointing import AtomicCheckpointIO, StepAndEpochCheckpoint, remove_partial
from biodino.train.config import TrainConfig
from biodino.train.history import History
from biodino.train.recipe import to_yaml
from biodino.train.requeue import Requeue, requeue_job
from biodino.train.run_dir import RunDir
from biodino.train.sharding import mixed_precision
from biodino.train.strategy import build_strategy
from biodino.train.throughput import Throughput

OBJECTIVES: dict[str, type[SSLModule]] = {"dinov2": DINOv2Module, "franca": FrancaModule}
WANDB_MODES = ("auto", "online", "offline", "disabled")


CHECKS = {"dinov2": check_objective, "franca": check_franca}


def validate(cfg: TrainConfig) -> None:
    """Every config error that building the run would hit, raised before anything is written."""
    if cfg.objective.name not in OBJECTIVES:
        raise ValueError(f"objective.name must be one of {sorted(OBJECTIVES)}, got {cfg.objective.name!r}")
    CHECKS[cfg.objective.name](cfg)
    wandb_mode(cfg)
    build_strategy(cfg.trainer.strategy)
    if cfg.trainer.strategy == "fsdp":
        mixed_precision(cfg.trainer.fsdp, "cpu")


def build_module(cfg: TrainConfig) -> SSLModule:
    validate(cfg)
    return OBJECTIVES[cfg.objective.name](cfg)


def precision(cfg: TrainConfig) -> str:
    if cfg.trainer.precision is not None:
        return cfg.trainer.precision
    on_gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu else "32-true"


def wandb_mode(cfg: TrainConfig) -> str:
    """``auto``: online when an API key is configured (environment or ~/.netrc), else offline."""
    mode = cfg.logging.wandb
    if mode not in WANDB_MODES:
        raise ValueError(f"logging.wandb must be one of {WANDB_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"


def loggers(cfg: TrainConfig, run: RunDir) -> list[Logger]:
    """A CSV logger always; wandb unless disabled, resuming the run id stored in the run directory."""
    out: list[Logger] = [CSVLogger(str(run.logs), name="", version="")]
    mode = wandb_mode(cfg)
    if mode != "disabled" and rank_zero_only.rank == 0:  # only rank 0 logs; only it creates the stored run id
        out.append(WandbLogger(project=cfg.logging.project, name=cfg.name, id=run.wandb_id(), resume="allow",
                               save_dir=str(run.logs), mode=mode, config=asdict(cfg)))
    return out


def build_trainer(cfg: TrainConfig, run: RunDir) -> L.Trainer:
    s = cfg.schedule
    callbacks = [StepAndEpochCheckpoint(run.checkpoints, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last),
                 History(run.history, run.plots if cfg.logging.plots else None),
                 Throughput(s.batch_size)]
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # our requeue saves at a step boundary; Lightning's saves inside the handler
        plugins.append(SLURMEnvironment(auto_requeue=False))
        callbacks.append(Requeue())
    return L.Trainer(accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
                     strategy=build_strategy(cfg.trainer.strategy), precision=precision(cfg),
                     max_steps=s.total_steps, max_epochs=s.epochs, limit_train_batches=s.steps_per_epoch
                     * s.accumulate_grad_batches, accumulate_grad_batches=s.accumulate_grad_batches,
                     callbacks=callbacks, logger=loggers(cfg, run), log_every_n_steps=cfg.trainer.log_every_n_steps,
                     default_root_dir=str(run.root), num_sanity_val_steps=0, use_distributed_sampler=False,
                     plugins=plugins)


def train(cfg: TrainConfig) -> RunDir:
    """Train from ``cfg`` in ``runs_dir/name``; started again on the same directory, it resumes from the
    newest complete checkpoint (model, optimizer, schedules, centers, RNG, data position)."""
    run = RunDir(Path(cfg.runs_dir) / cfg.name).create()
    if rank_zero_only.rank == 0:  # known from RANK / SLURM_PROCID before the process group exists
        remove_partial(run.checkpoints)
        tmp = run.config.with_suffix(".tmp")
        tmp.write_text(to_yaml(cfg))
        os.replace(tmp, run.config)
    resume: Optional[Path] = run.newest_checkpoint()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg)
    if resume is None and cfg.init.full_weights:
        full_weights.load_into(module, Path(cfg.init.full_weights))
    trainer = build_trainer(cfg, run)
    trainer.fit(module, datamodule=ShardDataModule(cfg), ckpt_path=resume, weights_only=True)
    requeue_job(trainer)
    return run
