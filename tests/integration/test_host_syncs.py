"""A sync census of a real ``biodino train`` run: the host may wait for the device at most twice per optimizer step
in the steady state (logging every 1000 steps). Counted with a TorchDispatchMode over every op the training process
runs: reading a device scalar (``_local_scalar_dense``: ``.item()``, ``float()``, ``bool()``, ``if tensor``),
``nonzero`` and boolean-mask indexing (their output size must be read back). On a GPU each of these stalls the step."""

from __future__ import annotations

import collections
import traceback

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from biodino.config.recipe import load_config
from biodino.run import trainer as trainer_module

READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::item", "aten::masked_select",
         "aten::equal", "aten::_unique2", "aten::unique_consecutive"}
BOOL_INDEXED = {"aten::index", "aten::index_put", "aten::index_put_"}


class SyncCensus(TorchDispatchMode):
    """Counts the ops that make the host wait for the device, with where they were called from."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.sites: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        indices = args[1] if name in BOOL_INDEXED and len(args) > 1 else None
        if name in READS or (indices and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)):
            self.count += 1
            frames = [f for f in traceback.extract_stack() if "python_dispatch" not in f.filename][-4:-1]
            self.sites[" <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in frames)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("recipe", ["tiny", "franca_bioscan5m"])
def test_steady_state_steps_make_at_most_two_host_syncs(recipe, tiny_shards, tmp_path, monkeypatch) -> None:
    tiny_franca = ["model.preset=vit_tiny_p16", "crops.global_size=64", "crops.local_size=32", "crops.num_local=2",
                   "objective.dino.head.num_prototypes=64", "objective.ibot.head.num_prototypes=64",
                   "objective.dino.head.hidden_dim=32", "objective.dino.head.bottleneck_dim=16",
                   "objective.ibot.head.hidden_dim=32", "objective.ibot.head.bottleneck_dim=16",
                   "objective.franca.sinkhorn_queue_size=8", "schedule.accumulate_grad_batches=2"]
    cfg = load_config(recipe, [f"data.shards={tiny_shards}", f"runs_dir={tmp_path}", "name=census",
                               "schedule.batch_size=4", "schedule.epochs=1", "schedule.steps_per_epoch=10",
                               "checkpoint.every_n_steps=1000", "trainer.log_every_n_steps=1000",
                               "data.num_workers=1", "logging.wandb=disabled", "logging.plots=false",
                               "trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto",
                               *(tiny_franca if recipe != "tiny" else [])])
    census, per_step = SyncCensus(), []

    class Mark(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:  # the end of an optimizer step
                per_step.append(census.count)

    build = trainer_module.build_trainer
    monkeypatch.setattr(trainer_module, "build_trainer", lambda c, r: _with(build(c, r), Mark()))
    with census:  # data workers are other processes: only the training process is counted
        trainer_module.train(cfg)
    steady = [b - a for a, b in zip(per_step[1:], per_step[2:-1])]  # steps 2 .. 9: no first step, no final save
    assert len(steady) == 7 and max(steady) <= 2, (steady, census.sites.most_common(8))


def _with(trainer: L.Trainer, callback: L.Callback) -> L.Trainer:
    trainer.callbacks.insert(0, callback)
    return trainer
