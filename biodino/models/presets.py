"""Named backbone presets: the two seed-model architectures and tiny ones for tests and the demo."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from biodino.models.vit import ViTConfig, VisionTransformer

PRESETS: dict[str, ViTConfig] = {
    # SoViT-150M/14 with 4 registers: the Bio-DINO encoder (133,623,712 parameters at 224).
    "vit_reg4_so150m_p14_ls": ViTConfig(
        patch_size=14, dim=896, depth=18, num_heads=16, mlp_dim=2320, num_registers=4, image_size=224
    ),
    # ViT-B/16 with LayerScale: the Franca BIOSCAN-5M encoder (85,817,088 parameters at 224).
    "vit_b16_ls": ViTConfig(patch_size=16, dim=768, depth=12, num_heads=12, mlp_dim=3072, image_size=224),
    # Tiny presets: a training step in well under a second on CPU.
    "vit_tiny_p8": ViTConfig(patch_size=8, dim=96, depth=4, num_heads=3, mlp_dim=384, image_size=32),
    "vit_tiny_reg4_p14": ViTConfig(
        patch_size=14, dim=64, depth=2, num_heads=2, mlp_dim=160, num_registers=4, image_size=56
    ),
    "vit_tiny_p16": ViTConfig(patch_size=16, dim=64, depth=2, num_heads=2, mlp_dim=256, image_size=64),
}


def preset_config(name: str, **overrides: Any) -> ViTConfig:
    """The preset's config with field overrides (e.g. ``image_size=252``, ``drop_path_rate=0``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown backbone preset {name!r}; available: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def build_backbone(name: str, **overrides: Any) -> VisionTransformer:
    """Instantiate a preset backbone with freshly initialized weights."""
    return VisionTransformer(preset_config(name, **overrides))
