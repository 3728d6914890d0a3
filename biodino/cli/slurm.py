"""``biodino slurm``: render (print) or submit the sbatch jobs of a recipe or a schedule, one job per stage each
after the previous one succeeded, and with ``--eval`` an evaluation job after each."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from biodino.cli.usage import UsageError


def add_slurm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slurm", help="render an sbatch script for a recipe (printed), or submit it with --submit")
    p.add_argument("recipe", help="a recipe or schedule YAML file, or a name under configs/")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="one task per GPU; 0: one CPU task per node")
    p.add_argument("--cpus-per-task", type=int, default=None, help="default: data.num_workers + 2")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None, help="time limit, e.g. 48:00:00")
    p.add_argument("--account", default=None)
    p.add_argument("--sbatch-option", action="append", default=[], metavar="OPT",
                   help="a further #SBATCH option, e.g. --qos=high (repeatable)")
    p.add_argument("--eval", default=None, metavar="TRAIN_DATA,TEST_DATA",
                   help="after each stage (or the run), a job embedding these with its export and running "
                   "--eval-protocol; results.json/results.md land in the run directory")
    p.add_argument("--eval-protocol", default="knn,simpleshot,retrieval", help="protocols of the --eval jobs")
    p.add_argument("--submit", action="store_true", help="submit with sbatch and print the job ids")
    p.add_argument("overrides", nargs="*", help="key=value overrides passed to biodino train")
    p.set_defaults(func=cmd_slurm)


Job = tuple[str, str, Optional[int]]  # name, script, index of the job it runs after


def _jobs(args: argparse.Namespace) -> list[Job]:
    from biodino.cli.evaluate import protocols_of
    from biodino.run.slurm import Allocation, EvalSpec, recipe_args, render, render_eval, world_overrides
    from biodino.run.stages import is_schedule, load_schedule
    from biodino.config.recipe import load_config

    alloc = Allocation(args.nodes, args.gpus_per_node, args.cpus_per_task, args.partition, args.time,
                       args.account, tuple(args.sbatch_option))
    world = world_overrides(alloc)
    spec = EvalSpec.parse(args.eval, ",".join(protocols_of(args.eval_protocol))) if args.eval else None
    if is_schedule(args.recipe):  # one job per stage, each after the previous one succeeded
        load_schedule(args.recipe, [*args.overrides, *world])  # validates every stage as it will run
        runs = [(st.cfg, list(st.train_args), st.exported) for st in load_schedule(args.recipe, args.overrides)]
    else:
        cfg = load_config(args.recipe, [*args.overrides, *world])
        runs = [(cfg, recipe_args(args.recipe, args.overrides), Path(cfg.runs_dir).resolve() / cfg.name)]
    jobs: list[Job] = []
    for cfg, train_args, model in runs:
        train_index = len(jobs)
        jobs.append((cfg.name, render(cfg, train_args, alloc), train_index - (2 if spec else 1) if jobs else None))
        if spec:
            jobs.append((f"{cfg.name}:eval", render_eval(cfg, model, spec, alloc), train_index))
    return jobs


def cmd_slurm(args: argparse.Namespace) -> int:
    from biodino.config.recipe import ConfigError
    from biodino.run.slurm import submit_graph

    try:
        jobs = _jobs(args)
    except (ConfigError, ValueError) as err:
        raise UsageError(str(err)) from None
    if not args.submit:
        for i, (name, script, after) in enumerate(jobs):
            if len(jobs) > 1:
                waits = f", submitted with --dependency=afterok:<job of {jobs[after][0]}>" if after is not None else ""
                print(f"### job {i + 1} of {len(jobs)}: {name}{waits}")
            print(script, end="")
        return 0
    try:
        ids = submit_graph([(script, after) for _, script, after in jobs])
    except (OSError, RuntimeError) as err:
        raise UsageError(str(err)) from None
    for (name, _, _), job in zip(jobs, ids):
        print(f"{job} {name}" if len(jobs) > 1 else job)
    return 0
