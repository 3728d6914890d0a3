"""The steps of ``biodino curate`` and where each keeps its result in the output folder:

- ``pool/``: the embeddings (``biodino embed``'s distributed, resumable job, its parts written into the pool one
  at a time by ``pool.write_pool``) and ``source.json``, what made them; reused while the model file, inputs and
  resolution are the same;
- ``pool/near_duplicates.parts/``: the neighbour search's finished blocks;
- ``steps/<step>.npz``: each later step's kept rows and report, with the signature of its settings and of every
  step before it, so a rerun with other thresholds redoes only what they change, and never the embeddings;
- ``selected.txt`` (one key per line, input order), ``report.json`` (counts per step) and ``plots/``.

Every file is written atomically; the folder is locked while a run holds it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from biodino.curate import balanced_sampling, examples, kmeans, near_duplicates, plots
from biodino.curate.pool import Pool, open_pool, write_pool
from biodino.distributed.process_group import World, joined_world
from biodino.eval.embed import embed_images, eval_transform
from biodino.fs.atomic import atomic_write, atomic_write_text
from biodino.interop.export import load_encoder
from biodino.run.embed_job import EmbedRequest, device_for, run_embed
from biodino.run.run_lock import run_lock

@dataclass(frozen=True)
class CurateRequest:
    inputs: tuple[str, ...]
    model: Path
    out: Path
    dedup_threshold: Optional[float] = 0.95  # None: no near-duplicate removal
    dedup_k: int = 16
    keep: str = "first"  # or "largest" (most pixels; file inputs)
    exclude: tuple[Path, ...] = ()
    include: tuple[Path, ...] = ()
    exclude_threshold: float = 0.6
    include_threshold: float = 0.6
    thresholds: tuple[tuple[str, float], ...] = ()  # per-category overrides
    budget: Optional[int] = None
    clusters: Optional[tuple[int, ...]] = None  # finest first; None: balanced_sampling.default_levels
    resamples: int = 10
    seed: int = 0
    resolution: Optional[int] = None
    batch_size: int = 64
    workers: int = 2
    part_size: int = 1024
    device: str = "auto"


@dataclass
class Outcome:
    selected: np.ndarray  # row indices, input order
    report: dict[str, Any] = field(default_factory=dict)


def run_curate(req: CurateRequest, embed_only: bool = False) -> Optional[Outcome]:
    """Every step (or only the embedding), resuming from what ``req.out`` holds; the outcome on rank 0, None on
    the other ranks."""
    source = _source(req)
    pool_dir = req.out / "pool"
    with joined_world() as world:
        embedding = _embed(req, source, pool_dir, world)
        world.barrier()  # rank 0 has built the pool
        pool = open_pool(pool_dir)  # keys.json read once: tens of millions of keys at scale
        report = {"pool": len(pool), "embedding": embedding}
        if embed_only:
            return Outcome(np.empty(0, np.int64), report) if world.rank == 0 else None
        with run_lock(req.out / ".lock") if world.rank == 0 else nullcontext():
            return _steps(req, pool, source, world, report)


def _embed(req: CurateRequest, source: dict, pool_dir: Path, world: World) -> dict[str, Any]:
    """The pool, embedded by ``biodino embed``'s job on every rank unless ``source.json`` says it is there; rank 0
    then writes it from the parts, one part at a time, and ``source.json`` last (the mark that it is complete),
    before the parts are removed."""
    if _read_json(pool_dir / "source.json") == source:
        return {"pool_reused": True}

    def sink(blocks: Iterator[np.ndarray], keys: list[str], width: int) -> None:
        shutil.rmtree(pool_dir, ignore_errors=True)
        write_pool(blocks, keys, width, pool_dir)
        atomic_write_text(pool_dir / "source.json", json.dumps(source, indent=1) + "\n")

    result = run_embed(EmbedRequest(req.model, req.inputs, req.out / "embeddings.npz", resolution=req.resolution,
                                    batch_size=req.batch_size, workers=req.workers, part_size=req.part_size,
                                    device=req.device), sink)
    if result is None:
        return {}
    return {"pool_reused": False, "parts_reused": result.reused, "skipped": len(result.skipped)}


def _steps(req: CurateRequest, pool: Pool, source: dict, world: World, report: dict[str, Any]
           ) -> Optional[Outcome]:
    """The steps after the embedding: the neighbour search and the finest k-means level on every rank, the rest
    on rank 0."""
    device = device_for(req.device, world)
    kept = np.ones(len(pool), bool)
    signature: list[Any] = [source]
    if req.dedup_threshold is not None:
        signature.append(["near_duplicates", req.dedup_threshold, req.dedup_k, req.keep])
        found = _load(req.out, "near_duplicates", signature) if world.rank == 0 else None
        if not _agreed(found is not None, world):
            sims, idx = near_duplicates.search(pool, req.dedup_k, device, req.out / "pool" / "near_duplicates.parts",
                                               world)
            found = _store(req.out, "near_duplicates", signature, _dedup(req, pool, sims, idx)) \
                if world.rank == 0 else None
        if world.rank == 0:
            kept, report["near_duplicates"] = found
    if req.exclude or req.include:
        signature.append(["examples", [str(p) for p in req.exclude], [str(p) for p in req.include],
                          req.exclude_threshold, req.include_threshold, sorted(req.thresholds)])
        if world.rank == 0:
            kept, report["examples"] = _load(req.out, "examples", signature) or _store(
                req.out, "examples", signature, _filter(req, pool, kept, device))
    if req.budget is not None:
        signature.append(["sampling", req.budget, req.clusters, req.resamples, req.seed])
        found = _load(req.out, "sampling", signature) if world.rank == 0 else None
        if not _agreed(found is not None, world):
            rows = np.flatnonzero(_from_rank0(kept, world))
            sampled = _sample(req, pool, rows, world, device)
            found = _store(req.out, "sampling", signature, sampled) if world.rank == 0 else None
        if world.rank == 0:
            kept, report["sampling"] = found
    if world.rank != 0:
        return None
    selected = np.flatnonzero(kept)
    report["selected"] = int(len(selected))
    atomic_write_text(req.out / "selected.txt", "".join(f"{pool.keys[i]}\n" for i in selected))
    atomic_write_text(req.out / "report.json", json.dumps(report, indent=1) + "\n")
    return Outcome(selected, report)


def _load(out: Path, step: str, signature: list) -> Optional[tuple[np.ndarray, dict]]:
    """The step's (kept mask, report) from ``steps/<step>.npz`` if made with this signature."""
    path = out / "steps" / f"{step}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            if str(data["signature"]) == _digest(signature):
                return data["kept"], json.loads(str(data["report"]))
    return None


def _store(out: Path, step: str, signature: list, result: tuple[np.ndarray, dict]) -> tuple[np.ndarray, dict]:
    kept, report = result
    sig = _digest(signature)
    atomic_write(out / "steps" / f"{step}.npz", lambda f: np.savez(f, kept=kept, report=json.dumps(report),
                                                                    signature=sig))
    return result


def _agreed(flag: bool, world: World) -> bool:
    """Rank 0's ``flag``, on every rank."""
    return bool(_from_rank0(np.array([flag]), world)[0])


def _from_rank0(values: np.ndarray, world: World) -> np.ndarray:
    """Rank 0's array on every rank (the others pass one of the same shape and dtype, or anything for a flag)."""
    if world.size == 1:
        return values
    import torch.distributed as dist

    box = [values if world.rank == 0 else None]
    dist.broadcast_object_list(box, 0)
    return box[0]


def _dedup(req: CurateRequest, pool: Pool, sims: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, dict]:
    rank = _pixels(pool.keys) if req.keep == "largest" else None
    groups = near_duplicates.group(sims, idx, req.dedup_threshold, rank)
    dup = groups.duplicate_groups()
    plots.similarity_histogram(req.out / "plots" / "near_duplicates.png", groups.best, req.dedup_threshold,
                               "similarity to the nearest other image")
    return groups.kept, {"threshold": req.dedup_threshold, "k": req.dedup_k, "keep": req.keep, "groups": len(dup),
                         "removed": int((~groups.kept).sum()),
                         "largest_groups": [[pool.keys[i] for i in g[:10]] for g in dup[:10]]}


def _pixels(keys: list[str]) -> Callable[[np.ndarray], np.ndarray]:
    """Pixel counts of the given rows' image files, read from their headers."""
    from PIL import Image

    def score(rows: np.ndarray) -> np.ndarray:
        out = np.zeros(len(rows))
        for j, i in enumerate(rows):
            with Image.open(keys[i]) as im:
                out[j] = im.size[0] * im.size[1]
        return out
    return score


def _filter(req: CurateRequest, pool: Pool, kept: np.ndarray, device: torch.device) -> tuple[np.ndarray, dict]:
    """Kept rows within an exclusion category's threshold are removed (counted by the first category that
    removes them); with inclusion examples, only the rows within some inclusion category's threshold stay."""
    overrides, rng = dict(req.thresholds), np.random.default_rng(req.seed)
    embed = _example_embedder(req, device)
    out, report = kept.copy(), {"exclude": {}, "include": {}}
    for kind, folders, default in (("exclude", req.exclude, req.exclude_threshold),
                                   ("include", req.include, req.include_threshold)):
        rows = np.flatnonzero(out)
        wanted = np.zeros(len(rows), bool)
        for cat in [c for folder in folders for c in examples.categories(folder, default, overrides)]:
            sims, nearest = examples.nearest_examples(pool.embeddings[rows], embed(cat), device)
            hit = (sims >= cat.threshold) & (out[rows] if kind == "exclude" else True)
            plots.similarity_histogram(req.out / "plots" / f"{kind}-{cat.name}.png", sims, cat.threshold,
                                       f"{kind} examples: {cat.name}")
            report[kind][cat.name] = examples.report(cat, hit, sims, nearest, [pool.keys[i] for i in rows], rng)
            if kind == "exclude":
                out[rows[hit]] = False
            wanted |= hit
        if kind == "include" and folders:
            out[rows[~wanted]] = False
            report["include"]["removed"] = int((~wanted).sum())
    report["removed"] = int(kept.sum() - out.sum())
    return out, report


def _example_embedder(req: CurateRequest, device: torch.device) -> Callable[[examples.Category], np.ndarray]:
    """Unit embeddings of a category's examples, by the model that embedded the pool, as the pool was."""
    backbone, meta = load_encoder(req.model)
    if req.resolution is not None and req.resolution != backbone.image_size:
        backbone.resize_pos_embed(req.resolution)
    prep = eval_transform(backbone.image_size, meta["normalization"]["mean"], meta["normalization"]["std"])
    backbone = backbone.to(device).eval()

    def embed(cat: examples.Category) -> np.ndarray:
        x = embed_images(backbone, list(cat.examples), prep, req.batch_size).float()
        return torch.nn.functional.normalize(x, dim=1).numpy()
    return embed


def _sample(req: CurateRequest, pool: Pool, rows: np.ndarray, world: World, device: torch.device
            ) -> Optional[tuple[np.ndarray, dict]]:
    """Hierarchical k-means over ``rows`` on every rank (``kmeans.hierarchy``), then, on rank 0, the balanced
    sample to the budget and its report (None on the other ranks)."""
    levels = balanced_sampling.fitted_levels(req.clusters, len(rows))
    assignments = kmeans.hierarchy(pool.embeddings, rows, levels, req.resamples, req.seed, world, device) \
        if len(rows) else [np.empty(0, np.int64)]
    if world.rank != 0:
        return None
    chosen = balanced_sampling.balanced_sample(assignments, req.budget, req.seed) if len(rows) else rows
    out = np.zeros(len(pool), bool)
    out[rows[chosen]] = True
    before = np.bincount(assignments[0], minlength=levels[0])
    after = np.bincount(assignments[0][chosen], minlength=levels[0])
    plots.cluster_sizes(req.out / "plots" / "cluster_sizes.png", before, after)
    filled = before > 0  # k-means may leave a cluster empty: the smallest is the smallest non-empty one
    smallest = [int(before[filled].min()), int(after[filled].min())] if filled.any() else [0, 0]
    return out, {"budget": req.budget, "clusters": levels, "resamples": req.resamples, "input": int(len(rows)),
                 "selected": int(len(chosen)), "largest_cluster": [int(before.max(initial=0)), int(after.max(initial=0))],
                 "smallest_cluster": smallest}


def _source(req: CurateRequest) -> dict:
    model = req.model.resolve()
    stat = model.stat()
    return {"model": str(model), "model_stamp": f"{stat.st_size}:{stat.st_mtime_ns}", "inputs": list(req.inputs),
            "resolution": req.resolution}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


