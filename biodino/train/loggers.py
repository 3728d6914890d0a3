"""The run's loggers: CSV always (``logs/metrics.csv``, appended across resumes), wandb unless disabled (one wandb
run per run directory, its id stored there so a resumed run continues it; a schedule's stages grouped)."""

from __future__ import annotations

import csv
import netrc
import os
from dataclasses import asdict

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from biodino.train.config import TrainConfig
from biodino.train.run_dir import RunDir



class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts; this one keeps its rows and
    starts from its columns, so a resumed run appends (steps redone after a resume appear again, later rows last)."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class AppendingCSVLogger(CSVLogger):
    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


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
    """A CSV logger always; wandb on rank 0 unless disabled, under the run id stored in the run directory."""
    out: list[Logger] = [AppendingCSVLogger(str(run.logs), name="", version="",  # each logged row written at once
                                            flush_logs_every_n_steps=cfg.trainer.log_every_n_steps)]
    mode = wandb_mode(cfg)
    if mode != "disabled" and rank_zero_only.rank == 0:  # only rank 0 logs; only it creates the stored run id
        out.append(WandbLogger(project=cfg.logging.project, name=cfg.name, id=run.wandb_id(), resume="allow",
                               group=cfg.logging.group, save_dir=str(run.logs), mode=mode, config=asdict(cfg)))
    return out


def finish(loggers: list[Logger]) -> None:
    """End this run's wandb run: the next run in this process (a schedule's next stage) starts its own
    instead of logging into this one (``wandb.init`` reuses a run still open)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
