"""Multi-head self-attention with a selectable kernel: torch SDPA (default) or xformers."""

from __future__ import annotations

import functools
import importlib.util
import warnings
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

AttentionBackend = Literal["sdpa", "xformers"]
BACKENDS: tuple[str, ...] = ("sdpa", "xformers")
Shapes = tuple[tuple[int, int], ...]  # (images, tokens) of each group of a flat token buffer


@functools.cache
def xformers_available() -> bool:
    """True when the optional xformers package can be imported."""
    return importlib.util.find_spec("xformers") is not None


@functools.cache
def _warn_fallback(reason: str) -> None:
    warnings.warn(f"attention backend 'xformers' unavailable ({reason}); using torch SDPA", stacklevel=3)


class Attention(nn.Module):
    """Self-attention over (B, N, C) tokens; qkv and output projections with bias."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: AttentionBackend = "sdpa") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, shapes: Optional[Shapes] = None) -> torch.Tensor:
        """``x`` (B, N, C) tokens, or (T, C) tokens of several groups concatenated, ``shapes`` their (B_i, N_i):
        the projections run once over all tokens, attention within each group (images of one crop size)."""
        if shapes is None:
            B, N, C = x.shape
            return self.forward(x.reshape(B * N, C), ((B, N),)).view(B, N, C)
        qkv = self.qkv(x)
        groups = qkv.split([b * n for b, n in shapes])
        outs = [self._attend(part.view(b, n, 3, self.num_heads, self.head_dim)) for part, (b, n) in zip(groups, shapes)]
        return self.proj(outs[0] if len(outs) == 1 else torch.cat(outs))

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, N, 3, H, D) -> (B * N, H * D)."""
        B, N = qkv.shape[:2]
        if self._use_xformers(qkv):
            from xformers.ops import memory_efficient_attention

            q, k, v = qkv.unbind(2)  # (B, N, H, D) each: xformers' layout
            out = memory_efficient_attention(q, k, v)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) each
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return out.reshape(B * N, -1)

    def _use_xformers(self, x: torch.Tensor) -> bool:
        if self.backend != "xformers":
            return False
        if not xformers_available():
            _warn_fallback("not installed")
            return False
        if not x.is_cuda:
            _warn_fallback("inputs are not on CUDA")
            return False
        return True
