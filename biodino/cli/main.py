"""The ``biodino`` command line: one subcommand per user moment (models, pack, train, export, embed, eval, curate, slurm,
demo)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from biodino.cli.curate import add_curate
from biodino.cli.embed import add_embed
from biodino.cli.evaluate import add_eval
from biodino.cli.slurm import add_slurm
from biodino.cli.usage import UsageError

USAGE_ERROR = 2


def _cmd_models(args: argparse.Namespace) -> int:
    """Print every preset with its parameter count and embedding size (built on the meta device)."""
    import torch

    from biodino.models import PRESETS, build_backbone

    rows = [("preset", "patch", "dim", "depth", "heads", "registers", "size", "params", "embedding")]
    for name, cfg in PRESETS.items():
        size = args.size or cfg.image_size
        if size % cfg.patch_size:
            continue
        with torch.device("meta"):
            params = build_backbone(name, image_size=size).num_params()
        rows.append((name, cfg.patch_size, cfg.dim, cfg.depth, cfg.num_heads, cfg.num_registers, size,
                     f"{params:,}", f"(1, {cfg.dim})"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    from biodino.data.pack import OutputNotEmptyError, PackOptions, pack
    from biodino.data.sources import InputError

    opts = PackOptions(out=Path(args.out), prefix=args.prefix, max_count=args.max_count, max_size=args.max_size,
                       min_side=args.min_side, near_threshold=None if args.no_near_dedup else args.near_threshold,
                       max_side=args.max_side, format=args.format, quality=args.quality, jobs=args.jobs,
                       seed=args.seed, overwrite=args.overwrite)
    try:
        report = pack(args.inputs, opts)
    except (InputError, OutputNotEmptyError) as err:
        raise UsageError(str(err)) from None
    unreadable = report.pop("unreadable_paths")
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key.replace('_', ' '):<{width}}  {value}")
    for path in unreadable:
        print(f"unreadable: {path}")
    print(f"index: {opts.out / (opts.prefix + '.json')}")
    return 0


def _add_pack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="curate images into WebDataset tar shards with an index")
    p.add_argument("inputs", nargs="+", help="image folders (recursive) or list files (path[TAB repeats] per line)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--prefix", default="shard", help="shards are PREFIX-%%06d.tar, the index PREFIX.json")
    p.add_argument("--max-count", type=int, default=10_000, help="samples per shard at most")
    p.add_argument("--max-size", type=float, default=1e9, help="bytes per shard at most")
    p.add_argument("--min-side", type=int, default=64, help="drop images whose shorter side is smaller")
    p.add_argument("--near-threshold", type=int, default=5, help="dHash Hamming distance for near duplicates")
    p.add_argument("--no-near-dedup", action="store_true", help="keep near duplicates")
    p.add_argument("--max-side", type=int, default=None, help="re-encode images larger than this")
    p.add_argument("--format", choices=["keep", "jpg", "webp", "png"], default="keep", help="stored image format")
    p.add_argument("--quality", type=int, default=90, help="quality when re-encoding")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    p.add_argument("--overwrite", action="store_true", help="replace this prefix's shards in --out")
    p.set_defaults(func=_cmd_pack)


def _cmd_train(args: argparse.Namespace) -> int:
    from biodino.config.recipe import ConfigError, load_config
    from biodino.run.stages import is_schedule, load_schedule

    try:
        if is_schedule(args.recipe):
            stages = load_schedule(args.recipe, args.overrides)
            from biodino.run.trainer import check_runnable  # Lightning and the model: only past the YAML checks

            for i, stage in enumerate(stages):  # later stages start from weights their predecessor writes
                check_runnable(stage.cfg, check_init=i == 0)
        else:
            if args.stage:
                raise ConfigError(f"--stage needs a schedule file; {args.recipe} is a recipe")
            stages, cfg = None, load_config(args.recipe, args.overrides)
            from biodino.run.trainer import check_runnable

            check_runnable(cfg)
    except ValueError as err:  # ConfigError, ShardIndexError: named keys and paths
        raise UsageError(str(err)) from None
    with _run_errors_as_usage():
        if stages is not None:
            from biodino.run.stages import run_schedule

            done, stopped_by = run_schedule(stages, args.stage)
            for path in done:
                print(f"stage weights: {path}")
        else:
            from biodino.run.trainer import train

            result = train(cfg)
            stopped_by = result.stopped_by
            print(f"run directory: {result.run.root}")
    return _stopped_exit_code(stopped_by)


@contextmanager
def _run_errors_as_usage() -> Iterator[None]:
    """What a run refuses before training (a locked run directory, checkpoints that do not load, a changed
    architecture) is a usage error, reported in one line; a signal before training started exits 128 + signal."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from biodino.config.schema import ConfigError
    from biodino.run.run_lock import RunLockedError
    from biodino.checkpoint.safe_load import CheckpointError

    try:
        yield
    except (RunLockedError, CheckpointError, ConfigError) as err:
        raise UsageError(str(err)) from None
    except SIGTERMException:
        raise SystemExit(128 + signal.SIGTERM) from None


def _stopped_exit_code(stopped_by: Optional[int]) -> int:
    """0 when training ran to its end or was requeued by Slurm (SIGUSR1); 128 + the signal when it stopped early."""
    if stopped_by is None or stopped_by == signal.SIGUSR1:
        return 0
    print(f"stopped by {signal.Signals(stopped_by).name} after saving a checkpoint; run the same command to resume",
          file=sys.stderr)
    return 128 + stopped_by


def _cmd_export(args: argparse.Namespace) -> int:
    from biodino.interop.export import export_backbone, export_full, load_training_state
    from biodino.checkpoint.safe_load import CheckpointError

    if args.full and args.format == "timm":
        raise UsageError("--format timm writes a backbone only (timm has no layout for training weights); drop --full")
    try:
        state = load_training_state(Path(args.source), args.preset)
        out = Path(args.out)
        if args.full:
            stem = f"{state.cfg.model.preset}_{args.tag or state.cfg.name}_{state.step}"
            name = f"dino_v2_{stem}.pt" if args.format == "birder" else f"{stem}_full.safetensors"
            path = export_full(state, out / name, args.format)
        else:
            path = export_backbone(state, out, "student" if args.student else "teacher", args.resolution, args.tag,
                                   args.format)
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    print(path)
    return 0


def _add_train_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train from a recipe; run again on the same run directory to resume")
    p.add_argument("recipe", help="a recipe YAML file or a name under configs/ (e.g. demo)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. schedule.batch_size=32")
    p.add_argument("--stage", default=None, help="with a schedule: run only this stage (its predecessor must be done)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="export the teacher (or student) backbone, or the full training weights")
    p.add_argument("source", help="a run directory, a checkpoint (.ckpt file or sharded directory), a full-weights "
                   ".safetensors, or a birder .pt (full DINOv2 training weights or a backbone release)")
    p.add_argument("--student", action="store_true", help="export the student backbone instead of the teacher")
    p.add_argument("--resolution", type=int, default=None, help="resize the position embedding to this size")
    p.add_argument("--full", action="store_true", help="export full training weights (student, teacher, heads, centers)")
    p.add_argument("--tag", default=None, help="name part of the file (default: the run name)")
    p.add_argument("--out", default=".", help="output folder")
    p.add_argument("--format", choices=["biodino", "birder", "timm"], default="biodino",
                   help="biodino: safetensors (+ JSON sidecar); birder: torch.save .pt in birder's layout; timm: a "
                   "folder (model.safetensors + config.json) in timm's hub layout, backbone only")
    p.add_argument("--preset", default=None,
                   help="a birder source's backbone preset (default: the one preset matching its tensor shapes)")
    p.set_defaults(func=_cmd_export)


def _cmd_demo(args: argparse.Namespace) -> int:
    from biodino.cli.demo import describe, run_demo

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        print(f"generating {args.per_class} images per class: {describe()} (procedural, see biodino/data/synthetic.py)")
    try:
        result = run_demo(out, args.seed, Path(args.data) if args.data else None, args.per_class, tuple(args.overrides))
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    gain = 100 * (result["knn_trained"] - result["knn_random"])
    print(f"k-NN (cosine, k=20) on {result['queries']} held-out images, {result['bank']}-image memory bank:")
    print(f"  trained teacher backbone: {100 * result['knn_trained']:5.1f}%")
    print(f"  same backbone, random init: {100 * result['knn_random']:5.1f}%   (gain {gain:+.1f} points)")
    curve = ", ".join(f"{step}: {100 * v:.1f}%" for step, v in result["curve"].items())
    print(f"monitor k-NN on the held-out images by step (plots/eval.png): {curve}")
    print(f"training {result['train_s']:.0f} s, total {result['total_s']:.0f} s; run, curves in plots/: {result['run']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biodino", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models = sub.add_parser("models", help="list backbone presets with parameter counts and embedding sizes")
    models.add_argument("--size", type=int, default=None,
                        help="count parameters at this input size (presets whose patch does not divide it are skipped)")
    models.set_defaults(func=_cmd_models)
    _add_pack(sub)
    _add_train_export(sub)
    add_slurm(sub)
    add_embed(sub)
    add_curate(sub)
    add_eval(sub)
    p = sub.add_parser("demo", help="generate labelled images, train a tiny DINOv2 on CPU, report k-NN vs random init")
    p.add_argument("--data", default=None, help="your own images instead: a folder with one sub-folder per class")
    p.add_argument("--out", default="demo", help="working folder (images, shards, runs, export)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=600, help="generated images per class")
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/demo.yaml")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] in (["slurm", "embed"], ["slurm", "curate"]):  # `biodino slurm embed ...`: slurm-embed
        argv = [f"slurm-{argv[1]}", *argv[2:]]
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # key=value overrides written after options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as err:
        print(f"biodino {args.command.replace('-', ' ')}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except Exception as err:
        from biodino.fs.atomic import is_disk_full

        if not is_disk_full(err):
            raise
        print(f"biodino {args.command}: error: {_disk_full_message(err)}", file=sys.stderr)
        return 1


def _disk_full_message(err: BaseException) -> str:
    """``no space left on device: PATH``, with the path of the first error in the chain that names one."""
    while err is not None:
        path = getattr(err, "path", None) or getattr(err, "filename", None)
        if path:
            return f"no space left on device: {path}"
        err = err.__cause__ or err.__context__
    return "no space left on device"


if __name__ == "__main__":
    sys.exit(main())
