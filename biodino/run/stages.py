"""Staged schedules: recipes run in order, each stage starting from the previous stage's final full weights
(student, teacher, heads, centers; fresh optimizer and schedules; position embeddings resized to the stage's
resolution). A schedule file lists its stages::

    name: bio_dino
    stages:
      - {name: s1_224, recipe: stage1_224.yaml}             # a recipe file, relative to this file
      - {name: s2_252, recipe: stage2_252.yaml, overrides: [optim.base_lr=1e-4], export: best}

A stage's run is ``runs_dir/<schedule>-<stage>``; it is complete once its ``final.safetensors`` exists. Before
that, its teacher backbone is exported to ``export/backbone.safetensors`` (what a stage's evaluation job reads):
from the last checkpoint, or with ``export: best`` from the one where ``checkpoint.monitor`` was highest. The next
stage always continues from the last: its training picks up where this one ended.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from biodino.config.schema import TrainConfig
from biodino.config.recipe import ConfigError, find_recipe, load_config, read_yaml
from biodino.checkpoint.run_dir import RunDir
from biodino.run.run_lock import run_lock

STAGE_KEYS = {"name", "recipe", "overrides", "export"}
EXPORTS = ("last", "best")
FINAL_WEIGHTS = "final.safetensors"
STAGE_EXPORT = "export/backbone.safetensors"


@dataclass(frozen=True)
class Stage:
    name: str
    cfg: TrainConfig  # resolved; ``init.full_weights`` points at the previous stage's final weights
    train_args: tuple[str, ...]  # what ``biodino train`` needs to run this stage alone
    export: str = "last"  # the checkpoint its backbone export comes from: EXPORTS

    @property
    def final_weights(self) -> Path:
        return Path(self.cfg.runs_dir) / self.cfg.name / FINAL_WEIGHTS

    @property
    def exported(self) -> Path:
        return Path(self.cfg.runs_dir) / self.cfg.name / STAGE_EXPORT


def is_schedule(spec: str) -> bool:
    """A YAML file (or name under configs/) whose top level lists ``stages``."""
    try:
        path = find_recipe(spec)
    except ConfigError:
        return False
    raw = read_yaml(path)
    return isinstance(raw, dict) and "stages" in raw


def load_schedule(spec: str, overrides: Sequence[str] = ()) -> list[Stage]:
    """Every stage's resolved config; ``overrides`` apply to all stages, after each stage's own."""
    path = find_recipe(spec)
    raw = read_yaml(path)
    unknown = set(raw) - {"name", "stages"}
    if unknown:
        raise ConfigError(f"{path}: unknown schedule keys {sorted(unknown)} (expected name, stages)")
    entries = raw["stages"]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: stages must be a non-empty list")
    schedule = str(raw.get("name", path.stem))
    stages: list[Stage] = []
    for i, entry in enumerate(entries):
        stages.append(_stage(path, schedule, i, entry, overrides, stages[-1] if stages else None))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: stage names repeat: {names}")
    return stages


def _stage(path: Path, schedule: str, i: int, entry: object, overrides: Sequence[str],
           previous: Optional[Stage]) -> Stage:
    where = f"{path}: stages[{i}]"
    if not isinstance(entry, dict) or not {"name", "recipe"} <= set(entry) or set(entry) - STAGE_KEYS:
        raise ConfigError(f"{where} must have name and recipe (and optionally overrides, export), got {entry!r}")
    export = str(entry.get("export", "last"))
    if export not in EXPORTS:
        raise ConfigError(f"{where}.export must be one of {', '.join(EXPORTS)}, got {export!r}")
    recipe = str((path.parent / str(entry["recipe"])).resolve())
    own = [str(o) for o in entry.get("overrides", [])]
    run_name = f"{schedule}-{entry['name']}"
    cfg = load_config(recipe, [f"logging.group={schedule}", *own, *overrides, f"name={run_name}"])
    if previous is not None and not cfg.init.full_weights:
        cfg = replace(cfg, init=replace(cfg.init, full_weights=str(previous.final_weights)))
    if export == "best" and not cfg.checkpoint.monitor:
        raise ConfigError(f"{where}.export: best needs checkpoint.monitor (and eval.data) in the stage's config")
    return Stage(str(entry["name"]), cfg, (str(path.resolve()), "--stage", str(entry["name"]), *overrides), export)


def run_schedule(stages: Sequence[Stage], only: Optional[str] = None) -> tuple[list[Path], Optional[int]]:
    """Run the stages in order (or just ``only``), skipping completed ones; an interrupted stage resumes from its
    newest checkpoint. Returns the final-weights files of the stages run or found complete, and the signal that
    stopped a stage early (None when every stage asked for ran to its end)."""
    from lightning.pytorch.utilities import rank_zero_only  # Lightning and the model: only once a schedule runs

    from biodino.run.trainer import train

    if only is not None and only not in [s.name for s in stages]:
        raise ConfigError(f"--stage {only!r}: the schedule's stages are {[s.name for s in stages]}")
    done: list[Path] = []
    for i, stage in enumerate(stages):
        if only is not None and stage.name != only:
            continue
        if not stage.final_weights.exists():
            if i > 0 and not stages[i - 1].final_weights.exists():
                raise ConfigError(f"stage {stage.name!r} starts from {stages[i - 1].final_weights}, which does not "
                                  f"exist yet: run stage {stages[i - 1].name!r} first")
            run = RunDir(stage.final_weights.parent)
            with run_lock(run.lock) if rank_zero_only.rank == 0 else nullcontext():  # until its weights exist
                result = train(stage.cfg)
                if result.stopped_by is not None or run.newest_step() < stage.cfg.schedule.total_steps:
                    return done, result.stopped_by  # stopped early: the next start resumes this stage
                _write_export(stage)
                _write_final_weights(run.root / FINAL_WEIGHTS, stage.name)
        done.append(stage.final_weights)
    return done, None


def _write_export(stage: Stage) -> None:
    """Rank 0 exports the stage's teacher backbone from its last or best checkpoint (``Stage.export``)."""
    from lightning.pytorch.utilities import rank_zero_only

    from biodino.interop.export import export_backbone, load_training_state
    from biodino.run.checkpointing import BEST

    if rank_zero_only.rank != 0:
        return
    run = RunDir(stage.exported.parents[1])
    source = run.root
    best = run.checkpoints / BEST
    if stage.export == "best":
        if not best.is_file():
            raise ConfigError(f"stage {stage.name!r}: export: best, but {best} does not exist (no step was "
                              "evaluated by the monitor)")
        source = run.checkpoints / json.loads(best.read_text())["checkpoint"]
    export_backbone(load_training_state(source), stage.exported.parent, name=stage.exported.stem)


def _write_final_weights(path: Path, stage: str) -> None:
    """Rank 0 writes the stage's full weights from its newest checkpoint; every rank waits for the file."""
    import torch.distributed as dist
    from lightning.pytorch.utilities import rank_zero_only

    from biodino.interop.export import export_full, load_training_state

    if rank_zero_only.rank == 0:
        export_full(load_training_state(path.parent), path, stage=stage)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
