"""``biodino slurm``: sbatch scripts rendered from ``slurm/*.sbatch.template`` for a recipe or a schedule's stages
(and, with ``--eval``, an evaluation job after each), and their submission as a dependency graph."""

from __future__ import annotations

import glob
import shlex
import subprocess
import sys
from dataclasses import dataclass, field, replace
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


def _resources(alloc: Allocation, cpus: int, gpus: int) -> tuple[str, str]:
    """The GPU and CPU directives, and the optional ones (partition, time, account, extras)."""
    resources = (f"#SBATCH --gpus-per-node={gpus}\n" if gpus else "") + f"#SBATCH --cpus-per-task={cpus}\n"
    optional = [f"#SBATCH --{key}={value}" for key, value in
                (("partition", alloc.partition), ("time", alloc.time), ("account", alloc.account)) if value]
    return resources, "\n".join(optional + [f"#SBATCH {option}" for option in alloc.extra])


def render(cfg: TrainConfig, train_args: Sequence[str], alloc: Allocation, workdir: Optional[Path] = None,
           python: str = sys.executable) -> str:
    """The sbatch script running ``python -m biodino train TRAIN_ARGS`` on the allocation. ``cfg`` (already
    validated by the caller) names the job and sizes the CPUs per task."""
    cpus = alloc.cpus_per_task or cfg.data.num_workers + 2
    resources, optional = _resources(alloc, cpus, alloc.gpus_per_node)
    command = [python, "-m", "biodino", "train", *train_args, *world_overrides(alloc)]
    return Template(slurm_template().read_text()).substitute(
        job_name=f"biodino-{cfg.name}", nodes=alloc.nodes, tasks_per_node=alloc.tasks_per_node,
        resources=resources, output="%x-%j.out", workdir=str((workdir or Path.cwd()).resolve()),
        optional=optional, threads=max(cpus - cfg.data.num_workers, 1),
        command=" ".join(shlex.quote(a) for a in command))


@dataclass(frozen=True)
class EvalSpec:
    """``--eval TRAIN_DATA,TEST_DATA``: what ``biodino eval --train-data/--test-data`` embeds, and the protocols."""

    train_data: str
    test_data: str
    protocols: str = "knn,simpleshot,retrieval"

    @classmethod
    def parse(cls, spec: str, protocols: str) -> "EvalSpec":
        parts = [p.strip() for p in spec.split(",")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"--eval must be TRAIN_DATA,TEST_DATA (two image folders, lists or shard specs), got "
                             f"{spec!r}")
        for part in parts:
            if not spec_exists(part):
                raise ValueError(f"--eval: {part} not found")
        return cls(*(part if set("*?[") & set(part) else str(Path(part).resolve()) for part in parts), protocols)


def spec_exists(spec: str) -> bool:
    """A path that exists, or a glob that matches: checked before a job is submitted."""
    return bool(glob.glob(spec)) if set("*?[") & set(spec) else Path(spec).exists()


def render_job(name: str, command: Sequence[str], alloc: Allocation, cpus: int, threads: int = 1,
               workdir: Optional[Path] = None) -> str:
    """The sbatch script of a job that is not training (``slurm/job.sbatch.template``): ``command`` on every task
    of the allocation, one task per GPU."""
    resources, optional = _resources(alloc, cpus, alloc.gpus_per_node)
    return Template(slurm_template("job.sbatch.template").read_text()).substitute(
        job_name=name, nodes=alloc.nodes, tasks_per_node=alloc.tasks_per_node, resources=resources,
        output="%x-%j.out", workdir=str((workdir or Path.cwd()).resolve()), optional=optional, threads=threads,
        command=" ".join(shlex.quote(a) for a in command))


def render_eval(cfg: TrainConfig, model: Path, spec: EvalSpec, alloc: Allocation, workdir: Optional[Path] = None,
                python: str = sys.executable) -> str:
    """The evaluation job of ``model`` (a stage's export or a run directory) on one task (one GPU when training
    had GPUs); results.json, results.md and the embeddings (eval/) go to the run directory."""
    run = Path(cfg.runs_dir).resolve() / cfg.name
    cpus = alloc.cpus_per_task or cfg.data.num_workers + 2
    command = [python, "-m", "biodino", "eval", "--model", str(model), "--train-data", spec.train_data,
               "--test-data", spec.test_data, "--protocol", spec.protocols, "--workers", str(max(cpus - 1, 0)),
               "--json", str(run / "results.json"), "--markdown", str(run / "results.md"),
               "--embeddings", str(run / "eval")]
    one = replace(alloc, nodes=1, gpus_per_node=min(alloc.gpus_per_node, 1))
    return render_job(f"biodino-{cfg.name}-eval", command, one, cpus, workdir=workdir)


def submit(script: str, after: Optional[str] = None, sbatch: str = "sbatch") -> str:
    """``sbatch --parsable`` with the script on stdin, after job ``after`` succeeded if given; returns the job id."""
    cmd = [sbatch, "--parsable"] + ([f"--dependency=afterok:{after}"] if after else [])
    proc = subprocess.run(cmd, input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def submit_graph(jobs: Sequence[tuple[str, Optional[int]]], sbatch: str = "sbatch") -> list[str]:
    """Submit (script, index of the job it waits for, or None) in order; each waits for that job's success."""
    ids: list[str] = []
    for script, after in jobs:
        ids.append(submit(script, ids[after] if after is not None else None, sbatch))
    return ids
