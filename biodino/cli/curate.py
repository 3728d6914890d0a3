"""``biodino curate``: embed a pool with any backbone, remove near duplicates, filter by example images, sample
to a budget balanced over clusters, and optionally pack the selection; resumable (see ``biodino.curate``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from biodino.cli.usage import UsageError

KEEP = ("first", "largest")


def add_curate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curate", help="curate an image pool by embeddings: near duplicates, example-based "
                       "filtering, cluster-balanced sampling to a budget, packing")
    add_curate_options(p)
    p.add_argument("--embed-only", action="store_true", help="stop once the pool is embedded (the first Slurm job)")
    p.set_defaults(func=cmd_curate)


def add_curate_options(p: argparse.ArgumentParser) -> None:
    """Everything ``biodino curate`` takes, shared with ``biodino slurm curate``."""
    p.add_argument("inputs", nargs="+", help="the pool: image folders, image files, list files, shard indexes or globs")
    p.add_argument("--model", required=True, help="a biodino backbone export, full weights, checkpoint, run directory "
                   "or birder .pt")
    p.add_argument("--out", required=True, help="working and result folder (resumes what it holds)")
    p.add_argument("--dedup-threshold", type=float, default=0.95,
                   help="cosine similarity at which two images are near duplicates (default 0.95)")
    p.add_argument("--no-dedup", action="store_true", help="skip near-duplicate removal")
    p.add_argument("--dedup-k", type=int, default=16, help="neighbours searched per image (default 16)")
    p.add_argument("--keep", choices=KEEP, default="first",
                   help="the image kept per near-duplicate group: first in input order, or largest (file inputs)")
    p.add_argument("--exclude-examples", action="append", default=[], metavar="DIR",
                   help="examples of unwanted images, one sub-folder per category (repeatable)")
    p.add_argument("--exclude-threshold", type=float, default=0.6,
                   help="similarity to a category's nearest example that removes an image (default 0.6)")
    p.add_argument("--include-examples", action="append", default=[], metavar="DIR",
                   help="examples of wanted images: only images resembling one of them stay (repeatable)")
    p.add_argument("--include-threshold", type=float, default=0.6)
    p.add_argument("--threshold", action="append", default=[], metavar="CATEGORY=VALUE",
                   help="a category's own threshold (repeatable)")
    p.add_argument("--budget", type=int, default=None, help="images to select, balanced over clusters")
    p.add_argument("--clusters", default=None, help="cluster counts per level, finest first (e.g. 60000,1200,120); "
                   "default: about 50 images per finest cluster and 20 clusters per parent")
    p.add_argument("--resamples", type=int, default=10, help="k-means resampling rounds per level (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pack", default=None, metavar="DIR", help="pack the selection into shards there")
    p.add_argument("--resolution", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding and resizing")
    p.add_argument("--part-size", type=int, default=1024, help="images per resumable embedding part")
    p.add_argument("--device", default="auto", help="auto: this rank's GPU when there is one, else cpu")


def request(args: argparse.Namespace):
    """The validated request: options in range, example folders present, the model a backbone and the budget
    within the pool, all before anything is embedded or written."""
    from biodino.curate.pipeline import CurateRequest

    for flag, value, low in (("--dedup-k", args.dedup_k, 1), ("--resamples", args.resamples, 1),
                             ("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--part-size", args.part_size, 1), ("--budget", args.budget or 1, 1),
                             ("--resolution", args.resolution or 1, 1)):
        if value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    for flag, value in (("--dedup-threshold", args.dedup_threshold), ("--exclude-threshold", args.exclude_threshold),
                        ("--include-threshold", args.include_threshold)):
        if not -1.0 <= value <= 1.0:
            raise UsageError(f"{flag} is a cosine similarity in [-1, 1], got {value}")
    absolute = tuple(s if set("*?[") & set(s) else str(Path(s).resolve()) for s in args.inputs)  # keys: full paths
    return CurateRequest(
        absolute, Path(args.model), Path(args.out), None if args.no_dedup else args.dedup_threshold,
        args.dedup_k, args.keep, tuple(map(Path, args.exclude_examples)), tuple(map(Path, args.include_examples)),
        args.exclude_threshold, args.include_threshold, _thresholds(args.threshold), args.budget,
        _clusters(args.clusters), args.resamples, args.seed, args.resolution, args.batch_size, args.workers,
        args.part_size, args.device)


def argv_of(req, pack: Optional[str]) -> list[str]:
    """``biodino curate``'s arguments for ``req``, paths made absolute (a Slurm job may start elsewhere)."""
    absolute = lambda s: s if set("*?[") & set(s) else str(Path(s).resolve())  # noqa: E731
    out = [*map(absolute, req.inputs), "--model", absolute(str(req.model)), "--out", absolute(str(req.out))]
    out += ["--no-dedup"] if req.dedup_threshold is None else ["--dedup-threshold", str(req.dedup_threshold)]
    out += ["--dedup-k", str(req.dedup_k), "--keep", req.keep]
    out += [a for d in req.exclude for a in ("--exclude-examples", absolute(str(d)))]
    out += [a for d in req.include for a in ("--include-examples", absolute(str(d)))]
    out += ["--exclude-threshold", str(req.exclude_threshold), "--include-threshold", str(req.include_threshold)]
    out += [a for name, v in req.thresholds for a in ("--threshold", f"{name}={v}")]
    out += ["--budget", str(req.budget)] if req.budget is not None else []
    out += ["--clusters", ",".join(map(str, req.clusters))] if req.clusters else []
    out += ["--resamples", str(req.resamples), "--seed", str(req.seed), "--batch-size", str(req.batch_size),
            "--workers", str(req.workers), "--part-size", str(req.part_size), "--device", req.device]
    out += ["--resolution", str(req.resolution)] if req.resolution else []
    return out + (["--pack", absolute(pack)] if pack else [])


def _thresholds(specs: list[str]) -> tuple[tuple[str, float], ...]:
    out = []
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not name or number is None or not -1.0 <= number <= 1.0:
            raise UsageError(f"--threshold {spec!r}: expected CATEGORY=VALUE with VALUE in [-1, 1]")
        out.append((name, number))
    return tuple(out)


def _clusters(spec: Optional[str]) -> Optional[tuple[int, ...]]:
    if spec is None:
        return None
    try:
        levels = tuple(int(v) for v in spec.split(","))
    except ValueError:
        raise UsageError(f"--clusters {spec!r}: expected comma-separated counts, finest first") from None
    if any(k < 1 for k in levels) or any(a <= b for a, b in zip(levels, levels[1:])):
        raise UsageError(f"--clusters {spec!r}: counts must be positive and decrease level by level (finest first)")
    return levels


def check_inputs(req, pack: Optional[str]) -> None:
    """What needs reading: the model is a backbone, the pool has images (as many as the budget), the example
    folders hold images, and file-only options meet file inputs."""
    from biodino.curate.examples import categories
    from biodino.eval.embed_inputs import plan_parts
    from biodino.interop.export import load_encoder

    import importlib.util

    needed = [("scipy", "scipy")] + ([("pt_kmeans", "pt-kmeans")] if req.budget is not None else [])
    missing = [dist for module, dist in needed if importlib.util.find_spec(module) is None]
    if missing:
        raise UsageError(f"biodino curate needs {', '.join(missing)}: pip install 'biodino[curate]'")
    plan = plan_parts(req.inputs, req.part_size)
    if not plan.images:
        raise UsageError(f"no images in {', '.join(req.inputs)}")
    if req.budget is not None and req.budget > plan.images:
        raise UsageError(f"--budget {req.budget} is larger than the pool ({plan.images} images)")
    if (req.keep == "largest" or pack) and any(p.shard is not None for p in plan.parts):
        flag = "--pack" if pack else "--keep largest"
        raise UsageError(f"{flag} needs image files as inputs (folders or lists), not shards")
    for folder in (*req.exclude, *req.include):
        categories(folder, 0.0, {})
    names = {c.name for f in (*req.exclude, *req.include) for c in categories(f, 0.0, {})}
    unknown = sorted({name for name, _ in req.thresholds} - names)
    if unknown:
        raise UsageError(f"--threshold names no example category: {', '.join(unknown)} (have: "
                         f"{', '.join(sorted(names)) or 'none'})")
    load_encoder(req.model)


def cmd_curate(args: argparse.Namespace) -> int:
    from biodino.checkpoint.safe_load import CheckpointError
    from biodino.curate.pipeline import run_curate
    from biodino.run.embed_job import RankFailedError
    from biodino.run.run_lock import RunLockedError

    req = request(args)
    try:
        check_inputs(req, args.pack)
        outcome = run_curate(req, embed_only=args.embed_only)
    except (CheckpointError, RunLockedError, FileNotFoundError, ValueError) as err:  # InputError, bad model, lock
        raise UsageError(str(err).splitlines()[0]) from None
    except RankFailedError:
        raise SystemExit(2) from None
    if outcome is None:
        return 0
    emb = outcome.report["embedding"]
    if emb["pool_reused"]:
        print(f"embeddings of {req.out / 'pool'} reused", file=sys.stderr)
    else:
        print(f"embedded the pool ({emb['parts_reused']} parts reused from an earlier run, {emb['skipped']} images "
              f"skipped: {req.out / 'embeddings.npz.skipped.tsv'})", file=sys.stderr)
    if args.embed_only:
        print(f"{outcome.report['pool']} images embedded into {req.out / 'pool'}")
        return 0
    if args.pack:
        _pack(req, args.pack, outcome.report)
    steps = ", ".join(f"{step}: -{outcome.report[step]['removed']}" for step in ("near_duplicates", "examples")
                      if step in outcome.report)
    print(f"{outcome.report['pool']} images" + (f" ({steps})" if steps else "") +
          f" -> {len(outcome.selected)} selected: {req.out / 'selected.txt'}, report {req.out / 'report.json'}")
    return 0


def _pack(req, out: str, report: dict) -> None:
    from biodino.data.pack import PackOptions, pack

    result = pack([str(req.out / "selected.txt")], PackOptions(out=Path(out), prefix="curated", near_threshold=None,
                                                              min_side=1, seed=req.seed, overwrite=True),
                  selection=report)
    print(f"packed {result['written']} images into {out}")
