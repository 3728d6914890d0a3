"""timm's hub layout for a backbone: a folder with ``model.safetensors`` and ``config.json``, loadable by timm's own
``VisionTransformer`` without any biodino code.

``config.json`` names a plain timm ViT entry (``architecture``) and, in ``model_args``, every argument that shapes
the network (patch size, width, depth, heads, MLP ratio, registers, LayerScale, class-token pooling, input size),
so the entry's own defaults never change what is built; ``num_classes`` is 0 (no classifier: timm's output is the
pre-logits class token) and ``pretrained_cfg`` holds the input size and normalization. Either of::

    model = timm.create_model(cfg["architecture"], num_classes=0, **cfg["model_args"])
    model.load_state_dict(safetensors.torch.load_file(folder / "model.safetensors"))  # strict
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)  # where timm has local-dir: (1.0.31 does)

gives a model whose ``model(x)`` is biodino's ``embedding(x)`` and whose last ``forward_intermediates`` map is
biodino's ``detection_features(x)``. The network is built for the exported resolution (``--resolution``); pass
``dynamic_img_size=True`` to ``create_model`` for other sizes (timm then resizes the position embedding itself,
with antialiasing, so results differ slightly from biodino's on-the-fly resize).

Keys map one to one. The one layout difference is the token order: biodino (like birder) orders
[registers, class, patches], timm [class, registers, patches]. Both add a learned position embedding to every
token, prefix tokens included (timm with ``no_embed_class=False``), and attention does not depend on token order,
so reordering the prefix rows of the position embedding gives the same network exactly.

timm is not a dependency: nothing here imports it (it is in the ``dev`` extra, for the tests).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from biodino.models import VisionTransformer
from biodino.models.vit import LayerScale
from biodino.fs.atomic import atomic_write_text
from biodino.checkpoint.full_weights import save_atomic
from biodino.checkpoint.safe_load import CheckpointError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TIMM_NORM_EPS = 1e-6  # timm's default LayerNorm eps: config.json cannot name another
# The timm entries named in ``architecture``: plain VisionTransformer factories. ``model_args`` overrides every
# argument they set, so the name picks the factory (and the family a reader recognizes), never a shape.
ARCH_REGISTERS = "vit_base_patch14_reg4_dinov2"
ARCH_PLAIN = "vit_base_patch16_224"

# biodino key -> timm key: the stem and final norm, and each block's tensors under ``encoder.block.<i>.``
# (``blocks.<i>.`` in timm); any other key is an error.
STEM = {"conv_proj.weight": "patch_embed.proj.weight", "conv_proj.bias": "patch_embed.proj.bias",
        "class_token": "cls_token", "reg_tokens": "reg_token", "pos_embedding": "pos_embed",
        "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
BLOCK = {"layer_scale_1.gamma": "ls1.gamma", "layer_scale_2.gamma": "ls2.gamma",
         # torchvision's MLP is Linear (0), GELU, Dropout, Linear (3), Dropout; timm's Mlp names them fc1, fc2
         **{f"{a}.{t}": f"{b}.{t}" for a, b in [("norm1", "norm1"), ("attn.qkv", "attn.qkv"),
                                                 ("attn.proj", "attn.proj"), ("norm2", "norm2"),
                                                 ("mlp.0", "mlp.fc1"), ("mlp.3", "mlp.fc2")]
            for t in ("weight", "bias")}}
_IN_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")


def timm_key(key: str) -> str:
    """The timm name of a biodino backbone tensor."""
    if key in STEM:
        return STEM[key]
    match = _IN_BLOCK.fullmatch(key)
    if match and match.group(2) in BLOCK:
        return f"blocks.{match.group(1)}.{BLOCK[match.group(2)]}"
    raise ValueError(f"backbone tensor {key!r} has no counterpart in timm's VisionTransformer")


def prefix_first_class(pos_embed: torch.Tensor, num_registers: int) -> torch.Tensor:
    """Position-embedding rows from biodino's [registers, class, patches] to timm's [class, registers, patches]."""
    if not num_registers:
        return pos_embed
    R = num_registers
    return torch.cat([pos_embed[:, R:R + 1], pos_embed[:, :R], pos_embed[:, R + 1:]], dim=1)


def timm_state_dict(backbone: VisionTransformer) -> dict[str, torch.Tensor]:
    """The backbone's tensors under timm's keys and token order, contiguous on the CPU."""
    out: dict[str, torch.Tensor] = {}
    for key, value in backbone.state_dict().items():
        value = value.detach()
        if key == "pos_embedding":
            value = prefix_first_class(value, backbone.num_registers)
        out[timm_key(key)] = value.cpu().contiguous()
    return out


def mlp_ratio(dim: int, mlp_dim: int) -> float:
    """A float ``r`` with ``int(dim * r) == mlp_dim``, as timm sizes the MLP's hidden layer (e.g. SoViT-150M's
    2320 / 896); the next float up when the quotient rounds below."""
    ratio = mlp_dim / dim
    for candidate in (ratio, math.nextafter(ratio, math.inf)):
        if int(dim * candidate) == mlp_dim:
            return candidate
    raise CheckpointError(f"MLP width {mlp_dim} of a {dim}-wide ViT is not int({dim} * mlp_ratio) for any float")


def model_args(backbone: VisionTransformer) -> dict[str, Any]:
    """timm ``VisionTransformer`` arguments that rebuild this backbone exactly (JSON-serializable)."""
    cfg = backbone.cfg
    if cfg.norm_eps != TIMM_NORM_EPS:
        raise CheckpointError(f"timm's config.json cannot express LayerNorm eps {cfg.norm_eps} "
                              f"(timm's is {TIMM_NORM_EPS})")
    layer_scale = isinstance(backbone.blocks[0].layer_scale_1, LayerScale)
    init_values = (cfg.layer_scale_init or 1e-5) if layer_scale else None  # timm enables LayerScale on a truthy value
    return {
        "img_size": backbone.image_size,
        "patch_size": cfg.patch_size,
        "embed_dim": cfg.dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": mlp_ratio(cfg.dim, cfg.mlp_dim),
        "qkv_bias": True,
        "init_values": init_values,
        "class_token": True,
        "reg_tokens": cfg.num_registers,
        "no_embed_class": False,  # the position embedding covers the class and register tokens too
        "global_pool": "token",  # the final-normalized class token is the embedding
        "fc_norm": False,
    }


def timm_config(backbone: VisionTransformer, mean: tuple[float, ...], std: tuple[float, ...],
                provenance: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of timm's hub layout; ``provenance`` goes under a ``biodino`` key timm ignores."""
    size = backbone.image_size
    return {
        "architecture": ARCH_REGISTERS if backbone.num_registers else ARCH_PLAIN,
        "num_classes": 0,
        "num_features": backbone.embed_dim,
        "global_pool": "token",
        "model_args": model_args(backbone),
        "pretrained_cfg": {
            "tag": "biodino",
            "custom_load": False,
            "input_size": [3, size, size],
            "fixed_input_size": True,
            # biodino embed's preprocessing: shorter side resized (bicubic), center crop of the full size
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "description": f"biodino export of {provenance.get('preset', 'a ViT backbone')}",
        },
        "biodino": provenance,
    }


def save_backbone(backbone: VisionTransformer, folder: Path, mean: tuple[float, ...], std: tuple[float, ...],
                  provenance: dict[str, Any]) -> Path:
    """Write ``folder/model.safetensors`` then ``folder/config.json``, each atomically; a config already there
    goes first, so a folder with a config always holds the complete weights it describes. Returns ``folder``."""
    config = timm_config(backbone, mean, std, provenance)  # before writing: an inexpressible backbone writes nothing
    tensors = timm_state_dict(backbone)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).unlink(missing_ok=True)  # re-export: never an old config beside new weights
    save_atomic(tensors, folder / WEIGHTS, {"format": "pt", "biodino": json.dumps(provenance)})
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=2) + "\n")
    return folder
