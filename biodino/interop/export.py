"""``biodino export``: backbones (teacher by default) and full training weights from the training state.

A backbone export is ``<preset>_<tag>_<step>.safetensors`` plus a JSON sidecar of the same name
(preset, resolution, patch size, embedding size, normalization, provenance); the sidecar's content is
also in the safetensors metadata, so the file alone describes itself. With ``fmt="birder"`` it is
``<preset>_<tag>_<step>.pt`` in birder's release layout instead (see ``birder_format``). Sources may also be
birder's own files: full DINOv2 training weights or a backbone release.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

import biodino
from biodino.models import VisionTransformer, ViTConfig
from biodino.ssl.dinov2 import student_backbone
from biodino.checkpoint import dcp, full_weights
from biodino.interop import birder as birder_format
from biodino.interop import timm as timm_format
from biodino.fs.atomic import atomic_write_text
from biodino.config.schema import TrainConfig
from biodino.config.recipe import config_from_dict
from biodino.checkpoint.run_dir import RunDir
from biodino.checkpoint.safe_load import CheckpointError, load_exactly, load_torch

BACKBONE_FORMAT = "biodino-backbone/1"
Format = Literal["biodino", "birder", "timm"]


@dataclass
class TrainingState:
    """Module-state tensors (``student.*``, ``teacher.*``, centers), the run's config, its step, its file."""

    weights: dict[str, torch.Tensor]
    cfg: TrainConfig
    step: int
    source: Path


def load_training_state(source: Path, preset: Optional[str] = None) -> TrainingState:
    """From a run directory (its newest checkpoint), a Lightning ``.ckpt`` file, a sharded checkpoint directory
    (any world size; consolidated here), a full-weights file, or a birder file (full DINOv2 training weights or a
    backbone release; ``preset`` names its architecture, else it is matched on the tensor shapes)."""
    if source.is_dir() and not dcp.is_dcp(source):
        newest = RunDir(source).newest_checkpoint()
        if newest is None:
            raise CheckpointError(f"no checkpoint in {source / 'checkpoints'}")
        source = newest
    if source.suffix == ".safetensors":
        tensors, meta = full_weights.read(source)
        weights = full_weights.module_keys(tensors)
        state = TrainingState(weights, config_from_dict(json.loads(meta["config"]), str(source)), int(meta["step"]),
                              source)
        return _check_preset(state, preset)
    if dcp.is_dcp(source):
        weights, ckpt = dcp.read_model_state(source)
    else:
        ckpt = load_torch(source)
        if birder_format.is_birder_checkpoint(ckpt):
            return TrainingState(*birder_format.training_state(ckpt, source, preset), source)
        weights = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    try:
        cfg = config_from_dict(dict(ckpt["hyper_parameters"]["config"]), str(source))
        state = TrainingState(dict(weights), cfg, int(ckpt["global_step"]), source)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{source} is not a biodino training checkpoint ({type(err).__name__}: {err})") from None
    return _check_preset(state, preset)


def _check_preset(state: TrainingState, preset: Optional[str]) -> TrainingState:
    """A biodino source records its preset: a different ``preset`` asked for is an error, not a conversion."""
    if preset is not None and preset != state.cfg.model.preset:
        raise CheckpointError(f"{state.source} holds preset {state.cfg.model.preset!r}, not {preset!r} "
                              "(a preset is named only for birder files, whose architecture is not recorded)")
    return state


def backbone_from_state(state: TrainingState, network: str = "teacher") -> VisionTransformer:
    """The ``network`` backbone of a training state, at the resolution it was trained at. Built on the meta
    device and then allocated, so no time goes into a random initialization that the load overwrites."""
    prefix = f"{network}.backbone."
    tensors = {k[len(prefix):]: v for k, v in state.weights.items() if k.startswith(prefix)}
    if not tensors:
        raise CheckpointError(f"{state.source} holds no {network} backbone")
    with torch.device("meta"):
        backbone = student_backbone(state.cfg)
    load_exactly(backbone.to_empty(device="cpu"), tensors, state.source,  # every parameter is overwritten
                 f"the {state.cfg.model.preset} backbone at {state.cfg.crops.global_size} px")
    return backbone


def export_backbone(state: TrainingState, out_dir: Path, network: str = "teacher",
                    resolution: Optional[int] = None, tag: Optional[str] = None, fmt: Format = "biodino",
                    name: Optional[str] = None) -> Path:
    """Write the backbone (position embedding resized to ``resolution`` if given): ours with its sidecar, or
    birder's release layout (``fmt="birder"``), named ``PRESET_TAG_STEP`` unless ``name`` is given."""
    backbone = backbone_from_state(state, network)
    if resolution is not None and resolution != backbone.image_size:
        backbone.resize_pos_embed(resolution)
    cfg = state.cfg
    provenance = {"source": str(state.source), "step": state.step, "run": cfg.name, "network": network,
                  "objective": cfg.objective.name, "biodino": biodino.__version__,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    stem = name or f"{cfg.model.preset}_{tag or cfg.name}_{state.step}"
    if fmt == "birder":
        return birder_format.save_backbone(backbone, out_dir / f"{stem}.pt", cfg.crops.normalize_mean,
                                           cfg.crops.normalize_std, {"preset": cfg.model.preset, **provenance})
    if fmt == "timm":
        return timm_format.save_backbone(backbone, out_dir / stem, cfg.crops.normalize_mean, cfg.crops.normalize_std,
                                         {"preset": cfg.model.preset, **provenance})
    if fmt != "biodino":
        raise ValueError(f"unknown export format {fmt!r}; use 'biodino', 'birder' or 'timm'")
    sidecar = {
        "format": BACKBONE_FORMAT, "preset": cfg.model.preset, "architecture": asdict(backbone.cfg),
        "resolution": backbone.image_size,
        "patch_size": backbone.patch_size, "embed_dim": backbone.embed_dim, "num_registers": backbone.num_registers,
        "normalization": {"mean": list(cfg.crops.normalize_mean), "std": list(cfg.crops.normalize_std)},
        "provenance": provenance,
    }
    path = out_dir / f"{stem}.safetensors"
    tensors = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
    full_weights.save_atomic(tensors, path, {"biodino": json.dumps(sidecar)})
    atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=1) + "\n")
    return path


def export_full(state: TrainingState, out: Path, fmt: Format = "biodino", stage: str = "") -> Path:
    """Full training weights (student, teacher, heads, centers): our safetensors with metadata, or birder's
    ``torch.save`` layout (``fmt="birder"``, DINOv2 only)."""
    if not any(k.startswith("student.") for k in state.weights):
        raise CheckpointError(f"{state.source} holds a backbone only, not full training weights")
    if fmt == "birder":
        return birder_format.save_full(state.weights, state.cfg, out, {"source": str(state.source), "step": state.step,
                                                                       "biodino": biodino.__version__})
    tensors = full_weights.weights_of(state.weights)
    return full_weights.save_atomic(tensors, out, full_weights.metadata_for(state.cfg, state.step, stage))


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
    try:
        arch = {**sidecar["architecture"], "drop_path_rate": 0.0, "grad_checkpointing": False}
        backbone = VisionTransformer(ViTConfig(**arch))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its metadata does not describe a backbone ({err})") from None
    load_exactly(backbone, tensors, path, f"the architecture its metadata describes ({sidecar.get('preset')})")
    return backbone.eval(), sidecar


def is_backbone_export(path: Path) -> bool:
    """A safetensors file carrying biodino's backbone sidecar in its metadata."""
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("biodino", "{}")).get("format") == BACKBONE_FORMAT
    except (SafetensorError, OSError, json.JSONDecodeError, AttributeError):
        return False


def load_encoder(source: Path, network: str = "teacher") -> tuple[VisionTransformer, dict[str, Any]]:
    """A backbone to embed with, and the resolution and normalization it expects: a backbone export as it is, or
    the ``network`` backbone of any training state ``load_training_state`` reads (run directory, checkpoint, full
    weights, birder file)."""
    if is_backbone_export(source):
        if network != "teacher":
            raise CheckpointError(f"{source} is a backbone export (one network); the {network} needs full training "
                                  "weights, a checkpoint or a run directory")
        return load_backbone(source)
    state = load_training_state(source)
    backbone = backbone_from_state(state, network).eval()
    crops = state.cfg.crops
    return backbone, {"resolution": backbone.image_size, "preset": state.cfg.model.preset,
                      "source": str(state.source), "step": state.step,
                      "normalization": {"mean": list(crops.normalize_mean), "std": list(crops.normalize_std)}}
