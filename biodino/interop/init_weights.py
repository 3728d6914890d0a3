"""``init.full_weights``: a new run starts from full training weights, biodino's or birder's."""

from __future__ import annotations

from pathlib import Path

import torch

from biodino.checkpoint import full_weights
from biodino.checkpoint.safe_load import CheckpointError
from biodino.interop import birder


def read_module_weights(path: Path, preset: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Module-state tensors and metadata of a full-weights file: ours (``.safetensors``, checked to hold
    ``preset``) or birder's (any other name: ``dino_v2_<net>_<tag>_<epoch>.pt``, shapes checked on loading)."""
    if path.suffix != ".safetensors":
        return birder.read_full_weights(path), {"format": "birder", "preset": preset}
    tensors, metadata = full_weights.read(path)
    if metadata.get("preset") != preset:
        raise CheckpointError(f"{path} holds preset {metadata.get('preset')!r}, the recipe builds {preset!r}")
    return full_weights.module_keys(tensors), metadata


def load_full_weights(module: torch.nn.Module, path: Path) -> dict[str, str]:
    """Weights only, into a freshly built module (see ``full_weights.load_tensors``); returns the file's metadata."""
    state, metadata = read_module_weights(path, getattr(module, "cfg").model.preset)
    full_weights.load_tensors(module, state, path)
    return metadata
