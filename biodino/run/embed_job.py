"""``biodino embed`` on one rank or many (``torchrun``, ``srun``): every rank takes its share of the parts not yet
written, writes each finished part to ``OUT.parts/``, and rank 0 merges them, in plan order, into one output
holding every sample exactly once. A killed or preempted job, rerun the same way (on any number of ranks),
embeds only the missing parts; what it reuses was made by the same command (``embed_parts.PartStore``).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from biodino.distributed.process_group import World, joined_world
from biodino.eval.embed import embed_parts, eval_transform, feature_width
from biodino.data.sources import InputError
from biodino.eval.embed_inputs import Plan, plan_parts
from biodino.eval.embed_output import write_embeddings
from biodino.eval.embed_parts import Embedded, PartStore
from biodino.fs.atomic import atomic_write_text
from biodino.interop.export import load_encoder
from biodino.run.run_lock import run_lock

PARTS_FORMAT = "biodino-embed-parts/1"


@dataclass(frozen=True)
class EmbedRequest:
    model: Path
    inputs: tuple[str, ...]
    out: Path
    network: str = "teacher"
    features: str = "cls"
    resolution: Optional[int] = None  # default: the model's own
    label_key: Optional[str] = None
    batch_size: int = 64
    workers: int = 2
    part_size: int = 1024
    device: str = "auto"


@dataclass
class EmbedResult:
    out: Path
    rows: int
    width: int
    labels: Optional[str]  # "N classes", "N traits" or None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    reused: int = 0  # parts found already written


class RankFailedError(RuntimeError):
    """Another rank failed before embedding (rank 0 reports why)."""


Sink = Callable[[Iterator[np.ndarray], list[str], int], None]


def run_embed(req: EmbedRequest, sink: Optional[Sink] = None) -> Optional[EmbedResult]:
    """Embed ``req.inputs`` into ``req.out``; the result on rank 0, None on the others. With ``sink``, rank 0
    hands it the parts' embeddings one part at a time (with every key, and the width) instead of writing
    ``req.out``: an output larger than memory (``biodino curate``'s pool) is never held whole."""
    with joined_world() as world:
        plan = plan_parts(req.inputs, req.part_size)
        if not plan.images:
            raise InputError(f"no images in {', '.join(req.inputs)}")
        backbone, meta = load_encoder(req.model, req.network)
        if req.resolution is not None and req.resolution != backbone.image_size:
            backbone.resize_pos_embed(req.resolution)
        device = device_for(req.device, world)
        backbone = backbone.to(device).eval()
        width = feature_width(backbone, req.features)
        store = PartStore(req.out, _manifest(req, plan, meta, backbone.image_size))
        with run_lock(store.dir / ".lock") if world.rank == 0 else nullcontext():
            _agree(world, store.open if world.rank == 0 else None)
            done = store.done()
            world.barrier()  # every rank has listed the parts before any is written
            pending = [i for i, p in enumerate(plan.parts) if p.name not in done]
            mine = pending[world.rank::world.size]
            if world.size > 1:
                print(f"rank {world.rank} of {world.size}: {len(mine)} of the {len(plan.parts)} parts "
                      f"({len(plan.parts) - len(pending)} written before)", file=sys.stderr, flush=True)
            bar = tqdm(total=sum(plan.parts[i].samples for i in mine), unit="img", disable=world.rank != 0 or None)

            def finished(j: int, part: Embedded) -> None:
                store.write(plan.parts[mine[j]].name, part, width)
                bar.update(plan.parts[mine[j]].samples)

            prep = eval_transform(backbone.image_size, meta["normalization"]["mean"], meta["normalization"]["std"])
            embed_parts(backbone, [plan.parts[i] for i in mine], prep, finished, req.batch_size, req.workers,
                        req.features, req.label_key)
            bar.close()
            world.barrier()
            if world.rank != 0:
                return None
            return _merge(req, plan, store, width, len(plan.parts) - len(pending), sink)


def _merge(req: EmbedRequest, plan: Plan, store: PartStore, width: int, reused: int,
           sink: Optional[Sink]) -> EmbedResult:
    names = [p.name for p in plan.parts]
    merged = store.merged(names, width, embeddings=sink is None)
    merged.skipped = [(str(path), why) for path, why in plan.unreadable] + merged.skipped
    if not merged.keys:
        store.remove()
        raise InputError(f"none of the {plan.images} images in {', '.join(req.inputs)} could be embedded")
    labels = merged.labels if merged.labels and all(lab is not None for lab in merged.labels) else None
    if sink is None:
        write_embeddings(req.out, merged.array(width), merged.keys, labels)
    else:
        sink(store.blocks(names, width), merged.keys, width)
    skipped_file = req.out.with_name(req.out.name + ".skipped.tsv")
    if merged.skipped:
        atomic_write_text(skipped_file, "".join(f"{key}\t{why}\n" for key, why in merged.skipped))
    else:
        skipped_file.unlink(missing_ok=True)
    store.remove()
    return EmbedResult(req.out, len(merged.keys), width, _describe(labels), merged.skipped, reused)


def _describe(labels: Optional[list]) -> Optional[str]:
    if labels is None:
        return None
    if any(isinstance(lab, tuple) for lab in labels):
        return f"{len({t for lab in labels for t in (lab if isinstance(lab, tuple) else (lab,))})} traits"
    return f"{len(set(labels))} classes"


def _agree(world: World, step: Optional[Any]) -> None:
    """Run ``step`` (rank 0's part of the setup) and let every rank know whether it succeeded: on failure rank 0
    raises the error and the others RankFailedError, instead of waiting at the next barrier."""
    error: Optional[BaseException] = None
    if step is not None:
        try:
            step()
        except Exception as err:  # re-raised below, after the other ranks learned of it
            error = err
    if world.size > 1:
        import torch.distributed as dist

        flag = torch.tensor([int(error is not None)])
        dist.all_reduce(flag)
        if flag.item() and error is None:
            raise RankFailedError("rank 0 could not prepare the output; see its error")
    if error is not None:
        raise error


def device_for(spec: str, world: World) -> torch.device:
    """``auto``: this rank's GPU when there is one, else the CPU."""
    if spec != "auto":
        return torch.device(spec)
    return torch.device(f"cuda:{world.local_rank}" if torch.cuda.is_available() else "cpu")


def _manifest(req: EmbedRequest, plan: Plan, meta: dict[str, Any], resolution: int) -> dict[str, Any]:
    """What decides the parts' contents: the same model file (path, size, time), network, features, resolution,
    label field and plan of parts."""
    source = Path(meta.get("source", req.model)).resolve()
    stat = source.stat()
    return {"format": PARTS_FORMAT, "model": str(source), "model_stamp": f"{stat.st_size}:{stat.st_mtime_ns}",
            "network": req.network, "features": req.features, "resolution": resolution, "label_key": req.label_key,
            "plan": plan.digest(), "parts": len(plan.parts), "images": plan.images}


def summary(result: EmbedResult) -> str:
    labels = f", {result.labels}" if result.labels else ""
    reused = f"; {result.reused} parts reused from an earlier run" if result.reused else ""
    return (f"{result.rows} embeddings of size {result.width}{labels} -> {result.out}; {len(result.skipped)} "
            f"skipped{reused}")

