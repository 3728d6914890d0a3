"""Run by tests/integration/test_host_syncs.py under torchrun: `biodino train` on every rank inside a sync census,
writing the host syncs of each optimizer step to OUT/syncs_rank<R>.json.

Usage: torchrun --nproc-per-node W tests/census_train.py OUT key=value ...
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.sync_census import SyncCensus  # noqa: E402
from biodino.config.recipe import load_config  # noqa: E402
from biodino.run import trainer as trainer_module  # noqa: E402


class Mark(L.Callback):
    """The census count at the end of every optimizer step."""

    def __init__(self, census: SyncCensus) -> None:
        self.census, self.counts = census, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.counts.append(self.census.count)


def main(out: Path, overrides: list[str]) -> None:
    census = SyncCensus()
    mark = Mark(census)
    build = trainer_module.build_trainer

    def with_mark(cfg, run):
        trainer = build(cfg, run)
        trainer.callbacks.insert(0, mark)
        return trainer

    trainer_module.build_trainer = with_mark
    with census:
        trainer_module.train(load_config("tiny", overrides))
    steps = [b - a for a, b in zip(mark.counts, mark.counts[1:])]
    (out / f"syncs_rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"per_step": steps,
                                                                                  "sites": census.sites.most_common(8)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
