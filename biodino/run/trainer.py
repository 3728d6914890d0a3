"""Building and running a training run: run directory, module, data, loggers, callbacks, Trainer."""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only

from biodino.data.datamodule import ShardDataModule
from biodino.data.shard_index import resolve_shards
from biodino.models import PRESETS, preset_config
from biodino.ssl.module import SSLModule
from biodino.ssl.objectives import OBJECTIVES
from biodino.ssl.param_groups import param_groups
from biodino.fs.atomic import atomic_write_text
from biodino.interop.init_weights import load_full_weights
from biodino.checkpoint.integrity import AtomicCheckpointIO, remove_partial
from biodino.run.checkpointing import StepCheckpoint, resumable_checkpoint
from biodino.config.schema import ConfigError, TrainConfig
from biodino.config.checks import leaves
from biodino.run.history import History
from biodino.run.monitor import EvalMonitor
from biodino.run.progress import ProgressBar
from biodino.run.interrupt import StopOnSignal, requeue_job, stop_signal
from biodino.run.loggers import finish, loggers
from biodino.config.recipe import load_config, to_yaml
from biodino.checkpoint.run_dir import RunDir
from biodino.run.run_lock import run_lock
from biodino.distributed.sharding import parallelize
from biodino.distributed.strategy import build_strategy
from biodino.run.throughput import Throughput



@dataclass(frozen=True)
class RunResult:
    run: RunDir
    stopped_by: Optional[int] = None  # the signal that stopped training after its save; None: ran to the end


def check_runnable(cfg: TrainConfig, check_init: bool = True) -> None:
    """What the config's value ranges cannot tell alone (presets, patch sizes, the objective, the data), raised as
    ConfigError naming the key before anything is written."""
    if cfg.model.preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {cfg.model.preset!r}; available: {', '.join(PRESETS)}")
    patch = preset_config(cfg.model.preset).patch_size
    sizes = [("crops.global_size", cfg.crops.global_size)]
    sizes += [("crops.local_size", cfg.crops.local_size)] if cfg.crops.num_local else []
    for key, size in sizes:
        if size % patch:
            raise ConfigError(f"{key}: {size} is not a multiple of the patch size {patch} of {cfg.model.preset}")
    OBJECTIVES[cfg.objective.name].check(cfg)
    if not cfg.data.shards:
        raise ConfigError("data.shards: missing required value (a shard index or glob)")
    resolve_shards(cfg.data.shards)
    if cfg.eval.data and not Path(cfg.eval.data).is_dir():
        raise ConfigError(f"eval.data: folder not found: {cfg.eval.data}")
    monitored = cfg.checkpoint.monitor
    if monitored and not (cfg.eval.data and monitored.startswith(tuple(f"eval/{p}_" for p in cfg.eval.protocols))):
        raise ConfigError(f"checkpoint.monitor: {monitored!r} is not a metric of the online monitor; set eval.data and "
                          f"name one of its protocols ({', '.join(cfg.eval.protocols)}), e.g. eval/knn_top1")
    if check_init and cfg.init.full_weights and not Path(cfg.init.full_weights).is_file():
        raise ConfigError(f"init.full_weights: file not found: {cfg.init.full_weights}")


def build_module(cfg: TrainConfig) -> SSLModule:
    """The objective's module, with the recipe's distribution (compile, FSDP2) to apply in ``configure_model``."""
    module = OBJECTIVES[cfg.objective.name](cfg)
    module.parallelize = partial(parallelize, cfg=cfg.trainer)
    return module


def architecture(cfg: TrainConfig) -> dict[str, tuple]:
    """What a checkpoint must match to resume: every module tensor's shape and the optimizer's group sizes
    (built on the meta device: no memory, no initialization)."""
    with torch.device("meta"):
        module = build_module(cfg)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    o = cfg.optim
    groups = param_groups(module.student, o)
    shapes["optimizer parameter groups"] = tuple(len(g["params"]) for g in groups)
    return shapes


def check_compatible(run: RunDir, cfg: TrainConfig) -> None:
    """A run with checkpoints resumes only with the architecture it was trained with: a changed preset, head,
    resolution or parameter grouping is refused, naming the changed keys, before its config.yaml is touched."""
    if not run.config.is_file() or run.newest_checkpoint() is None:
        return
    old = load_config(str(run.config))
    before, after = architecture(old), architecture(cfg)
    if before == after:
        return
    changed = [f"{k}: {a!r} -> {b!r}" for (k, a, _), (_, b, _) in zip(leaves(old), leaves(cfg)) if a != b]
    first = next(k for k in sorted({*before, *after}) if before.get(k) != after.get(k))
    raise ConfigError(f"{run.root} was trained with another architecture ({first}: {before.get(first)} -> "
                      f"{after.get(first)}); changed: {'; '.join(changed)}. Start a new run (name=...) or use "
                      "init.full_weights to start from its weights")


def precision(cfg: TrainConfig) -> str:
    if cfg.trainer.precision is not None:
        return cfg.trainer.precision
    on_gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu else "32-true"


def build_trainer(cfg: TrainConfig, run: RunDir) -> L.Trainer:
    s = cfg.schedule
    slurm = SLURMEnvironment.detect()
    history = History(run.history, run.plots if cfg.logging.plots else None, run.logs / "metrics.csv",
                      cfg.trainer.log_every_n_steps)
    # In this order at each step's end: the monitor's and Throughput's numbers are part of the step History reads,
    # and every metric of the step is recorded before StopOnSignal or StepCheckpoint saves (a save reads them).
    monitor = EvalMonitor(cfg) if cfg.eval.data else None
    best = (cfg.checkpoint.monitor, monitor.metrics_of) if monitor and cfg.checkpoint.monitor else None
    callbacks = [*([monitor] if monitor else []), Throughput(s.batch_size), history, ProgressBar(history),
                 StopOnSignal(requeue=slurm),
                 StepCheckpoint(run.checkpoints, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last,
                                s.steps_per_epoch, best)]
    plugins: list = [AtomicCheckpointIO()]
    if slurm:  # our requeue saves at a step boundary; Lightning's saves inside the handler
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
                     strategy=build_strategy(cfg.trainer.strategy), precision=precision(cfg),
                     max_steps=s.total_steps, max_epochs=s.epochs, limit_train_batches=s.steps_per_epoch
                     * s.accumulate_grad_batches, accumulate_grad_batches=s.accumulate_grad_batches,
                     callbacks=callbacks, logger=loggers(cfg, run) or False,
                     log_every_n_steps=cfg.trainer.log_every_n_steps, default_root_dir=str(run.root),
                     num_sanity_val_steps=0, use_distributed_sampler=False, plugins=plugins)


def train(cfg: TrainConfig) -> RunResult:
    """Train from ``cfg`` in ``runs_dir/name``, holding the directory's lock; started again on the same directory,
    it resumes from the newest checkpoint that verifies (model, optimizer, schedules, centers, data position)."""
    run = RunDir(Path(cfg.runs_dir) / cfg.name)
    rank0 = rank_zero_only.rank == 0  # known from RANK / SLURM_PROCID before the process group exists
    with run_lock(run.lock) if rank0 else nullcontext():
        if rank0:
            check_compatible(run, cfg)  # before anything of the run directory is touched
        run.create()
        if rank0:
            remove_partial(run.checkpoints)
            atomic_write_text(run.config, to_yaml(cfg))
        resume: Optional[Path] = resumable_checkpoint(run)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        module = build_module(cfg)
        if resume is None and cfg.init.full_weights:
            load_full_weights(module, Path(cfg.init.full_weights))
        trainer = build_trainer(cfg, run)
        try:
            trainer.fit(module, datamodule=ShardDataModule(cfg, module.mask_shape), ckpt_path=resume,
                        weights_only=True)
        finally:
            finish(trainer.loggers)
        requeue_job(trainer)
        return RunResult(run, stop_signal(trainer))

