"""``biodino pack``: image folders and lists -> curated, shuffled WebDataset tar shards and an index."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Iterable, Optional

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from biodino.data.curation import Inspection, curate, inspect
from biodino.data.decode import needs_conversion, to_rgb
from biodino.data.shard_index import Shard, write_index
from biodino.data.sources import InputError, list_inputs

FORMATS = {"keep": None, "jpg": "JPEG", "webp": "WEBP", "png": "PNG"}
PIL_TO_EXT = {"JPEG": "jpg", "WEBP": "webp", "PNG": "png"}
LOSSLESS = {"GIF", "BMP", "TIFF", "PPM", "TGA"}


@dataclass(frozen=True)
class PackOptions:
    out: Path
    prefix: str = "shard"
    max_count: int = 10_000
    max_size: int = 1_000_000_000
    min_side: int = 64
    near_threshold: Optional[int] = 5  # None: no near-duplicate removal
    max_side: Optional[int] = None
    format: str = "keep"
    quality: int = 90
    jobs: int = 1
    seed: int = 0
    overwrite: bool = False


class OutputNotEmptyError(FileExistsError):
    """The output already holds this prefix's shards or index and overwrite was not asked for."""


def encode(ins: Inspection, max_side: Optional[int], fmt: str, quality: int) -> tuple[str, bytes]:
    """The bytes to store: the original file when allowed, else re-encoded (resized to ``max_side``); images whose
    stored pixels are not what a viewer shows (rotated, 16-bit, alpha, palette, CMYK) are stored as 8-bit RGB."""
    data = ins.item.path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        needs_resize = max_side is not None and max(img.size) > max_side
        target = FORMATS[fmt] or (img.format if img.format in PIL_TO_EXT else _lossless_or_jpeg(img.format))
        if not needs_resize and img.format == target and not needs_conversion(img):
            return PIL_TO_EXT[target], data
        img = to_rgb(img)
        if needs_resize:
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format=target, quality=quality)
        return PIL_TO_EXT[target], buf.getvalue()


def _lossless_or_jpeg(source_format: Optional[str]) -> str:
    """Where the source format cannot be stored as it is: PNG for lossless sources (GIF, BMP, TIFF), else JPEG."""
    return "PNG" if source_format in LOSSLESS else "JPEG"


def _existing_outputs(opts: PackOptions) -> list[Path]:
    return sorted(opts.out.glob(f"{opts.prefix}-*.tar")) + [p for p in [opts.out / f"{opts.prefix}.json"] if p.exists()]


def _parallel(fn, items: list, jobs: int, desc: str) -> Iterable:
    """``fn`` over ``items`` in order, on ``jobs`` processes, with a progress bar."""
    if jobs <= 1:
        yield from tqdm(map(fn, items), total=len(items), desc=desc, unit="img")
        return
    with Pool(jobs) as pool:
        yield from tqdm(pool.imap(fn, items, chunksize=16), total=len(items), desc=desc, unit="img")


def check_options(opts: PackOptions) -> None:
    """Every option in its range and the output writable, before any input is read or anything written."""
    ranges = [("--max-count", opts.max_count, 1), ("--max-size", opts.max_size, 1), ("--min-side", opts.min_side, 1),
              ("--jobs", opts.jobs, 1), ("--quality", opts.quality, 1)]
    ranges += [("--max-side", opts.max_side, 1)] if opts.max_side is not None else []
    ranges += [("--near-threshold", opts.near_threshold, 0)] if opts.near_threshold is not None else []
    for flag, value, low in ranges:
        if value < low:
            raise InputError(f"{flag} must be at least {low}, got {value}")
    if opts.quality > 100 or (opts.near_threshold or 0) > 63:
        raise InputError("--quality must be at most 100 and --near-threshold at most 63")
    if opts.format not in FORMATS:
        raise InputError(f"--format must be one of {sorted(FORMATS)}, got {opts.format!r}")
    if opts.out.exists() and not opts.out.is_dir():
        raise InputError(f"--out {opts.out} is a file, not a folder")
    existing = opts.out
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK) or os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise InputError(f"--out {opts.out}: {existing} is not writable")


def pack(inputs: list[str], opts: PackOptions, selection: Optional[dict] = None) -> dict:
    """Curate, shuffle (seeded) and write shards; returns the index document's report. Bad options, an output
    that already holds shards and inputs without a usable image are refused before anything is written.
    ``selection``: the report of how the inputs were chosen (``biodino curate``), kept in the index."""
    check_options(opts)
    existing = _existing_outputs(opts)
    if existing and not opts.overwrite:
        raise OutputNotEmptyError(f"{opts.out} already holds {existing[0].name} (and {len(existing) - 1} more); "
                                  "pass --overwrite to replace them")
    listing = list_inputs(inputs)
    if not listing.images:
        raise InputError(f"no images in {', '.join(inputs)}" + _unreadable_note(listing.unreadable))
    inspections = list(_parallel(partial(inspect, min_side=opts.min_side), listing.images, opts.jobs, "inspect"))
    unreadable = listing.unreadable + [(i.item.path, i.error) for i in inspections if i.status == "unreadable"]
    kept, report = curate(inspections, opts.near_threshold)
    if not kept:
        raise InputError(f"none of the {len(inspections)} images in {', '.join(inputs)} is usable "
                         f"({_reasons(report)})" + _unreadable_note(unreadable))
    order = [ins for ins in kept for _ in range(ins.item.repeats)]
    random.Random(opts.seed).shuffle(order)
    report["written"] = len(order)
    report["unreadable"] = len(unreadable)
    shards = _write(order, opts, existing)
    curation = {k: report.get(k, 0) for k in ("inputs", "unreadable", "undecodable", "too_small", "exact_duplicates",
                                               "near_duplicates", "kept", "written")}
    unreadable_paths = [f"{path} ({why})" for path, why in unreadable]
    write_index(opts.out / f"{opts.prefix}.json", shards,
                {"curation": {**curation, "unreadable_paths": unreadable_paths},
                 "near_duplicate_method": f"dhash64 hamming<={opts.near_threshold}", "seed": opts.seed,
                 **({"selection": selection} if selection is not None else {})})
    return {**curation, "unreadable_paths": unreadable_paths}


def _reasons(report: Counter) -> str:
    return ", ".join(f"{report[k]} {k.replace('_', ' ')}" for k in ("unreadable", "undecodable", "too_small",
                                                                    "exact_duplicates", "near_duplicates") if report[k])


def _unreadable_note(unreadable: list[tuple[Path, str]]) -> str:
    if not unreadable:
        return ""
    shown = "; ".join(f"{p} ({why})" for p, why in unreadable[:3])
    return f"; unreadable: {shown}" + (f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else "")


def _write(order: list[Inspection], opts: PackOptions, existing: list[Path]) -> list[Shard]:
    """Shards into a hidden folder, moved into ``opts.out`` only once all are complete; the folder is removed on
    any failure (a full disk is reported as such)."""
    from biodino.fs.atomic import failing_cleanly

    opts.out.mkdir(parents=True, exist_ok=True)
    tmp = opts.out / f".{opts.prefix}-packing"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with failing_cleanly(opts.out, tmp):
        shards = _write_shards(order, opts, tmp)
    for old in existing:  # replace only once the new shards are complete
        old.unlink()
    for s in shards:
        os.replace(s.path, opts.out / s.path.name)
    tmp.rmdir()
    return [Shard(opts.out / s.path.name, s.samples) for s in shards]


def _write_shards(order: list[Inspection], opts: PackOptions, tmp: Path) -> list[Shard]:
    counts: Counter = Counter()
    enc = partial(encode, max_side=opts.max_side, fmt=opts.format, quality=opts.quality)
    pattern = str(tmp / f"{opts.prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=opts.max_count, maxsize=opts.max_size, verbose=0) as sink:
        for n, (ins, (ext, data)) in enumerate(zip(order, _parallel(enc, order, opts.jobs, "write"))):
            meta = {"source_path": str(ins.item.path), "source": ins.item.source,
                    "width": ins.size[0], "height": ins.size[1]}
            sink.write({"__key__": f"{n:09d}", ext: data, "json": json.dumps(meta).encode()})
            counts[Path(sink.fname).name] += 1
    return [Shard(tmp / name, counts[name]) for name in sorted(counts)]
