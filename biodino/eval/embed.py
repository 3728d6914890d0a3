"""Embedding extraction with a backbone: parts of images (``embed_inputs``) -> (n, dim) features in part order.

DataLoader workers decode (EXIF orientation, any mode: ``decode.to_rgb``), resize and center-crop to uint8; the
main process normalizes on the device and runs the backbone, in bf16 on a GPU. The work is cut into batches of
parts, spread over the workers, so even one small folder keeps every worker busy; a part is handed on once all of
its batches are back. An unreadable image is skipped, named, and counted.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2 as T

from biodino.data.decode import to_rgb
from biodino.data.tar_reader import TarShard
from biodino.eval.embed_inputs import Label, Part, label_of
from biodino.eval.embed_parts import Embedded
from biodino.models import VisionTransformer

log = logging.getLogger(__name__)

FEATURES = ("cls", "cls+mean", "mean")  # class token; class token and mean patch token; mean patch token
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DECODE_ERRORS = (OSError, ValueError, Image.DecompressionBombError, SyntaxError)


@dataclass(frozen=True)
class Preprocessing:
    """Shorter side resized to ``resolution`` (bicubic, antialiased), center crop; normalized on the device."""

    resolution: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def resize(self) -> T.Compose:
        return T.Compose([T.ToImage(), T.Resize(self.resolution, interpolation=T.InterpolationMode.BICUBIC,
                                                antialias=True), T.CenterCrop(self.resolution)])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 normalized, on ``x``'s device."""
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x.float() / 255 - mean) / std


def eval_transform(resolution: int, mean: Sequence[float], std: Sequence[float]) -> Preprocessing:
    return Preprocessing(int(resolution), tuple(map(float, mean)), tuple(map(float, std)))


def features_of(backbone: VisionTransformer, x: torch.Tensor, features: str = "cls") -> torch.Tensor:
    """(B, dim) or (B, 2 dim) image features from the final-normalized tokens (``FEATURES``)."""
    out = backbone.forward_features(x)
    mean = out.patches.mean(dim=1)
    return {"cls": out.cls, "cls+mean": torch.cat([out.cls, mean], dim=1), "mean": mean}[features]


def feature_width(backbone: VisionTransformer, features: str) -> int:
    return backbone.embed_dim * (2 if features == "cls+mean" else 1)


def load_rgb(image: Image.Image | Path) -> Image.Image:
    """The picture as displayed (``decode.to_rgb``), from a file or an image already open."""
    if not isinstance(image, Path):
        return to_rgb(image)
    with Image.open(image) as im:
        return to_rgb(im)


@dataclass
class _Batch:
    part: int  # index in the parts list
    index: int  # batch number within the part
    keys: list[str]
    labels: list[Label]
    pixels: Optional[torch.Tensor]  # uint8 (n, 3, H, W), None when no image of the batch could be read
    skipped: list[tuple[str, str]]


class _PartBatches(IterableDataset):
    """Batches of the parts; worker w of W takes every W-th batch across all parts."""

    def __init__(self, parts: Sequence[Part], prep: Preprocessing, batch_size: int,
                 label_key: Optional[str]) -> None:
        self.parts, self.resize, self.batch_size, self.label_key = parts, prep.resize(), batch_size, label_key
        self._shard: Optional[TarShard] = None

    def __iter__(self) -> Iterator[_Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        unit = 0
        for p, part in enumerate(self.parts):
            for b in range(batches_in(part, self.batch_size)):
                if unit % workers == worker:
                    yield self._batch(p, part, b)
                unit += 1

    def _batch(self, p: int, part: Part, b: int) -> _Batch:
        batch = _Batch(p, b, [], [], None, [])
        pixels = []
        for key, label, read in self._samples(part, range(b * self.batch_size, (b + 1) * self.batch_size)):
            try:
                pixels.append(self.resize(load_rgb(read())))
            except DECODE_ERRORS as err:
                batch.skipped.append((key, _reason(err)))
                continue
            batch.keys.append(key)
            batch.labels.append(label)
        batch.pixels = torch.stack(pixels) if pixels else None
        return batch

    def _samples(self, part: Part, indices: range) -> Iterator[tuple[str, Label, Callable[[], Image.Image | Path]]]:
        """(key, label, reader) of the part's samples at ``indices`` (fewer at its end)."""
        if part.shard is None:
            for i in indices[:max(0, len(part.files) - indices.start)]:
                yield str(part.files[i]), part.labels[i], lambda f=part.files[i]: f
            return
        if self._shard is None or self._shard.path != part.shard:
            self._shard = TarShard(part.shard)
        shard = self._shard
        for i in indices[:max(0, len(shard) - indices.start)]:
            yield shard.keys[i], *self._shard_sample(shard, i)

    def _shard_sample(self, shard: TarShard, i: int) -> tuple[Label, Callable[[], Image.Image]]:
        label = None
        if self.label_key is not None:
            meta = shard.read(i, ("json",))
            label = label_of(json.loads(meta), self.label_key) if meta is not None else None
            if label is None:
                return None, _fail(f"no {self.label_key!r} in its JSON")
        data = shard.read(i, IMAGE_EXTS)
        if data is None:
            return label, _fail(f"no image member ({', '.join(IMAGE_EXTS)})")
        return label, lambda: Image.open(io.BytesIO(data))


def _reason(err: BaseException) -> str:
    if isinstance(err, UnidentifiedImageError):
        return "not an image Pillow can read"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _fail(why: str) -> Callable[[], Image.Image]:
    def read() -> Image.Image:
        raise ValueError(why)
    return read


def batches_in(part: Part, batch_size: int) -> int:
    return max(1, -(-part.samples // batch_size))


@torch.inference_mode()
def embed_parts(backbone: VisionTransformer, parts: Sequence[Part], prep: Preprocessing, on_part: Callable[[int,
                Embedded], None], batch_size: int = 64, workers: int = 0, features: str = "cls",
                label_key: Optional[str] = None) -> None:
    """Embed every part and hand each, complete and in sample order, to ``on_part(index, embedded)``."""
    device = next(backbone.parameters()).device
    loader = DataLoader(_PartBatches(parts, prep, batch_size, label_key), batch_size=None, num_workers=workers,
                        pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None)
    threads = torch.get_num_threads()
    if device.type == "cpu" and workers:  # the workers decode on the other cores: no oversubscribed forward
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - workers))
    try:
        _embed_batches(backbone, loader, parts, prep, on_part, batch_size, features, device)
    finally:
        torch.set_num_threads(threads)


def _embed_batches(backbone: VisionTransformer, loader: DataLoader, parts: Sequence[Part], prep: Preprocessing,
                   on_part: Callable[[int, Embedded], None], batch_size: int, features: str,
                   device: torch.device) -> None:
    pending: dict[int, dict[int, tuple[_Batch, Optional[np.ndarray]]]] = {}
    for batch in loader:
        out = None
        if batch.pixels is not None:
            x = prep.normalize(batch.pixels.to(device, non_blocking=True))
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                out = features_of(backbone, x, features).float().cpu().numpy()
        got = pending.setdefault(batch.part, {})
        got[batch.index] = (batch, out)
        if len(got) == batches_in(parts[batch.part], batch_size):
            on_part(batch.part, _assembled(pending.pop(batch.part)))


def _assembled(batches: dict[int, tuple[_Batch, Optional[np.ndarray]]]) -> Embedded:
    part = Embedded()
    for b in sorted(batches):
        batch, out = batches[b]
        part.keys += batch.keys
        part.labels += batch.labels
        part.skipped += batch.skipped
        if out is not None:
            part.embeddings.append(out)
    return part


def embed_images(backbone: VisionTransformer, images: Sequence[Path], prep: Preprocessing, batch_size: int = 64,
                 skipped: Optional[list[tuple[Path, str]]] = None, workers: int = 0,
                 features: str = "cls") -> torch.Tensor:
    """Embeddings of image files in input order. With ``skipped`` given, a file that cannot be read is left out
    with a warning and appended there (else it raises OSError naming it)."""
    parts = [Part("files", tuple(images), (None,) * len(images), samples=len(images))]
    done: list[Embedded] = []
    embed_parts(backbone, parts, prep, lambda _, e: done.append(e), batch_size, workers, features)
    result = done[0]
    for key, why in result.skipped:
        if skipped is None:
            raise OSError(f"{key}: {why}")
        log.warning("skipping %s: %s", key, why)
        skipped.append((Path(key), why))
    return torch.from_numpy(result.array(feature_width(backbone, features)))
