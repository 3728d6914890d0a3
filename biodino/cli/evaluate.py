"""``biodino eval``: the frozen-embedding protocols on train/test embedding files (or, with ``--model``, on what it
embeds of ``--train-data``/``--test-data`` first), as a JSON and a markdown table."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from biodino.cli.embed import add_embed_options
from biodino.cli.usage import UsageError


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="run frozen-embedding protocols (k-NN, SimpleShot, retrieval, AMI, linear probe) "
                       "on embedding files")
    p.add_argument("--train", default=None, help=".npz with arrays embeddings (n, dim) and labels (n,): the gallery")
    p.add_argument("--test", default=None, help=".npz of the same form: the queries")
    p.add_argument("--model", default=None, help="instead of --train/--test: embed --train-data and --test-data with "
                   "this model (as biodino embed takes it) first")
    p.add_argument("--train-data", nargs="+", default=None, help="with --model: the gallery's images (biodino "
                   "embed's inputs)")
    p.add_argument("--test-data", nargs="+", default=None, help="with --model: the queries' images")
    p.add_argument("--embeddings", default=None, help="with --model: keep train.npz and test.npz in this folder "
                   "(a rerun resumes from them); default: a temporary folder")
    p.add_argument("--protocol", default="knn,simpleshot,retrieval", help="comma-separated: knn, simpleshot, "
                   "retrieval, ami, linear, svm, mlp. mlp (the MLP probe, macro F1) also takes multi-label files, "
                   "labels (n, traits) of 0/1, which the others refuse; given classes it probes them one-hot")
    p.add_argument("--k", type=int, default=20, help="k-NN neighbours")
    p.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs of the stochastic protocols (mean and std)")
    p.add_argument("--svm-iterations", type=int, default=100, help="SVCs sampled by the SVM's randomized search")
    p.add_argument("--mlp-epochs", type=int, default=100, help="MLP probe training epochs")
    p.add_argument("--mlp-batch-size", type=int, default=128, help="MLP probe mini-batch size")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--markdown", default=None, help="also write the table here")
    add_embed_options(p)
    p.set_defaults(func=cmd_eval)


def protocols_of(spec: str) -> list[str]:
    """The comma-separated protocol names, each one known."""
    from biodino.eval.protocols import PROTOCOLS

    protocols = [p.strip() for p in spec.split(",") if p.strip()]
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        problem = f"unknown {unknown[0]!r}" if unknown else "none given"
        raise UsageError(f"--protocol: {problem}; available: {', '.join(PROTOCOLS)}")
    return protocols


def _embedding_files(args: argparse.Namespace, folder: Path) -> Optional[tuple[str, str]]:
    """--train/--test as given, or the files --model embeds of --train-data/--test-data (None off rank 0)."""
    given, embeds = (args.train, args.test), (args.model, args.train_data, args.test_data)
    if any(embeds) and any(given):
        raise UsageError("give --train and --test (embedding files) or --model with --train-data and --test-data")
    if not any(embeds):
        if not all(given):
            raise UsageError("--train and --test are required (or --model, --train-data and --test-data)")
        return args.train, args.test
    if not all(embeds):
        raise UsageError("--model needs --train-data and --test-data")
    if args.embeddings is None and int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) > 1:
        raise UsageError("--model on several ranks needs --embeddings DIR, a folder every rank sees")
    from biodino.cli.embed import embed
    from biodino.run.embed_job import summary

    files = (folder / "train.npz", folder / "test.npz")
    for inputs, out in zip((args.train_data, args.test_data), files):
        result = embed(args, args.model, inputs, out)
        if result is None:
            return None
        print(summary(result))
    return str(files[0]), str(files[1])


def cmd_eval(args: argparse.Namespace) -> int:
    protocols = protocols_of(args.protocol)
    for name, value, low in (("--k", args.k, 1), ("--repeats", args.repeats, 1),
                             ("--svm-iterations", args.svm_iterations, 1), ("--mlp-epochs", args.mlp_epochs, 1),
                             ("--mlp-batch-size", args.mlp_batch_size, 1)):
        if value < low:
            raise UsageError(f"{name} must be at least {low}, got {value}")
    if args.temperature <= 0:
        raise UsageError(f"--temperature must be positive, got {args.temperature}")
    with tempfile.TemporaryDirectory(prefix="biodino-eval-") as tmp:
        files = _embedding_files(args, Path(args.embeddings) if args.embeddings else Path(tmp))
        if files is None:  # not rank 0 of a multi-rank embedding: rank 0 evaluates
            return 0
        results = _evaluate(args, protocols, *files)
    from biodino.eval.protocols import markdown
    from biodino.fs.atomic import atomic_write_text

    table = markdown(results)
    print(table)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(results, indent=2) + "\n")
    if args.markdown:
        atomic_write_text(Path(args.markdown), table + "\n")
    return 0


def _evaluate(args: argparse.Namespace, protocols: list[str], train_file: str, test_file: str) -> dict:
    import torch

    from biodino.eval.protocols import LabelKindError, Options, evaluate, read_split

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    classes: dict[str, int] = {}
    for flag, path in (("--train", train_file), ("--test", test_file)):
        if not Path(path).is_file():
            raise UsageError(f"{flag}: file not found: {path}")
    try:
        train, test = (read_split(path, device, classes) for path in (train_file, test_file))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UsageError(str(err).splitlines()[0] if str(err) else f"unreadable embeddings ({type(err).__name__})") \
            from None
    if train.embeddings.shape[1] != test.embeddings.shape[1]:
        raise UsageError(f"--test embeddings have dim {test.embeddings.shape[1]}, --train {train.embeddings.shape[1]}")
    traits = [s.labels.shape[1] if s.labels.ndim == 2 else None for s in (train, test)]
    if traits[0] != traits[1]:
        said = [f"{t} traits" if t else "single labels" for t in traits]
        raise UsageError(f"--test has {said[1]}, --train {said[0]}")
    try:
        return evaluate(train, test, protocols, Options(k=args.k, temperature=args.temperature, seed=args.seed,
                                                          svm_iterations=args.svm_iterations,
                                                          mlp_epochs=args.mlp_epochs,
                                                          mlp_batch_size=args.mlp_batch_size),
                           args.repeats)
    except (ImportError, LabelKindError) as err:  # an optional dependency of a protocol, labels it cannot use
        raise UsageError(str(err)) from None
