"""Weighted k-nearest-neighbour classification of frozen embeddings (the k-NN protocol of DINO)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_inputs(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor, k: int
) -> None:
    """Raise ValueError naming the offending argument when shapes or k do not fit together."""
    for name, x in (("bank", bank), ("queries", queries)):
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D (n, dim), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    for name, y, x in (("bank_labels", bank_labels, bank), ("query_labels", query_labels, queries)):
        if y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor, got {y.dtype} of shape {tuple(y.shape)}")
        if len(y) != len(x):
            other = "bank" if name == "bank_labels" else "queries"
            raise ValueError(f"{name} has {len(y)} entries but {other} has {len(x)} rows")
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(f"queries have dim {queries.shape[1]} but bank has dim {bank.shape[1]}")
    if len(queries) == 0:
        raise ValueError("queries must not be empty")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k > len(bank):
        raise ValueError(f"k={k} is larger than the bank ({len(bank)} rows)")


def _num_classes(bank_labels: torch.Tensor, query_labels: torch.Tensor, num_classes: int | None) -> int:
    """Given or inferred class count, checked against the labels."""
    low = min(int(bank_labels.min()), int(query_labels.min()))
    high = max(int(bank_labels.max()), int(query_labels.max()))
    if num_classes is None:
        num_classes = high + 1
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}), found values in [{low}, {high}]")
    return num_classes


@torch.no_grad()
def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predicted class per query; queries go ``chunk_size`` at a time so memory stays O(chunk_size x len(bank))."""
    dtype = torch.float64 if bank.dtype == torch.float64 else torch.float32
    bank = F.normalize(bank.to(dtype), dim=1)
    bank_labels = bank_labels.to(bank.device, torch.long)
    predictions = []
    for chunk in torch.split(queries, chunk_size):
        sims = F.normalize(chunk.to(bank.device, dtype), dim=1) @ bank.T
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = ((top_sims - top_sims[:, :1]) / temperature).exp()  # shifted by the row max: same argmax, no overflow
        votes = torch.zeros(len(chunk), num_classes, dtype=dtype, device=bank.device)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    *,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy of a cosine k-NN classifier with temperature-weighted votes (DINO's k-NN protocol).

    Each of the k most similar bank rows votes for its label with weight exp(cosine / temperature).
    """
    _check_inputs(bank, bank_labels, queries, query_labels, k)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    num_classes = _num_classes(bank_labels, query_labels, num_classes)
    predictions = knn_predict(bank, bank_labels, queries, k, temperature, num_classes, chunk_size)
    return (predictions.cpu() == query_labels.cpu().long()).double().mean().item()
