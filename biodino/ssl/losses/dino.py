"""The DINO loss over class tokens: every student crop against the teacher's other global crops."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dino_loss(student_global: torch.Tensor, student_local: torch.Tensor, teacher_probs: torch.Tensor,
              student_temp: float = 0.1, n_global: int = 2) -> torch.Tensor:
    """Mean cross-entropy over all (teacher global crop, student crop) pairs except a crop with itself.

    Inputs are crop-major: ``student_global`` and ``teacher_probs`` are (n_global * B, K) with rows
    [crop 0 of every image, crop 1 of every image, ...]; ``student_local`` is (n_local * B, K). Each term
    is a batch mean; their sum is divided by the number of terms, n_global * (n_global - 1 + n_local)
    (18 for 2 global and 8 local crops).
    """
    K = teacher_probs.shape[-1]
    B = teacher_probs.shape[0] // n_global
    t = teacher_probs.float().view(n_global, B, K)
    s_g = F.log_softmax(student_global.float() / student_temp, dim=-1).view(n_global, B, K)
    # cross[i, j] = sum over images of <t_i, log p_j>; drop the diagonal (a crop never teaches itself)
    cross = torch.einsum("ibk,jbk->ij", t, s_g)
    total = cross.sum() - cross.diagonal().sum()
    n_local = student_local.shape[0] // B if student_local.numel() else 0
    if n_local:
        s_l = F.log_softmax(student_local.float() / student_temp, dim=-1).view(n_local, B, K)
        total = total + torch.einsum("ibk,jbk->", t, s_l)
    n_terms = n_global * (n_global - 1) + n_global * n_local
    return -total / (B * n_terms)
