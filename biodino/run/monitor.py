"""The online monitor: at an interval, the teacher's embeddings of a held-out labelled folder (``eval.data``) and
biodino eval's protocols on them, logged as ``eval/<protocol>_<metric>`` with the step's other metrics (so they
reach history.jsonl, metrics.csv, wandb and ``plots/eval.png``), plus ``eval/seconds``, what it cost.

The images are decoded once, resized to the global crop size and kept as uint8; per class, alternate images
form the gallery (train) and the queries (test). Every rank embeds all of them: under FSDP each forward needs
every rank, and identical inputs give every rank the same numbers with no gathering.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchvision.transforms import v2 as T

from biodino.config.schema import ConfigError, TrainConfig
from biodino.eval.embed import load_rgb
from biodino.eval.embed_inputs import labelled_paths
from biodino.eval.protocols import Options, Split, evaluate


def held_out(folder: str, max_images: int) -> tuple[list[Path], list[int]]:
    """Up to ``max_images`` images of the class sub-folders, spread evenly over the classes; their class ids."""
    paths, labels = labelled_paths([folder])
    if labels is None or len(set(labels)) < 2:
        raise ConfigError(f"eval.data: {folder} needs at least two class sub-folders holding images")
    names = sorted(set(labels))
    per_class = [[p for p, lab in zip(paths, labels) if lab == name] for name in names]
    take = max(2, max_images // len(names))
    chosen = [(p, i) for i, files in enumerate(per_class) for p in files[:take]]
    return [p for p, _ in chosen], [i for _, i in chosen]


class EvalMonitor(L.Callback):
    """Runs the protocols every ``every`` optimizer steps and at the end of training."""

    def __init__(self, cfg: TrainConfig) -> None:
        e = cfg.eval
        self.every = e.every_n_steps or cfg.checkpoint.every_n_steps
        self.protocols, self.options = list(e.protocols), Options(k=e.k, seed=cfg.seed)
        paths, labels = held_out(e.data, e.max_images)
        size = cfg.crops.global_size
        resize = T.Compose([T.ToImage(), T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                            T.CenterCrop(size)])
        self.images = torch.stack([resize(load_rgb(p)) for p in paths])  # uint8, decoded once
        self.labels = torch.tensor(labels)
        self.latest: tuple[int, dict[str, float]] = (-1, {})  # the step last evaluated and its metrics
        seen: Counter = Counter()
        rank_in_class = []
        for label in labels:
            rank_in_class.append(seen[label])
            seen[label] += 1
        # alternate images of each class: gallery, query, gallery, ... (host index lists: no device sync)
        self.gallery = torch.tensor([i for i, r in enumerate(rank_in_class) if r % 2 == 0])
        self.queries = torch.tensor([i for i, r in enumerate(rank_in_class) if r % 2 == 1])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        if trainer.global_step % self.every == 0 or trainer.global_step == trainer.max_steps:
            self.run(trainer, pl_module)

    @torch.no_grad()
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, batch_size: int = 128) -> dict[str, float]:
        start = time.perf_counter()
        device = pl_module.device
        chunks = []
        for x in self.images.split(batch_size):
            x = pl_module.photometric.normalize(x.to(device))
            with trainer.precision_plugin.forward_context():
                (out,) = pl_module.teacher([x])  # the network call: FSDP gathers the root's parameters too
            chunks.append(out.cls.float())
        embeddings, labels = torch.cat(chunks), self.labels.to(device)
        train, test = (Split(embeddings[part.to(device)], labels[part.to(device)]) for part in (self.gallery,
                                                                                              self.queries))
        results = evaluate(train, test, self.protocols, self.options)
        metrics = {f"eval/{p}_{m}": v for p, values in results.items() for m, v in values.items()}
        metrics["eval/seconds"] = time.perf_counter() - start
        pl_module.step_metrics.log_dict(trainer.global_step - 1, metrics)
        self.latest = (trainer.global_step - 1, metrics)
        return metrics

    def metrics_of(self, step: int) -> dict[str, float]:
        """The metrics of ``step`` if it was evaluated last, else none."""
        return self.latest[1] if self.latest[0] == step else {}
