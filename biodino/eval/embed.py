"""Embedding extraction with an exported backbone: images -> (N, dim) class-token embeddings."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from biodino.data.decode import to_rgb
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


@torch.inference_mode()
def embed_images(backbone: VisionTransformer, images: Sequence[Image.Image | Path], transform: T.Compose,
                 batch_size: int = 64, skipped: Optional[list[tuple[Path, str]]] = None) -> torch.Tensor:
    """Class-token embeddings in input order. With ``skipped`` given, a file that cannot be read or decoded is
    left out with a warning and appended there (else it raises)."""
    device = next(backbone.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        chunk = [rgb for im in images[start : start + batch_size] if (rgb := _rgb(im, skipped)) is not None]
        if chunk:
            out.append(backbone.embedding(torch.stack([transform(im) for im in chunk]).to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, backbone.embed_dim)


def _rgb(image: Image.Image | Path, skipped: Optional[list[tuple[Path, str]]]) -> Optional[Image.Image]:
    """The picture as displayed (``decode.to_rgb``)."""
    if not isinstance(image, Path):
        return to_rgb(image)
    try:
        with Image.open(image) as im:
            return to_rgb(im)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as err:
        if skipped is None:
            raise
        log.warning("skipping %s: %s", image, err)
        skipped.append((image, str(err).splitlines()[0] if str(err) else type(err).__name__))
        return None


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
