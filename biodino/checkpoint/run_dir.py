"""A run's directory: ``runs/<name>/`` with config.yaml, checkpoints/, logs/ and plots/."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from biodino.fs.atomic import atomic_write_text

CHECKPOINT_PATTERN = re.compile(r"^step=(\d+)\.ckpt$")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def history(self) -> Path:
        """One JSON line per optimizer step (losses, schedules); appended across resumes."""
        return self.logs / "history.jsonl"

    def create(self) -> "RunDir":
        for d in (self.checkpoints, self.logs, self.plots):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def checkpoints_newest_first(self) -> list[Path]:
        """Complete checkpoints (saves appear only once written: atomic renames), highest step first."""
        found = [(int(m.group(1)), p) for p in self.checkpoints.glob("step=*.ckpt")
                 if (m := CHECKPOINT_PATTERN.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def newest_checkpoint(self) -> Optional[Path]:
        """The checkpoint of the highest step (not verified: see ``checkpointing.resumable_checkpoint``)."""
        found = self.checkpoints_newest_first()
        return found[0] if found else None

    def newest_step(self) -> int:
        """The step of the newest checkpoint (-1 without one)."""
        newest = self.newest_checkpoint()
        return int(CHECKPOINT_PATTERN.match(newest.name).group(1)) if newest else -1

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def wandb_id(self) -> str:
        """The run's wandb id, created once and kept, so a resumed run continues the same wandb run."""
        path = self.root / "wandb_id"
        if not path.exists():
            atomic_write_text(path, uuid.uuid4().hex[:12] + "\n")
        return path.read_text().strip()
