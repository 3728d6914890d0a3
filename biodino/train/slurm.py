"""``biodino slurm``: an sbatch script rendered from ``slurm/train.sbatch.template`` for a recipe, and its submission."""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Optional, Sequence

from biodino.train.recipe import CONFIGS_DIR, load_config

TEMPLATE = CONFIGS_DIR.parent / "slurm" / "train.sbatch.template"


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


def _resolved_recipe(recipe: str) -> str:
    """An absolute path when the recipe is a file, so the job finds it from any working directory."""
    path = Path(recipe)
    return str(path.resolve()) if path.is_file() else recipe


def train_command(recipe: str, alloc: Allocation, overrides: Sequence[str], python: str = sys.executable) -> str:
    """``python -m biodino train`` with the allocation's world size appended to the user's overrides."""
    world = [f"trainer.num_nodes={alloc.nodes}", f"trainer.devices={alloc.tasks_per_node}"]
    if alloc.gpus_per_node == 0:
        world.append("trainer.accelerator=cpu")
    args = [python, "-m", "biodino", "train", _resolved_recipe(recipe), *overrides, *world]
    return " ".join(shlex.quote(a) for a in args)


def render(recipe: str, alloc: Allocation, overrides: Sequence[str] = (), workdir: Optional[Path] = None) -> str:
    """The sbatch script. The recipe and overrides are validated first (a bad key fails here, not in the queue)."""
    cfg = load_config(recipe, [*overrides, f"trainer.num_nodes={alloc.nodes}",
                               f"trainer.devices={alloc.tasks_per_node}"])
    resources = ""
    if alloc.gpus_per_node:
        resources += f"#SBATCH --gpus-per-node={alloc.gpus_per_node}\n"
    cpus = alloc.cpus_per_task or cfg.data.num_workers + 2
    resources += f"#SBATCH --cpus-per-task={cpus}\n"
    optional = [f"#SBATCH --{key}={value}" for key, value in
                (("partition", alloc.partition), ("time", alloc.time), ("account", alloc.account)) if value]
    optional += [f"#SBATCH {option}" for option in alloc.extra]
    return Template(TEMPLATE.read_text()).substitute(
        job_name=f"biodino-{cfg.name}", nodes=alloc.nodes, tasks_per_node=alloc.tasks_per_node,
        resources=resources, output="%x-%j.out", workdir=str((workdir or Path.cwd()).resolve()),
        optional="\n".join(optional), threads=max(cpus - cfg.data.num_workers, 1),
        command=train_command(recipe, alloc, overrides))


def submit(script: str, sbatch: str = "sbatch", extra_args: Sequence[str] = ()) -> str:
    """``sbatch --parsable`` with the script on stdin; returns the job id."""
    proc = subprocess.run([sbatch, "--parsable", *extra_args], input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]
