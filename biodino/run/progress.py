"""The progress bar, showing the metrics History last read instead of reading device values at every refresh."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from biodino.run.history import History

SHOWN = ("loss/total", "lr")


class ProgressBar(TQDMProgressBar):
    """Lightning's bar; its metrics are host numbers from the last read (every ``log_every_n_steps`` steps)."""

    def __init__(self, history: History) -> None:
        super().__init__()
        self.history = history

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        shown = {k.split("/")[-1] if k.startswith("loss/") else k: v
                 for k, v in self.history.latest.items() if k in SHOWN}
        return {**super().get_metrics(trainer, pl_module), **shown}
