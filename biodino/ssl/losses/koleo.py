"""KoLeo: the Kozachenko-Leonenko entropy estimator, spreading embeddings apart within a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``-mean(log(d_nn + eps))`` over L2-normalized rows of ``x`` (n, C), in fp32; needs n >= 2."""
    if x.shape[0] < 2:
        raise ValueError(f"KoLeo needs at least 2 samples per rank, got {x.shape[0]}")
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-2.0)  # below any cosine: a sample is never its own neighbour
            nn_idx = dots.argmax(dim=1)
        dist = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)
        return -torch.log(dist + eps).mean()
