"""Franca's nested Matryoshka heads: one DINO-style head per nesting width, reading the embedding's prefix
(birder) or all of it (valeoai/Franca)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from biodino.config.schema import MATRYOSHKA_INPUTS


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
    """One nesting level: Linear(d_in, d) on what the level reads, MLP (GELU after the bottleneck, no L2 norm),
    then a bias-free weight-normalized Linear to the level's prototypes with its gain starting at 1.

    ``in_dim=None`` (prefix) reads the first ``dim`` features (``d_in = dim``); an ``in_dim`` (full) reads all of
    them (``d_in = in_dim``)."""

    def __init__(self, dim: int, num_prototypes: int, hidden_dim: int, bottleneck_dim: int, nlayers: int,
                 in_dim: Optional[int] = None) -> None:
        super().__init__()
        self.dim = dim
        self.reads_prefix = in_dim is None
        self.proj = nn.Linear(dim if in_dim is None else in_dim, dim)
        self.mlp = _mlp(dim, hidden_dim, bottleneck_dim, nlayers)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, num_prototypes, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        _init_linear(self.proj)
        _init_linear(self.mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.mlp(self.proj(x[..., : self.dim] if self.reads_prefix else x)))


class MatryoshkaHead(nn.Module):
    """Franca head: one DINO-style head per nesting width ``dims[i]``, scoring ``int(num_prototypes * dims[i] /
    in_dim)`` prototypes, coarse to fine. ``matryoshka_input`` says what level i's first layer reads:

    * ``prefix`` (birder 0.8.4's ``DINOHeadMRL``): the first ``dims[i]`` features through ``Linear(dims[i],
      dims[i])``, so coarse levels train only the embedding's prefix (the true Matryoshka constraint);
    * ``full`` (valeoai/Franca's ``MRLDINOHead``, ``franca/layers/mrl_dino_head.py``): the whole embedding through
      ``Linear(in_dim, dims[i])``, so every level trains every feature and only the head's width is nested.

    The two differ only there; the rest is valeoai/Franca's head as built by its ``ssl_meta_arch.py``: per-level
    MLP ``Linear(dims[i], hidden)``-GELU-(``Linear(hidden, hidden)``-GELU)*(nlayers-2)-``Linear(hidden,
    bottleneck)``-GELU (biased, no BatchNorm: ``use_bn`` stays False), no L2 norm before the last layer, a
    weight-normalized bias-free ``Linear(bottleneck, K_i)`` with unit gains, levels returned coarse to fine.
    valeoai/Franca uses the deprecated ``torch.nn.utils.weight_norm`` (``weight_g``/``weight_v``) where this uses
    the parametrization (``parametrizations.weight.original0``/``original1``): same tensors and function, other
    names. It always builds 5 levels (``D // 16 .. D``), which is ``levels=5`` here."""

    def __init__(self, in_dim: int, num_prototypes: int, levels: int, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3, matryoshka_input: str = "prefix") -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"head nlayers must be >= 1, got {nlayers}")
        if matryoshka_input not in MATRYOSHKA_INPUTS:
            raise ValueError(f"matryoshka_input must be one of {', '.join(MATRYOSHKA_INPUTS)}, "
                             f"got {matryoshka_input!r}")
        self.matryoshka_input = matryoshka_input
        self.dims = nesting_dims(in_dim, levels)
        self.num_prototypes = [int(num_prototypes * (d / in_dim)) for d in self.dims]
        reads = None if matryoshka_input == "prefix" else in_dim
        self.levels = nn.ModuleList(_Level(d, k, hidden_dim, bottleneck_dim, nlayers, in_dim=reads)
                                    for d, k in zip(self.dims, self.num_prototypes))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One (N, K_i) logits tensor per level, coarse to fine."""
        return [level(x) for level in self.levels]
