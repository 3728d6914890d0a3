"""``biodino slurm``: render (print) or submit the sbatch jobs of a recipe or a schedule, one job per stage each
after the previous one succeeded, and with ``--eval`` an evaluation job after each; ``biodino slurm embed`` and
``biodino slurm curate`` do the same for an embedding and a curation."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Optional

from biodino.cli.usage import UsageError


def add_slurm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slurm", help="render an sbatch script for a recipe (printed), or submit it with --submit; "
                       "`biodino slurm embed MODEL INPUTS --out OUT ...` does the same for an embedding")
    p.add_argument("recipe", help="a recipe or schedule YAML file, or a name under configs/")
    _add_allocation(p)
    p.add_argument("--eval", default=None, metavar="TRAIN_DATA,TEST_DATA",
                   help="after each stage (or the run), a job embedding these with its export and running "
                   "--eval-protocol; results.json/results.md land in the run directory")
    p.add_argument("--eval-protocol", default="knn,simpleshot,retrieval", help="protocols of the --eval jobs")
    p.add_argument("overrides", nargs="*", help="key=value overrides passed to biodino train")
    p.set_defaults(func=cmd_slurm)

    from biodino.cli.embed import add_embed_options

    p = sub.add_parser("slurm-embed", help="(biodino slurm embed) an embedding job on an allocation, one rank per GPU")
    p.add_argument("model", help="as biodino embed takes it")
    p.add_argument("inputs", nargs="+", help="as biodino embed takes them")
    p.add_argument("--out", required=True, help="output .npz or .parquet")
    _add_allocation(p)
    add_embed_options(p)
    p.set_defaults(func=cmd_slurm_embed)

    from biodino.cli.curate import add_curate_options

    p = sub.add_parser("slurm-curate", help="(biodino slurm curate) the pool's embedding on the whole allocation, "
                       "then the curation steps on one node after it succeeded")
    add_curate_options(p)
    _add_allocation(p)
    p.set_defaults(func=cmd_slurm_curate)


def _add_allocation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="one task per GPU; 0: one CPU task per node")
    p.add_argument("--cpus-per-task", type=int, default=None, help="default: data.num_workers + 2")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None, help="time limit, e.g. 48:00:00")
    p.add_argument("--account", default=None)
    p.add_argument("--sbatch-option", action="append", default=[], metavar="OPT",
                   help="a further #SBATCH option, e.g. --qos=high (repeatable)")
    p.add_argument("--submit", action="store_true", help="submit with sbatch and print the job ids")


Job = tuple[str, str, Optional[int]]  # name, script, index of the job it runs after


def _jobs(args: argparse.Namespace) -> list[Job]:
    from biodino.cli.evaluate import protocols_of
    from biodino.run.slurm import EvalSpec, recipe_args, render, render_eval, world_overrides
    from biodino.run.stages import is_schedule, load_schedule
    from biodino.config.recipe import load_config

    alloc = _allocation(args)
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


def _allocation(args: argparse.Namespace):
    from biodino.run.slurm import Allocation

    return Allocation(args.nodes, args.gpus_per_node, args.cpus_per_task, args.partition, args.time, args.account,
                      tuple(args.sbatch_option))


def cmd_slurm(args: argparse.Namespace) -> int:
    from biodino.config.recipe import ConfigError

    try:
        jobs = _jobs(args)
    except (ConfigError, ValueError) as err:
        raise UsageError(str(err)) from None
    return _print_or_submit(jobs, args.submit)


def cmd_slurm_embed(args: argparse.Namespace) -> int:
    """Checked here as far as a login node can (options, output, that the model and inputs exist), then run
    on the allocation as ``biodino embed`` with the same arguments."""
    import sys

    from biodino.cli.embed import validate
    from biodino.run.slurm import render_job, spec_exists

    validate(args, Path(args.out))
    try:
        alloc = _allocation(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    for spec in (args.model, *args.inputs):
        if not spec_exists(spec):
            raise UsageError(f"not found: {spec}")
    command = [sys.executable, "-m", "biodino", "embed", *_embed_args(args)]
    cpus = args.cpus_per_task or args.workers + 2
    name = f"biodino-embed-{Path(args.out).stem}"
    script = render_job(name, command, alloc, cpus, threads=max(cpus - args.workers, 1))
    return _print_or_submit([(name, script, None)], args.submit)


def cmd_slurm_curate(args: argparse.Namespace) -> int:
    """Two jobs: ``biodino curate --embed-only`` on every GPU of the allocation (the distributed, resumable
    embedding), then, after it succeeded, ``biodino curate`` on one node (its GPUs share the neighbour search;
    k-means and sampling run on the first), which finds the pool embedded and goes on from there."""
    import sys

    from biodino.cli.curate import argv_of, request
    from biodino.run.slurm import render_job, spec_exists

    req = request(args)
    try:
        alloc = _allocation(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    for spec in (str(req.model), *req.inputs, *map(str, (*req.exclude, *req.include))):
        if not spec_exists(spec):
            raise UsageError(f"not found: {spec}")
    command = [sys.executable, "-m", "biodino", "curate", *argv_of(req, args.pack)]
    cpus = args.cpus_per_task or args.workers + 2
    name = f"biodino-curate-{Path(args.out).name}"
    embed = render_job(f"{name}-embed", [*command, "--embed-only"], alloc, cpus, threads=max(cpus - args.workers, 1))
    steps = render_job(name, command, replace(alloc, nodes=1), cpus, threads=max(cpus - args.workers, 1))
    return _print_or_submit([(f"{name}-embed", embed, None), (name, steps, 0)], args.submit)


def _embed_args(args: argparse.Namespace) -> list[str]:
    """``biodino embed``'s arguments, paths made absolute (the job may start elsewhere)."""
    absolute = lambda s: s if set("*?[") & set(s) else str(Path(s).resolve())  # noqa: E731
    out = [absolute(args.model), *map(absolute, args.inputs), "--out", absolute(args.out), f"--{args.network}",
           "--features", args.features, "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--part-size", str(args.part_size), "--device", args.device]
    out += ["--resolution", str(args.resolution)] if args.resolution else []
    return out + (["--label-key", args.label_key] if args.label_key else [])


def _print_or_submit(jobs: list[Job], submit: bool) -> int:
    from biodino.run.slurm import submit_graph
    if not submit:
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
