"""Backbones: one ViT with registers and LayerScale, and its named presets."""

from biodino.models.presets import PRESETS, build_backbone, preset_config
from biodino.models.vit import BackboneOutput, ViTConfig, VisionTransformer

__all__ = ["PRESETS", "BackboneOutput", "ViTConfig", "VisionTransformer", "build_backbone", "preset_config"]
