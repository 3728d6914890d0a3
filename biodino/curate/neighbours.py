"""Exact cosine k-nearest neighbours in chunks: a block of query rows against the base in slices, on the GPU
(float16 products) or the CPU (float32), keeping a running top k. Memory is one (query chunk x base slice)
product, whatever the pool size; the pool's rows are unit vectors, so a product is the cosine similarity."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

QUERY_CHUNK = 4096
BASE_SLICE = 131072


def _on(device: torch.device, rows: np.ndarray) -> torch.Tensor:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return torch.from_numpy(np.array(rows)).to(device=device, dtype=dtype)  # a copy: memmaps are read-only


@torch.no_grad()
def top_k(queries: np.ndarray, base: np.ndarray, k: int, device: torch.device,
          self_offset: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices), each (len(queries), k), most similar first. ``self_offset``: the queries are base
    rows ``self_offset...``, and a row is never its own neighbour. Short rows (k > candidates) pad with -inf / -1."""
    sims = np.full((len(queries), k), -np.inf, np.float32)
    idx = np.full((len(queries), k), -1, np.int64)
    for q0 in range(0, len(queries), QUERY_CHUNK):
        q = _on(device, queries[q0:q0 + QUERY_CHUNK])
        best_s = torch.full((len(q), k), -torch.inf, device=device)
        best_i = torch.full((len(q), k), -1, dtype=torch.long, device=device)
        for b0 in range(0, len(base), BASE_SLICE):
            s = (q @ _on(device, base[b0:b0 + BASE_SLICE]).T).float()
            if self_offset is not None:
                rows = torch.arange(len(q), device=device)
                cols = rows + self_offset + q0 - b0
                inside = (cols >= 0) & (cols < s.shape[1])
                s[rows[inside], cols[inside]] = -torch.inf
            cand_s = torch.cat([best_s, s], 1)
            cand_i = torch.cat([best_i, torch.arange(b0, b0 + s.shape[1], device=device).expand(len(q), -1)], 1)
            best_s, pos = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
            best_i = cand_i.gather(1, pos)
        best_i = torch.where(torch.isneginf(best_s), -1, best_i)  # a row itself, or no candidate left
        sims[q0:q0 + len(q), :best_s.shape[1]] = best_s.cpu().numpy()
        idx[q0:q0 + len(q), :best_i.shape[1]] = best_i.cpu().numpy()
    return sims, idx
