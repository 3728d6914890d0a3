"""Per-step history (logs/history.jsonl, every optimizer step), the metrics table (logs/metrics.csv, every
``trainer.log_every_n_steps`` steps), both appended across resumes, and the PNG curves drawn from the history.

Both are written every ``log_every_n_steps`` steps and before every checkpoint, so every step a checkpoint holds
is in the logs even if the process dies right after the save. (Lightning's own CSV logger writes its rows after
the checkpoint, and empties the file when a run resumes.)
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Optional

import lightning as L

PLOTS = {"losses": ("loss/",), "schedules": ("lr", "wd", "momentum", "teacher_temp"),
         "optimization": ("grad_norm",), "throughput": ("perf/",), "eval": ("eval/",)}


def read_history(path: Path) -> dict[int, dict[str, float]]:
    """Metrics by step; a step logged twice (re-run after a resume) keeps its last record."""
    steps: dict[int, dict[str, float]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                steps[int(record.pop("step"))] = record
    return dict(sorted(steps.items()))


class MetricsTable:
    """A CSV file of one row per logged step, appended; a metric seen for the first time widens the header (the
    file is then rewritten once with the old rows kept)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.columns: list[str] = []
        if path.is_file():
            with path.open(newline="") as f:
                self.columns = next(csv.reader(f), [])

    def append(self, row: dict[str, Any]) -> None:
        new = sorted(set(row) - set(self.columns))
        if new:
            old_rows = list(csv.DictReader(self.path.open(newline=""))) if self.path.is_file() else []
            self.columns = ["step", *sorted((set(self.columns) | set(new)) - {"step"})]
            self._write("w", [*old_rows, row])
        else:
            self._write("a", [row])

    def _write(self, mode: str, rows: list[dict[str, Any]]) -> None:
        with self.path.open(mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)


class History(L.Callback):
    """Reads the steps' metrics (``SSLModule.step_metrics``) every ``every`` optimizer steps, before every
    checkpoint and at the end, with one host-device synchronization per read; rank 0 appends every step to the
    history, every ``every``-th to the metrics table and the loggers (wandb). Each read also stops the run on a
    non-finite loss (``SSLModule.check_finite``), before a checkpoint could hold it. Curves are drawn at epoch ends.
    """

    def __init__(self, path: Path, plots_dir: Optional[Path], table: Optional[Path] = None, every: int = 1) -> None:
        self.path, self.plots_dir, self.every = path, plots_dir, every
        self.table = MetricsTable(table) if table is not None else None
        self.latest: dict[str, float] = {}  # the last step read, for the progress bar

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        if trainer.global_step % self.every == 0 or trainer.global_step == trainer.max_steps:
            self.read(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.read(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.read(trainer, pl_module)

    def read(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps = pl_module.step_metrics.read()
        if steps:
            if trainer.global_rank == 0:
                self._write(trainer, steps)
            self.latest = steps[max(steps)]
        pl_module.check_finite(steps)  # also when empty: with several ranks it is a collective every rank joins

    def _write(self, trainer: L.Trainer, steps: dict[int, dict[str, float]]) -> None:
        with self.path.open("a") as f:
            f.writelines(json.dumps({"step": step, **metrics}) + "\n" for step, metrics in steps.items())
        for step, metrics in steps.items():
            if step % self.every == 0 or step + 1 == trainer.max_steps:
                if self.table is not None:
                    self.table.append({"step": step, **metrics, "epoch": trainer.current_epoch})
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.plots_dir is not None and trainer.global_rank == 0:
            draw(read_history(self.path), self.plots_dir)


def draw(history: dict[int, dict[str, float]], out: Path) -> list[Path]:
    """One PNG per group of metrics (losses, schedules, optimization, throughput)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    keys = sorted({k for record in history.values() for k in record})
    for name, prefixes in PLOTS.items():
        chosen = [k for k in keys if k.startswith(prefixes)]
        if not chosen:
            continue
        fig, axes = plt.subplots(len(chosen), 1, figsize=(7, 2.2 * len(chosen)), squeeze=False, sharex=True)
        for ax, key in zip(axes[:, 0], chosen):
            points = [(s, r[key]) for s, r in history.items() if key in r and math.isfinite(r[key])]
            ax.plot([s for s, _ in points], [v for _, v in points], lw=1)
            ax.set_ylabel(key, fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
