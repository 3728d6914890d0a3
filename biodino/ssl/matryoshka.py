"""Franca's nested Matryoshka heads: one DINO-style head per prefix slice of the embedding."""

from __future__ import annotations

import torch
from torch import nn


def nesting_dims(dim: int, levels: int) -> list[int]:
    """Prefix widths ``dim // 2**(levels-1-i)``, coarse to fine (768, 4 -> [96, 192, 384, 768])."""
    if levels < 1:
        raise ValueError(f"Matryoshka levels must be >= 1, got {levels}")
    if dim % 2 ** (levels - 1) != 0:
        raise ValueError(f"embedding dim {dim} is not divisible by 2**(levels-1) = {2 ** (levels - 1)}")
    return [dim // 2 ** (levels - 1 - i) for i in range(levels)]


def _mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int) -> nn.Module:
    """Franca's MLP: Linear/GELU pairs ending in a GELU after the bottleneck (a bare Linear if nlayers == 1)."""
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(d_in, d_out), nn.GELU()]
    return nn.Sequential(*layers)


def _init_linear(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) weights and zero biases for every Linear inside ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _Level(nn.Module):
    """One nesting level: Linear(d, d) on the prefix slice, MLP (GELU after the bottleneck, no L2 norm),
    then a bias-free weight-normalized Linear to the level's prototypes with its gain starting at 1."""

    def __init__(self, dim: int, num_prototypes: int, hidden_dim: int, bottleneck_dim: int, nlayers: int) -> None:
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(dim, dim)
        self.mlp = _mlp(dim, hidden_dim, bottleneck_dim, nlayers)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, num_prototypes, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        _init_linear(self.proj)
        _init_linear(self.mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.mlp(self.proj(x[..., : self.dim])))


class MatryoshkaHead(nn.Module):
    """Franca head: level i reads only the first ``dims[i]`` features and scores them against
    ``int(num_prototypes * dims[i] / in_dim)`` prototypes, so coarse levels train the embedding's prefix."""

    def __init__(self, in_dim: int, num_prototypes: int, levels: int, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"head nlayers must be >= 1, got {nlayers}")
        self.dims = nesting_dims(in_dim, levels)
        self.num_prototypes = [int(num_prototypes * (d / in_dim)) for d in self.dims]
        self.levels = nn.ModuleList(_Level(d, k, hidden_dim, bottleneck_dim, nlayers)
                                    for d, k in zip(self.dims, self.num_prototypes))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One (N, K_i) logits tensor per level, coarse to fine."""
        return [level(x) for level in self.levels]
