"""Retrieval of same-class gallery rows by cosine similarity: mean average precision over the full ranking and
Recall@K (a query counts as recalled when one of its K nearest gallery rows shares its label)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def retrieval_metrics(gallery: torch.Tensor, gallery_labels: torch.Tensor, queries: torch.Tensor,
                      query_labels: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10),
                      chunk_size: int = 1024) -> dict[str, float]:
    """``{"map", "recall@K"...}`` over the queries that have at least one positive in the gallery; queries
    without any are left out and counted (``queries_without_positives``). Chunked: memory O(chunk x gallery)."""
    device = gallery.device
    gallery = F.normalize(gallery.float(), dim=1)
    gallery_labels = gallery_labels.to(device)
    ap, hits, missing = [], {k: 0 for k in ks}, 0
    for chunk, labels in zip(queries.split(chunk_size), query_labels.split(chunk_size)):
        sims = F.normalize(chunk.to(device).float(), dim=1) @ gallery.T
        relevant = labels.to(device)[:, None] == gallery_labels[None, :]
        positives = relevant.sum(dim=1)
        has = positives > 0
        missing += int((~has).sum())
        ranked = relevant.gather(1, sims.argsort(dim=1, descending=True))[has]
        precision = ranked.cumsum(dim=1).float() / torch.arange(1, ranked.shape[1] + 1, device=device)
        ap.append((precision * ranked).sum(dim=1) / positives[has])
        for k in ks:
            hits[k] += int(ranked[:, :k].any(dim=1).sum())
    scores = torch.cat(ap)
    if scores.numel() == 0:
        raise ValueError("no query has a same-label row in the gallery")
    out = {"map": float(scores.mean())}
    out.update({f"recall@{k}": hits[k] / scores.numel() for k in ks})
    if missing:
        out["queries_without_positives"] = missing
    return out
