"""``biodino eval``: the frozen-embedding protocols on train/test embedding files, as a JSON and a markdown table."""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

from biodino.cli.usage import UsageError


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="run frozen-embedding protocols (k-NN, SimpleShot, retrieval, AMI, linear probe) "
                       "on embedding files")
    p.add_argument("--train", required=True, help=".npz with arrays embeddings (n, dim) and labels (n,): the gallery")
    p.add_argument("--test", required=True, help=".npz of the same form: the queries")
    p.add_argument("--protocol", default="knn,simpleshot,retrieval", help="comma-separated: knn, simpleshot, "
                   "retrieval, ami, linear, svm")
    p.add_argument("--k", type=int, default=20, help="k-NN neighbours")
    p.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs of the stochastic protocols (mean and std)")
    p.add_argument("--svm-iterations", type=int, default=100, help="SVCs sampled by the SVM's randomized search")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from biodino.eval.protocols import PROTOCOLS, Options, evaluate, markdown, read_split

    protocols = [p.strip() for p in args.protocol.split(",") if p.strip()]
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        problem = f"unknown {unknown[0]!r}" if unknown else "none given"
        raise UsageError(f"--protocol: {problem}; available: {', '.join(PROTOCOLS)}")
    for name, value, low in (("--k", args.k, 1), ("--repeats", args.repeats, 1),
                             ("--svm-iterations", args.svm_iterations, 1)):
        if value < low:
            raise UsageError(f"{name} must be at least {low}, got {value}")
    if args.temperature <= 0:
        raise UsageError(f"--temperature must be positive, got {args.temperature}")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    classes: dict[str, int] = {}
    for flag, path in (("--train", args.train), ("--test", args.test)):
        if not Path(path).is_file():
            raise UsageError(f"{flag}: file not found: {path}")
    try:
        train, test = (read_split(path, device, classes) for path in (args.train, args.test))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UsageError(str(err).splitlines()[0] if str(err) else f"unreadable embeddings ({type(err).__name__})") \
            from None
    if train.embeddings.shape[1] != test.embeddings.shape[1]:
        raise UsageError(f"--test embeddings have dim {test.embeddings.shape[1]}, --train {train.embeddings.shape[1]}")
    try:
        results = evaluate(train, test, protocols, Options(k=args.k, temperature=args.temperature, seed=args.seed,
                                                          svm_iterations=args.svm_iterations),
                           args.repeats)
    except ImportError as err:  # an optional dependency of a protocol
        raise UsageError(str(err)) from None
    print(markdown(results))
    if args.json:
        from biodino.fs.atomic import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(results, indent=2) + "\n")
    return 0
