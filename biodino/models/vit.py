"""Vision Transformer with register tokens and LayerScale: the backbone of every biodino objective.

The state-dict keys follow birder's ViT (``conv_proj``, ``class_token``, ``reg_tokens``,
``pos_embedding``, ``encoder.block.<i>.*``, ``norm``), the framework that published both seed models,
so its releases load without remapping and our exports load into it. Tokens are ordered
[registers, class, patches] and the position embedding covers all of them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import MLP

from biodino.models.attention import Attention, AttentionBackend, Shapes
from biodino.models.pos_embed import resize_pos_embed


INITS = ("dinov2", "birder")


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a backbone; ``image_size`` is the size its position embedding is stored at."""

    patch_size: int
    dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_registers: int = 0
    layer_scale_init: Optional[float] = 1e-5
    drop_path_rate: float = 0.1
    drop_path_uniform: bool = False  # every block at drop_path_rate (dinov2's recipes) instead of 0 -> rate linearly
    init: str = "dinov2"  # "dinov2" or "birder": how a from-scratch run draws its weights (see init_weights)
    image_size: int = 224
    norm_eps: float = 1e-6
    attn_backend: AttentionBackend = "sdpa"
    grad_checkpointing: bool = False


@dataclass
class BackboneOutput:
    """Final-normalized tokens of a forward pass: class (B, C), registers (B, R, C), patches (B, N, C)."""

    cls: torch.Tensor
    registers: torch.Tensor
    patches: torch.Tensor


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (CaiT), initialized small."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth per image ("row" mode): drops a residual branch with probability ``p`` and scales the kept
    ones by 1 / (1 - p). The rate is a tensor, so every block runs the same compiled code whatever its rate."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.register_buffer("survival", torch.tensor(1.0 - p), persistent=False)

    def forward(self, x: torch.Tensor, shapes: Shapes) -> torch.Tensor:
        """``x`` (T, C): the flat tokens of the groups in ``shapes``; one draw per image."""
        if not self.training:
            return x
        images = x.new_empty(sum(b for b, _ in shapes)).bernoulli_(self.survival).div_(self.survival)
        per_image = images.split([b for b, _ in shapes])
        per_token = [keep.unsqueeze(1).expand(b, n).reshape(-1) for keep, (b, n) in zip(per_image, shapes)]
        return x * (per_token[0] if len(per_token) == 1 else torch.cat(per_token)).unsqueeze(1)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        """The rate is not in state dicts: refill it, for modules built on the meta device and then loaded."""
        with torch.no_grad():
            self.survival.fill_(1.0 - self.p)
        super()._load_from_state_dict(*args, **kwargs)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + drop_path(ls(attn(norm(x))))``, then the same for the MLP.

    It works on flat tokens (T, C) of one or more groups of images (``shapes``): one pass of the block serves the
    global and the local crops together, so a sharded block is gathered once for both.
    """

    def __init__(self, cfg: ViTConfig, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.num_heads, qkv_bias=True, backend=cfg.attn_backend)
        self.layer_scale_1 = self._layer_scale(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        # torchvision's MLP: Linear (mlp.0), GELU, Dropout, Linear (mlp.3), Dropout.
        self.mlp = MLP(cfg.dim, [cfg.mlp_dim, cfg.dim], activation_layer=nn.GELU, inplace=None, dropout=0.0)
        self.layer_scale_2 = self._layer_scale(cfg)
        self.drop_path = DropPath(drop_path)

    @staticmethod
    def _layer_scale(cfg: ViTConfig) -> nn.Module:
        return nn.Identity() if cfg.layer_scale_init is None else LayerScale(cfg.dim, cfg.layer_scale_init)

    def forward(self, x: torch.Tensor, shapes: Shapes) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1(self.attn(self.norm1(x), shapes)), shapes)
        return x + self.drop_path(self.layer_scale_2(self.mlp(self.norm2(x))), shapes)


class Encoder(nn.Module):
    """The stack of blocks, with optional activation checkpointing per block."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        rates = [cfg.drop_path_rate if cfg.drop_path_uniform else cfg.drop_path_rate * i / max(cfg.depth - 1, 1)
                 for i in range(cfg.depth)]
        self.block = nn.ModuleList(Block(cfg, rate) for rate in rates)
        self.grad_checkpointing = cfg.grad_checkpointing

    def forward(self, x: torch.Tensor, shapes: Shapes) -> torch.Tensor:
        for blk in self.block:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, shapes, use_reentrant=False)
            else:
                x = blk(x, shapes)
        return x


class VisionTransformer(nn.Module):
    """ViT backbone accepting any input whose sides are multiples of the patch size."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.embed_dim = cfg.dim
        self.num_registers = cfg.num_registers
        self.num_prefix_tokens = 1 + cfg.num_registers
        self.grid = (cfg.image_size // cfg.patch_size,) * 2

        self.conv_proj = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=True)
        self.class_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.reg_tokens = nn.Parameter(torch.zeros(1, cfg.num_registers, cfg.dim)) if cfg.num_registers else None
        num_tokens = self.num_prefix_tokens + self.grid[0] * self.grid[1]
        self.pos_embedding = nn.Parameter(torch.zeros(1, num_tokens, cfg.dim))
        self.encoder = Encoder(cfg)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.init_weights()

    @property
    def image_size(self) -> int:
        return self.grid[0] * self.patch_size

    def init_weights(self) -> None:
        """Weights for a run from scratch, as ``cfg.init`` names. dinov2: truncated-normal linears (std 0.02) and
        position embedding, tokens of std 1e-6, PyTorch's default patch projection. birder: position embedding
        normal (std 0.02), zero tokens, patch projection truncated-normal of std sqrt(1 / fan_in), attention
        linears truncated-normal (std 0.02), MLP linears PyTorch's default (``Linear.reset_parameters``)."""
        if self.cfg.init not in INITS:
            raise ValueError(f"unknown init {self.cfg.init!r}; choose one of {', '.join(INITS)}")
        birder = self.cfg.init == "birder"
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)  # +-2 absolute bounds: a normal at this std
        for token in (self.class_token, self.reg_tokens):
            if token is not None:
                nn.init.zeros_(token) if birder else nn.init.normal_(token, std=1e-6)
        if birder:
            fan_in = self.conv_proj.in_channels * self.patch_size ** 2
            nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
            nn.init.zeros_(self.conv_proj.bias)
        mlps = {id(m) for blk in self.encoder.block for m in blk.mlp.modules()} if birder else set()
        for module in self.encoder.modules():
            if isinstance(module, nn.Linear) and id(module) not in mlps:
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The stored embedding, resized on the fly (bicubic, fp32, no antialias) for other grids."""
        return resize_pos_embed(self.pos_embedding, self.num_prefix_tokens, self.grid, grid, antialias=False)

    def _tokens(
        self, x: torch.Tensor, masks: Optional[torch.Tensor], mask_token: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patchify, apply the iBOT mask, prepend [registers, class], add position embedding."""
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"input size {H}x{W} is not a multiple of patch size {self.patch_size}")
        grid = (H // self.patch_size, W // self.patch_size)
        patches = self.conv_proj(x).flatten(2).transpose(1, 2)  # (B, N, C)
        if masks is not None:
            if mask_token is None:
                raise ValueError("masks given without a mask_token")
            if masks.shape != patches.shape[:2]:
                raise ValueError(f"masks shape {tuple(masks.shape)} != (batch, patches) {tuple(patches.shape[:2])}")
            patches = torch.where(masks.unsqueeze(-1), mask_token.to(patches.dtype).view(1, 1, -1), patches)
        special = [self.class_token.expand(x.shape[0], -1, -1)]
        if self.reg_tokens is not None:
            special.insert(0, self.reg_tokens.expand(x.shape[0], -1, -1))
        tokens = torch.cat([*special, patches], dim=1)
        return tokens + self._pos_embed_for(grid), grid

    def forward_features(
        self, x: torch.Tensor, masks: Optional[torch.Tensor] = None, mask_token: Optional[torch.Tensor] = None
    ) -> BackboneOutput:
        """Final-normalized class, register and patch tokens; ``masks`` (B, N) bool selects patches
        whose embedding is replaced by ``mask_token`` (C,) before the position embedding (iBOT)."""
        return self.forward_features_list([x], [masks], mask_token)[0]

    def forward_features_list(self, xs: list[torch.Tensor], masks: list[Optional[torch.Tensor]],
                              mask_token: Optional[torch.Tensor] = None) -> list[BackboneOutput]:
        """``forward_features`` of several batches (e.g. global and local crops) in one pass of the blocks:
        the tokens of all of them are concatenated, and attention runs within each batch."""
        tokens = [self._tokens(x, m, mask_token)[0] for x, m in zip(xs, masks)]
        shapes = tuple((t.shape[0], t.shape[1]) for t in tokens)
        flat = torch.cat([t.flatten(0, 1) for t in tokens]) if len(tokens) > 1 else tokens[0].flatten(0, 1)
        flat = self.norm(self.encoder(flat, shapes))
        R = self.num_registers
        outs = []
        for part, (b, n) in zip(flat.split([b * n for b, n in shapes]), shapes):
            t = part.view(b, n, -1)
            outs.append(BackboneOutput(cls=t[:, R], registers=t[:, :R], patches=t[:, R + 1 :]))
        return outs

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The final-normalized class token, (B, dim): the image embedding."""
        return self.forward_features(x).cls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(x)

    def detection_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Patch tokens of the last block as a (B, dim, H/p, W/p) map, before the final norm (as birder)."""
        tokens, grid = self._tokens(x, None, None)
        B, N, C = tokens.shape
        patches = self.encoder(tokens.flatten(0, 1), ((B, N),)).view(B, N, C)[:, self.num_prefix_tokens :]
        return {"stage1": patches.transpose(1, 2).reshape(x.shape[0], self.embed_dim, *grid)}

    @torch.no_grad()
    def resize_pos_embed(self, image_size: int) -> None:
        """Permanently resize the stored position embedding to ``image_size`` (bicubic, antialias)."""
        if image_size % self.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch size {self.patch_size}")
        grid = (image_size // self.patch_size,) * 2
        resized = resize_pos_embed(self.pos_embedding, self.num_prefix_tokens, self.grid, grid, antialias=True)
        self.pos_embedding = nn.Parameter(resized.clone(), requires_grad=self.pos_embedding.requires_grad)
        self.grid = grid
        self.cfg = ViTConfig(**{**asdict(self.cfg), "image_size": image_size})

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay besides biases and norms (timm's convention): the tokens and the
        position embedding."""
        return {"class_token", "reg_tokens", "pos_embedding"}

    def layer_id(self, name: str) -> int:
        """Depth of parameter ``name`` for layer-wise lr decay: 0 the embeddings (patch projection, tokens, position
        embedding), i + 1 block i, depth + 1 the final norm."""
        if self.is_patch_embed(name) or name in self.no_weight_decay():
            return 0
        if name.startswith("encoder.block."):
            return int(name.split(".")[2]) + 1
        return self.cfg.depth + 1

    def is_patch_embed(self, name: str) -> bool:
        return name.startswith("conv_proj.")

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order: the units that sharding, compilation and layer decay work on."""
        return self.encoder.block

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.grad_checkpointing = enabled

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
