"""``biodino export``: backbones (teacher by default) and full training weights from the training state.

A backbone export is ``<preset>_<tag>_<step>.safetensors`` plus a JSON sidecar of the same name
(preset, resolution, patch size, embedding size, normalization, provenance); the sidecar's content is
also in the safetensors metadata, so the file alone describes itself.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

import biodino
from biodino.models import VisionTransformer, ViTConfig
from biodino.ssl.dinov2 import student_backbone
from biodino.train import dcp, full_weights
from biodino.train.config import TrainConfig
from biodino.train.recipe import config_from_dict
from biodino.train.run_dir import RunDir
from biodino.train.safe_load import CheckpointError, load_torch

BACKBONE_FORMAT = "biodino-backbone/1"


@dataclass
class TrainingState:
    """Module-state tensors (``student.*``, ``teacher.*``, centers), the run's config, its step, its file."""

    weights: dict[str, torch.Tensor]
    cfg: TrainConfig
    step: int
    source: Path


def load_training_state(source: Path) -> TrainingState:
    """From a run directory (its newest checkpoint), a Lightning ``.ckpt`` file, a sharded checkpoint directory
    (any world size; consolidated here) or a full-weights file."""
    if source.is_dir() and not dcp.is_dcp(source):
        newest = RunDir(source).newest_checkpoint()
        if newest is None:
            raise CheckpointError(f"no checkpoint in {source / 'checkpoints'}")
        source = newest
    if source.suffix == ".safetensors":
        tensors, meta = full_weights.read(source)
        weights = full_weights.module_keys(tensors)
        return TrainingState(weights, config_from_dict(json.loads(meta["config"]), str(source)), int(meta["step"]),
                             source)
    if dcp.is_dcp(source):
        weights, ckpt = dcp.read_model_state(source)
    else:
        ckpt = load_torch(source)
        weights = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    try:
        cfg = config_from_dict(dict(ckpt["hyper_parameters"]["config"]), str(source))
        return TrainingState(dict(weights), cfg, int(ckpt["global_step"]), source)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{source} is not a biodino training checkpoint ({type(err).__name__}: {err})") from None


def backbone_from_state(state: TrainingState, network: str = "teacher") -> VisionTransformer:
    """The ``network`` backbone of a training state, at the resolution it was trained at."""
    prefix = f"{network}.backbone."
    backbone = student_backbone(state.cfg)
    backbone.load_state_dict({k[len(prefix):]: v for k, v in state.weights.items() if k.startswith(prefix)})
    return backbone


def export_backbone(state: TrainingState, out_dir: Path, network: str = "teacher",
                    resolution: Optional[int] = None, tag: Optional[str] = None) -> Path:
    """Write the backbone (position embedding resized to ``resolution`` if given) and its sidecar."""
    backbone = backbone_from_state(state, network)
    if resolution is not None and resolution != backbone.image_size:
        backbone.resize_pos_embed(resolution)
    cfg = state.cfg
    sidecar = {
        "format": BACKBONE_FORMAT, "preset": cfg.model.preset, "architecture": asdict(backbone.cfg),
        "resolution": backbone.image_size,
        "patch_size": backbone.patch_size, "embed_dim": backbone.embed_dim, "num_registers": backbone.num_registers,
        "normalization": {"mean": list(cfg.crops.normalize_mean), "std": list(cfg.crops.normalize_std)},
        "provenance": {"source": str(state.source), "step": state.step, "run": cfg.name, "network": network,
                       "objective": cfg.objective.name, "biodino": biodino.__version__,
                       "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    path = out_dir / f"{cfg.model.preset}_{tag or cfg.name}_{state.step}.safetensors"
    tensors = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
    full_weights.save_atomic(tensors, path, {"biodino": json.dumps(sidecar)})
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=1) + "\n")
    return path


def export_full(state: TrainingState, out: Path) -> Path:
    """Full training weights (student, teacher, heads, centers) with their metadata."""
    tensors = full_weights.weights_of(state.weights)
    return full_weights.save_atomic(tensors, out, full_weights.metadata_for(state.cfg, state.step))


def load_backbone(path: Path) -> tuple[VisionTransformer, dict[str, Any]]:
    """An exported backbone, built from its self-description and loaded strictly; safetensors only."""
    if not path.is_file():
        raise CheckpointError(f"backbone not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            sidecar = json.loads((f.metadata() or {}).get("biodino", "{}"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not a biodino backbone export: {err}") from None
    if sidecar.get("format") != BACKBONE_FORMAT:
        raise CheckpointError(f"{path} is not a biodino backbone export (no {BACKBONE_FORMAT} metadata)")
    arch = {**sidecar["architecture"], "drop_path_rate": 0.0, "grad_checkpointing": False}
    backbone = VisionTransformer(ViTConfig(**arch))
    backbone.load_state_dict(tensors)
    return backbone.eval(), sidecar
