"""Resizing the grid part of a learned absolute position embedding to another patch grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_pos_embed(
    pos_embed: torch.Tensor,
    num_prefix_tokens: int,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    antialias: bool,
) -> torch.Tensor:
    """Bicubic resize (in fp32) of a (1, prefix + H*W, C) embedding; prefix tokens are kept as they are."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    expected = num_prefix_tokens + old_grid[0] * old_grid[1]
    if pos_embed.shape[1] != expected:
        raise ValueError(
            f"position embedding has {pos_embed.shape[1]} tokens, expected {expected} "
            f"({num_prefix_tokens} special + {old_grid[0]}x{old_grid[1]} grid)"
        )
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
