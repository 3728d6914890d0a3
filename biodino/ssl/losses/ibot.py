"""The iBOT loss over masked patch tokens of the global crops."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_token_weights(masks: torch.Tensor) -> torch.Tensor:
    """Weight of each masked token, in ``masks[masks]`` order: 1 / (masked tokens in its image)."""
    per_image = masks.sum(dim=1, dtype=torch.float32).clamp_min(1.0).reciprocal()
    return per_image.unsqueeze(1).expand_as(masks)[masks]


def ibot_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, weights: torch.Tensor, n_images: int,
              student_temp: float = 0.1) -> torch.Tensor:
    """Cross-entropy per masked token (M, K), weighted by ``weights`` (M,), summed, divided by ``n_images``."""
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    per_token = -(teacher_probs.float() * log_p).sum(dim=-1)
    return (per_token * weights).sum() / n_images
