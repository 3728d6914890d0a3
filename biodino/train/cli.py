"""The ``biodino`` command line: one subcommand per user moment (models, and later pack/train/export/embed/slurm)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from biodino.models import PRESETS, build_backbone

USAGE_ERROR = 2


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2, nothing written."""


def _cmd_models(args: argparse.Namespace) -> int:
    """Print every preset with its parameter count and embedding size (built on the meta device)."""
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
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key.replace('_', ' '):<{width}}  {value}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biodino", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models = sub.add_parser("models", help="list backbone presets with parameter counts and embedding sizes")
    models.add_argument("--size", type=int, default=None,
                        help="count parameters at this input size (presets whose patch does not divide it are skipped)")
    models.set_defaults(func=_cmd_models)
    _add_pack(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as err:
        print(f"biodino {args.command}: error: {err}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
