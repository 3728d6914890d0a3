"""``biodino slurm``: an sbatch script rendered from ``slurm/train.sbatch.template`` for a recipe, and its submission."""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Optional, Sequence

from biodino.config.schema import TrainConfig
from biodino.config.resources import slurm_template


@dataclass(frozen=True)
class Allocation:
    """What the job asks of Slurm. ``gpus_per_node=0`` runs one CPU task per node (tests, CPU clusters)."""

    nodes: int
    gpus_per_node: int
    cpus_per_task: Optional[int] = None
    partition: Optional[str] = None
    time: Optional[str] = None
    account: Optional[str] = None
    extra: Sequence[str] = field(default_factory=tuple)  # further "#SBATCH" options, e.g. "--qos=high"

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes must be at least 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node must be 0 (CPU) or more, got {self.gpus_per_node}")

    @property
    def tasks_per_node(self) -> int:
        return max(self.gpus_per_node, 1)


def world_overrides(alloc: Allocation) -> list[str]:
    """The allocation's world size as ``biodino train`` overrides (appended last, so they win)."""
    out = [f"trainer.num_nodes={alloc.nodes}", f"trainer.devices={alloc.tasks_per_node}"]
    return out + (["trainer.accelerator=cpu"] if alloc.gpus_per_node == 0 else [])


def recipe_args(recipe: str, overrides: Sequence[str]) -> list[str]:
    """``biodino train`` arguments; a recipe file becomes an absolute path, found from any working directory."""
    path = Path(recipe)
    return [str(path.resolve()) if path.is_file() else recipe, *overrides]


def render(cfg: TrainConfig, train_args: Sequence[str], alloc: Allocation, workdir: Optional[Path] = None,
           python: str = sys.executable) -> str:
    """The sbatch script running ``python -m biodino train TRAIN_ARGS`` on the allocation. ``cfg`` (already
    validated by the caller) names the job and sizes the CPUs per task."""
    resources = f"#SBATCH --gpus-per-node={alloc.gpus_per_node}\n" if alloc.gpus_per_node else ""
    cpus = alloc.cpus_per_task or cfg.data.num_workers + 2
    resources += f"#SBATCH --cpus-per-task={cpus}\n"
    optional = [f"#SBATCH --{key}={value}" for key, value in
                (("partition", alloc.partition), ("time", alloc.time), ("account", alloc.account)) if value]
    optional += [f"#SBATCH {option}" for option in alloc.extra]
    command = [python, "-m", "biodino", "train", *train_args, *world_overrides(alloc)]
    return Template(slurm_template().read_text()).substitute(
        job_name=f"biodino-{cfg.name}", nodes=alloc.nodes, tasks_per_node=alloc.tasks_per_node,
        resources=resources, output="%x-%j.out", workdir=str((workdir or Path.cwd()).resolve()),
        optional="\n".join(optional), threads=max(cpus - cfg.data.num_workers, 1),
        command=" ".join(shlex.quote(a) for a in command))


def submit(script: str, after: Optional[str] = None, sbatch: str = "sbatch") -> str:
    """``sbatch --parsable`` with the script on stdin, after job ``after`` succeeded if given; returns the job id."""
    cmd = [sbatch, "--parsable"] + ([f"--dependency=afterok:{after}"] if after else [])
    proc = subprocess.run(cmd, input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def submit_chain(scripts: Sequence[str], sbatch: str = "sbatch") -> list[str]:
    """One job per script, each starting only after the previous one completed successfully."""
    ids: list[str] = []
    for script in scripts:
        ids.append(submit(script, ids[-1] if ids else None, sbatch))
    return ids
