"""Embedding extraction with an exported backbone: images -> (N, dim) class-token embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from biodino.data.sources import IMAGE_SUFFIXES
from biodino.models import VisionTransformer


def image_paths(inputs: Sequence[str]) -> list[Path]:
    """Files as given and image files under folders (sorted); a missing input raises naming it."""
    paths: list[Path] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"image input not found: {p}")
    return paths


def eval_transform(resolution: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Resize the shorter side to ``resolution`` (bicubic, antialias), center crop, normalize."""
    return T.Compose([T.ToImage(), T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.CenterCrop(resolution), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


@torch.inference_mode()
def embed_images(backbone: VisionTransformer, images: Sequence[Image.Image | Path], transform: T.Compose,
                 batch_size: int = 64) -> torch.Tensor:
    """Class-token embeddings (N, dim) in input order."""
    device = next(backbone.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        chunk = [_rgb(im) for im in images[start : start + batch_size]]
        out.append(backbone.embedding(torch.stack([transform(im) for im in chunk]).to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, backbone.embed_dim)


def _rgb(image: Image.Image | Path) -> Image.Image:
    if isinstance(image, Path):
        with Image.open(image) as im:
            return im.convert("RGB")
    return image.convert("RGB")


def write_embeddings(out: Path, embeddings: torch.Tensor, paths: Sequence[Path]) -> Path:
    """``.npz`` (arrays ``embeddings`` and ``paths``) or ``.parquet`` (columns ``path`` and ``embedding``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        np.savez(out, embeddings=embeddings.numpy(), paths=np.array([str(p) for p in paths]))
    elif out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"path": [str(p) for p in paths], "embedding": list(embeddings.numpy())})
        pq.write_table(table, out)
    else:
        raise ValueError(f"--out must end in .npz or .parquet, got {out.name}")
    return out
