"""Embedding extraction with an exported backbone: images -> (N, dim) class-token embeddings."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from biodino.data.decode import to_rgb
from biodino.fs.atomic import atomic_write
from biodino.data.sources import walk_images
from biodino.models import VisionTransformer

log = logging.getLogger(__name__)


def image_paths(inputs: Sequence[str], unreadable: Optional[list[tuple[Path, str]]] = None) -> list[Path]:
    """Files as given and image files under folders (sorted); a missing input raises naming it. Folders that
    cannot be listed are appended to ``unreadable``."""
    paths: list[Path] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            paths += walk_images(p, unreadable if unreadable is not None else [])
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"image input not found: {p}")
    return paths


def eval_transform(resolution: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Resize the shorter side to ``resolution`` (bicubic, antialias), center crop, normalize."""
    return T.Compose([T.ToImage(), T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.CenterCrop(resolution), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


FEATURES = ("cls", "cls+mean", "mean")  # class token; class token and mean patch token; mean patch token


def labelled_paths(inputs: Sequence[str], unreadable: Optional[list[tuple[Path, str]]] = None
                   ) -> tuple[list[Path], Optional[list[str]]]:
    """``image_paths`` and, when every input is a folder whose images all sit in sub-folders, their labels: the
    first sub-folder's name (one class per sub-folder). Otherwise no labels (None)."""
    paths, labels = [], []
    for spec in inputs:
        found = image_paths([spec], unreadable)
        paths += found
        root = Path(spec)
        if labels is not None and root.is_dir() and all(len(p.relative_to(root).parts) > 1 for p in found):
            labels += [p.relative_to(root).parts[0] for p in found]
        else:
            labels = None
    return paths, labels


class _Images(Dataset):
    """Decoded, transformed images by index; an unreadable file gives its error instead (skipped, named)."""

    def __init__(self, images: Sequence[Image.Image | Path], transform: T.Compose) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, Optional[torch.Tensor], str]:
        try:
            return i, self.transform(load_rgb(self.images[i])), ""
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as err:
            return i, None, str(err).splitlines()[0] if str(err) else type(err).__name__


def _batch(items: list[tuple[int, Optional[torch.Tensor], str]]) -> tuple[list[int], Optional[torch.Tensor],
                                                                      list[tuple[int, str]]]:
    good = [(i, x) for i, x, _ in items if x is not None]
    return ([i for i, _ in good], torch.stack([x for _, x in good]) if good else None,
            [(i, why) for i, x, why in items if x is None])


def features_of(backbone: VisionTransformer, x: torch.Tensor, features: str = "cls") -> torch.Tensor:
    """(B, dim) or (B, 2 dim) image features from the final-normalized tokens (``FEATURES``)."""
    out = backbone.forward_features(x)
    mean = out.patches.mean(dim=1)
    return {"cls": out.cls, "cls+mean": torch.cat([out.cls, mean], dim=1), "mean": mean}[features]


@torch.inference_mode()
def embed_images(backbone: VisionTransformer, images: Sequence[Image.Image | Path], transform: T.Compose,
                 batch_size: int = 64, skipped: Optional[list[tuple[Path, str]]] = None, workers: int = 0,
                 features: str = "cls") -> torch.Tensor:
    """Embeddings in input order, decoded and resized by ``workers`` DataLoader processes, in bf16 on a GPU. With
    ``skipped`` given, a file that cannot be read or decoded is left out with a warning and appended there (else
    it raises)."""
    device = next(backbone.parameters()).device
    loader = DataLoader(_Images(images, transform), batch_size=batch_size, num_workers=workers, collate_fn=_batch,
                        pin_memory=device.type == "cuda")
    out = []
    for indices, x, errors in loader:
        for i, why in errors:
            if skipped is None:
                raise OSError(f"{images[i]}: {why}")
            log.warning("skipping %s: %s", images[i], why)
            skipped.append((images[i], why))
        if x is not None:
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                out.append(features_of(backbone, x.to(device, non_blocking=True), features).float().cpu())
    width = backbone.embed_dim * (2 if features == "cls+mean" else 1)
    return torch.cat(out) if out else torch.empty(0, width)


def load_rgb(image: Image.Image | Path) -> Image.Image:
    """The picture as displayed (``decode.to_rgb``), from a file or an image already open."""
    if not isinstance(image, Path):
        return to_rgb(image)
    with Image.open(image) as im:
        return to_rgb(im)


def write_embeddings(out: Path, embeddings: torch.Tensor, paths: Sequence[Path],
                     labels: Optional[Sequence[str]] = None) -> Path:
    """``.npz`` (arrays ``embeddings``, ``paths`` and, when known, ``labels``: what ``biodino eval`` reads) or
    ``.parquet`` (columns ``path``, ``embedding`` and ``label``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        arrays = {"embeddings": embeddings.numpy(), "paths": np.array([str(p) for p in paths])}
        if labels is not None:
            arrays["labels"] = np.array(list(labels))
        atomic_write(out, lambda f: np.savez(f, **arrays))
    elif out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {"path": [str(p) for p in paths], "embedding": list(embeddings.numpy())}
        if labels is not None:
            columns["label"] = list(labels)
        atomic_write(out, lambda f: pq.write_table(pa.table(columns), f))
    else:
        raise ValueError(f"--out must end in .npz or .parquet, got {out.name}")
    return out
