"""The iBOT loss over masked patch tokens of the global crops."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ibot_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, weights: torch.Tensor, n_images: int,
              student_temp: float = 0.1) -> torch.Tensor:
    """Cross-entropy per masked token (M, K), weighted by ``weights`` (M,) (0 for padding rows), summed, divided
    by ``n_images``. The per-token products are contracted by one einsum rather than materialized."""
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    per_token = -torch.einsum("mk,mk->m", teacher_probs.float(), log_p)
    return (per_token * weights).sum() / n_images
