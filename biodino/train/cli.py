"""The ``biodino`` command line: one subcommand per user moment (models, and later pack/train/export/embed/slurm)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

import torch

from biodino.models import PRESETS, build_backbone

USAGE_ERROR = 2


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biodino", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models = sub.add_parser("models", help="list backbone presets with parameter counts and embedding sizes")
    models.add_argument("--size", type=int, default=None,
                        help="count parameters at this input size (presets whose patch does not divide it are skipped)")
    models.set_defaults(func=_cmd_models)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
