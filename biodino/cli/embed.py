"""``biodino embed``: embeddings of image folders, list files or WebDataset shards with any biodino model, on one
rank or many (``torchrun``/``srun``), resumable; see ``biodino.run.embed_job``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from biodino.cli.usage import UsageError

MAX_NAMED_SKIPS = 20  # skipped samples named on stderr; all of them are in OUT.skipped.tsv


def add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed images (folders, list files, shards) with an export, full weights, a "
                       "checkpoint or a run directory; labels from class sub-folders, list files or --label-key")
    p.add_argument("model", help="a backbone export, full-weights .safetensors, a checkpoint, a run directory or a "
                   "birder .pt")
    p.add_argument("inputs", nargs="+", help="image folders (a class per sub-folder gives labels), image files, list "
                   "files (lines: path or path<TAB>label), shard indexes (.json) or shard globs")
    p.add_argument("--out", required=True, help="output .npz (embeddings, keys, labels) or .parquet")
    add_embed_options(p)
    p.set_defaults(func=cmd_embed)


def add_embed_options(p: argparse.ArgumentParser) -> None:
    """The options of how to embed, shared by ``biodino embed`` and ``biodino eval --model``."""
    net = p.add_mutually_exclusive_group()
    net.add_argument("--teacher", dest="network", action="store_const", const="teacher", default="teacher",
                     help="embed with the teacher backbone (default)")
    net.add_argument("--student", dest="network", action="store_const", const="student",
                     help="embed with the student backbone (needs training weights, not an export)")
    p.add_argument("--features", choices=["cls", "cls+mean", "mean"], default="cls",
                   help="class token (default), class token and mean patch token, or mean patch token")
    p.add_argument("--resolution", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("--label-key", default=None, help="shards: the field of each sample's JSON holding its label "
                   "(dotted for nested fields; a list value makes the labels multi-label)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding and resizing")
    p.add_argument("--part-size", type=int, default=1024, help="images per resumable part (a shard is one part)")
    p.add_argument("--device", default="auto", help="auto: this rank's GPU when there is one, else cpu")


def validate(args: argparse.Namespace, out: Path) -> None:
    """The options and the output's format, before anything runs."""
    from biodino.eval.embed_output import SUFFIXES

    if out.suffix not in SUFFIXES:
        raise UsageError(f"--out must end in {' or '.join(SUFFIXES)}, got {out.name}")
    if out.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UsageError("--out .parquet needs pyarrow: pip install 'biodino[eval]'") from None
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--part-size", args.part_size, 1), ("--resolution", args.resolution or 1, 1)):
        if value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")


def embed(args: argparse.Namespace, model: str, inputs: list[str], out: Path):
    """Run ``biodino embed``'s job (validated first); the result on rank 0, None on the others. Errors are
    usage errors; a rank that learns of rank 0's failure exits 2 quietly."""
    from biodino.checkpoint.safe_load import CheckpointError
    from biodino.run.embed_job import EmbedRequest, RankFailedError, run_embed
    from biodino.run.run_lock import RunLockedError

    validate(args, out)
    req = EmbedRequest(Path(model), tuple(inputs), out, args.network, args.features, args.resolution,
                       args.label_key, args.batch_size, args.workers, args.part_size, args.device)
    try:
        result = run_embed(req)
    except (CheckpointError, RunLockedError, FileNotFoundError, ValueError) as err:  # InputError, mismatched parts
        raise UsageError(str(err).splitlines()[0]) from None
    except RankFailedError:
        raise SystemExit(2) from None
    if result is not None:
        for key, why in result.skipped[:MAX_NAMED_SKIPS]:
            print(f"skipped {key}: {why}", file=sys.stderr)
        if len(result.skipped) > MAX_NAMED_SKIPS:
            print(f"... and {len(result.skipped) - MAX_NAMED_SKIPS} more, all in {result.out}.skipped.tsv",
                  file=sys.stderr)
    return result


def cmd_embed(args: argparse.Namespace) -> int:
    from biodino.run.embed_job import summary

    result = embed(args, args.model, args.inputs, Path(args.out))
    if result is not None:
        print(summary(result))
    return 0
