"""wandb, unless disabled: one wandb run per run directory, its id stored there so that a resumed run continues it,
and a schedule's stages grouped under the schedule's name. (The CSV table is written by ``history.History``.)"""

from __future__ import annotations

import netrc
import os
from dataclasses import asdict

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from biodino.config.schema import TrainConfig
from biodino.checkpoint.run_dir import RunDir


def wandb_mode(cfg: TrainConfig) -> str:
    """``auto``: online when an API key is configured (environment or ~/.netrc), else offline."""
    mode = cfg.logging.wandb
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"


def loggers(cfg: TrainConfig, run: RunDir) -> list[Logger]:
    """wandb on rank 0 unless disabled, under the run id stored in the run directory (else no logger)."""
    if wandb_mode(cfg) == "disabled" or rank_zero_only.rank != 0:  # only rank 0 logs and creates the stored id
        return []
    return [WandbLogger(project=cfg.logging.project, name=cfg.name, id=run.wandb_id(), resume="allow",
                        group=cfg.logging.group, save_dir=str(run.logs), mode=wandb_mode(cfg), config=asdict(cfg))]


def finish(loggers: list[Logger]) -> None:
    """End this run's wandb run: the next run in this process (a schedule's next stage) starts its own
    instead of logging into this one (``wandb.init`` reuses a run still open)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
