"""birder's checkpoint layout (birder 0.8.4, the framework that trained and published both seed models), read and
written, so that training can move between birder and biodino in both directions.

Two of birder's files are handled, both a ``torch.save`` dict of tensors and plain containers:

- full DINOv2 training weights, ``dino_v2_<net>_<tag>_<epoch>.pt`` as ``birder.scripts.train_dino_v2`` writes
  them: ``state`` with ``student.*`` and ``teacher.*`` (``backbone``, ``dino_head``, ``ibot_head`` when separate,
  ``mask_token`` of shape (1, 1, 1, dim)), ``dino_loss.center`` (1, K) and ``ibot_patch_loss.center`` (1, 1, K);
  plus ``birder_version``, ``task``, ``signature``, ``class_to_idx`` and ``rgb_stats``;
- a backbone release, ``<net>_<tag>.pt``: ``state`` (backbone only), ``task`` ("image_classification"),
  ``signature`` {"inputs": [{"data_shape": [0, 3, H, W]}], "outputs": [{"data_shape": [0, 0]}]} (0 classes: no
  classifier), ``class_to_idx`` {} and ``rgb_stats`` {"mean", "std"}.

Backbone and head keys are the same in both frameworks; the mask token and the iBOT center differ only in shape
(ours are (dim,) and (1, K)), and the centers are named after birder's losses. Nothing here runs pickled code:
files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from biodino.models import PRESETS, VisionTransformer, build_backbone
from biodino.config.schema import (CropsConfig, DinoConfig, HeadConfig, IbotConfig, ModelConfig, ObjectiveConfig,
                                  TrainConfig)
from biodino.fs.atomic import atomic_write
from biodino.checkpoint.full_weights import CENTERS, module_keys
from biodino.checkpoint.safe_load import CheckpointError, listed, load_torch

NETWORKS = ("student", "teacher")
# Buffers of birder's optional Sinkhorn queue (``--sinkhorn-queue-size``): recent teacher outputs, not weights.
QUEUE = re.compile(r"(dino_loss|ibot_patch_loss)\.sinkhorn_queue\.")
HEAD_MLP_SINGLE = re.compile(r"^((?:student|teacher)\.(?:dino|ibot)_head\.mlp)\.(weight|bias)$")
IMAGE_CLASSIFICATION = "image_classification"  # birder's Task of a backbone


# ---- reading ---------------------------------------------------------------------------------------------------

def is_birder_checkpoint(ckpt: Any) -> bool:
    """A birder file: a dict whose ``state`` is a dict of tensors and which has birder's ``signature``."""
    return isinstance(ckpt, dict) and isinstance(ckpt.get("state"), dict) and "signature" in ckpt


def is_full_state(ckpt: Any) -> bool:
    """birder's full training weights (student and teacher), as opposed to a backbone release."""
    return is_birder_checkpoint(ckpt) and any(k.startswith(("student.", "teacher.")) for k in ckpt["state"])


def module_weights(birder_state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """birder's full-state tensors under our module's keys and shapes; any key neither side knows is an error."""
    unknown = [k for k in birder_state
               if not k.startswith(("student.", "teacher.")) and k not in CENTERS.values() and not QUEUE.match(k)]
    if unknown:
        raise CheckpointError(f"{source}: keys of no DINOv2 training state: {listed(unknown)}")
    out: dict[str, torch.Tensor] = {}
    for key, value in birder_state.items():
        if QUEUE.match(key):
            continue  # a queue of past teacher outputs is rebuilt by training; not part of the weights
        key = HEAD_MLP_SINGLE.sub(r"\1.0.\2", key)  # a 1-layer head: birder's bare Linear, our Sequential's first
        if key.endswith(".mask_token"):
            value = value.reshape(value.shape[-1])  # (1, 1, 1, dim) -> (dim,)
        elif key in CENTERS.values():
            value = value.reshape(1, value.shape[-1])  # iBOT's (1, 1, K) and DINO's (1, K) -> (1, K)
        out[key] = value
    return module_keys(out)


def read_full_weights(path: Path) -> dict[str, torch.Tensor]:
    """A birder full-training-weights file as module-state tensors (what ``init.full_weights`` loads)."""
    ckpt = load_torch(path)
    if not is_full_state(ckpt):
        what = "a birder backbone release (no student/teacher)" if is_birder_checkpoint(ckpt) else "not a birder file"
        raise CheckpointError(f"{path} is {what}: init.full_weights needs full DINOv2 training weights "
                              "(birder's dino_v2_<net>_<tag>_<epoch>.pt or biodino's *_full.safetensors)")
    return module_weights(ckpt["state"], path)


def _network_backbone(weights: dict[str, torch.Tensor], network: str) -> dict[str, torch.Tensor]:
    prefix = f"{network}.backbone."
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def resolution_of(backbone: dict[str, torch.Tensor], source: Path) -> int:
    """The input size the position embedding is stored at: patch size times its (square) grid side."""
    try:
        tokens = backbone["pos_embedding"].shape[1]
        patch = backbone["conv_proj.weight"].shape[-1]
    except KeyError as err:
        raise CheckpointError(f"{source}: the backbone has no {err.args[0]}: not a ViT birder or biodino can share") \
            from None
    prefix = int("class_token" in backbone) + (backbone["reg_tokens"].shape[1] if "reg_tokens" in backbone else 0)
    side = int(round((tokens - prefix) ** 0.5))
    if side * side != tokens - prefix:
        raise CheckpointError(f"{source}: position embedding of {tokens} tokens ({prefix} special) "
                              "is not a square grid")
    return side * patch


def _preset_shapes(name: str, resolution: int, layer_scale: bool) -> Optional[dict[str, tuple[int, ...]]]:
    """A preset's backbone tensor shapes at ``resolution``, built on the meta device (no memory, no init cost)."""
    if resolution % PRESETS[name].patch_size:
        return None
    overrides: dict[str, Any] = {"image_size": resolution}
    if not layer_scale:
        overrides["layer_scale_init"] = None
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_backbone(name, **overrides).state_dict().items()}


def match_preset(backbone: dict[str, torch.Tensor], resolution: int, source: Path,
                 preset: Optional[str] = None) -> str:
    """The preset whose backbone has exactly these keys and shapes: ``preset`` if given (checked), else the one
    preset that fits; none or several is an error naming the candidates."""
    shapes = {k: tuple(v.shape) for k, v in backbone.items()}
    layer_scale = any(k.endswith("layer_scale_1.gamma") for k in backbone)
    if preset is not None:
        if preset not in PRESETS:
            raise CheckpointError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
        expected = _preset_shapes(preset, resolution, layer_scale)
        if expected != shapes:
            diff = sorted(k for k in set(shapes) | set(expected or {}) if (expected or {}).get(k) != shapes.get(k))
            raise CheckpointError(f"{source}: backbone does not fit preset {preset!r} at {resolution} px; "
                                  f"differing keys: {listed(diff)}")
        return preset
    fits = [name for name in PRESETS if _preset_shapes(name, resolution, layer_scale) == shapes]
    if len(fits) != 1:
        found = f"several presets fit ({', '.join(fits)})" if fits else "no preset fits its tensor shapes"
        raise CheckpointError(f"{source}: {found} at {resolution} px (dim {shapes['pos_embedding'][-1]}, "
                              f"{sum(k.endswith('norm1.weight') for k in shapes)} blocks); candidates: "
                              f"{', '.join(PRESETS)}; name one with --preset")
    return fits[0]


def _head_config(weights: dict[str, torch.Tensor], prefix: str) -> HeadConfig:
    """A head's sizes read off its tensors: prototypes and bottleneck from the last layer, depth and width
    from the MLP."""
    last = weights[f"{prefix}last_layer.parametrizations.weight.original1"]
    linears = sorted(int(m.group(1)) for k in weights if (m := re.match(re.escape(prefix) + r"mlp\.(\d+)\.weight$", k)))
    hidden = weights[f"{prefix}mlp.0.weight"].shape[0] if len(linears) > 1 else HeadConfig.hidden_dim
    return HeadConfig(num_prototypes=last.shape[0], hidden_dim=hidden, bottleneck_dim=last.shape[1],
                      nlayers=len(linears))


def _training_config(weights: dict[str, torch.Tensor], preset: str, resolution: int, rgb_stats: dict[str, Any],
                     name: str) -> TrainConfig:
    """What a birder file determines of a recipe: architecture (preset, LayerScale, heads), resolution and
    normalization; training hyperparameters are the schema's defaults (birder keeps them out of the file)."""
    layer_scale = any(k.endswith("layer_scale_1.gamma") for k in weights)
    separate = any(k.startswith("teacher.ibot_head.") for k in weights)
    has_heads = any(k.startswith("teacher.dino_head.") for k in weights)  # a backbone release has none
    dino = _head_config(weights, "teacher.dino_head.") if has_heads else HeadConfig()
    ibot = _head_config(weights, "teacher.ibot_head.") if separate else HeadConfig()
    try:
        mean, std = (tuple(float(v) for v in rgb_stats[k]) for k in ("mean", "std"))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{name}: rgb_stats must hold 'mean' and 'std', got {rgb_stats!r}") from None
    return TrainConfig(
        name=name,
        model=ModelConfig(preset=preset, layer_scale_init=None if layer_scale else 0.0),
        crops=CropsConfig(global_size=resolution, normalize_mean=mean, normalize_std=std),
        objective=ObjectiveConfig(dino=DinoConfig(head=dino), ibot=IbotConfig(separate_head=separate, head=ibot)),
    )


def epoch_of(path: Path) -> int:
    """birder's epoch from its file name (``..._<epoch>.pt``); 0 when the name has none."""
    match = re.search(r"_(\d+)$", path.stem)
    return int(match.group(1)) if match else 0


def training_state(ckpt: dict[str, Any], source: Path,
                   preset: Optional[str] = None) -> tuple[dict[str, torch.Tensor], TrainConfig, int]:
    """Module-state tensors, a config and a step (birder's epoch) from a loaded birder file; a backbone release
    becomes a teacher-only state. The preset is matched on the teacher backbone's shapes unless given."""
    if is_full_state(ckpt):
        weights = module_weights(ckpt["state"], source)
    else:
        weights = {f"teacher.backbone.{k}": v for k, v in ckpt["state"].items()}
    backbone = _network_backbone(weights, "teacher")
    resolution = resolution_of(backbone, source)
    preset = match_preset(backbone, resolution, source, preset)
    name = re.sub(r"^dino_v2_|_\d+$", "", source.stem) or "birder"  # dino_v2_<net>_<tag>_<epoch> -> <net>_<tag>
    return weights, _training_config(weights, preset, resolution, ckpt.get("rgb_stats", {}), name), epoch_of(source)


# ---- writing ---------------------------------------------------------------------------------------------------

def signature(resolution: int, channels: int = 3) -> dict[str, list[dict[str, list[int]]]]:
    """birder's signature of a backbone (``birder.net.base.get_signature(shape, num_outputs=0)``): batch
    dimension 0, no classes, so birder's loader builds the network without a classifier."""
    return {"inputs": [{"data_shape": [0, channels, resolution, resolution]}], "outputs": [{"data_shape": [0, 0]}]}


def vit_config(backbone: VisionTransformer) -> dict[str, Any]:
    """The architecture as birder's ViT config keys, stored in the file so that birder's ``load_model`` builds
    it under any ViT network name (it updates that name's registered config with this one)."""
    cfg = backbone.cfg
    return {"patch_size": cfg.patch_size, "num_layers": cfg.depth, "num_heads": cfg.num_heads,
            "hidden_dim": cfg.dim, "mlp_dim": cfg.mlp_dim, "num_reg_tokens": cfg.num_registers,
            "layer_scale_init_value": cfg.layer_scale_init, "norm_layer_eps": cfg.norm_eps}


def _save_atomic(obj: dict[str, Any], path: Path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_backbone(backbone: VisionTransformer, path: Path, mean: tuple[float, ...], std: tuple[float, ...],
                  provenance: dict[str, Any]) -> Path:
    """A backbone in birder's release layout, loadable by ``torch.load(weights_only=True)`` and by
    ``birder.common.fs_ops.load_model(device, <ViT name>, path=path, inference=True)``."""
    return _save_atomic({
        "state": {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()},
        "task": IMAGE_CLASSIFICATION,
        "signature": signature(backbone.image_size),
        "class_to_idx": {},
        "rgb_stats": {"mean": tuple(float(v) for v in mean), "std": tuple(float(v) for v in std)},
        "config": vit_config(backbone),
        "biodino": provenance,
    }, path)


def birder_state(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``module_weights``: module-state tensors under birder's full-state keys and shapes."""
    single = {k[:-len(".0.weight")] for k in weights  # 1-layer heads: our Sequential's Linear, birder's bare one
              if k.endswith("_head.mlp.0.weight") and k.replace(".0.weight", ".2.weight") not in weights}
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        head_mlp = key.rsplit(".", 2)[0]
        if head_mlp in single:
            key = f"{head_mlp}.{key.rsplit('.', 1)[1]}"
        if key in CENTERS:
            key = CENTERS[key]
            value = value.reshape(1, 1, -1) if key == "ibot_patch_loss.center" else value.reshape(1, -1)
        elif not key.startswith(("student.", "teacher.")):
            continue
        elif key.endswith(".mask_token"):
            value = value.reshape(1, 1, 1, -1)
        out[key] = value.detach().cpu().contiguous()
    return out


def save_full(weights: dict[str, torch.Tensor], cfg: TrainConfig, path: Path, provenance: dict[str, Any]) -> Path:
    """Full DINOv2 training weights in birder's layout (``dino_v2_<net>_<tag>_<epoch>.pt``): birder resumes
    from them with ``--resume-epoch`` (fresh optimizer: there is no ``_states.pt``)."""
    if cfg.objective.name != "dinov2":
        raise CheckpointError(f"birder's full-weights layout is written for DINOv2 only, not {cfg.objective.name!r}")
    size = cfg.crops.global_size
    return _save_atomic({
        "state": birder_state(weights),
        "task": "self_supervised_learning",
        "signature": {"inputs": [{"data_shape": [0, 3, size, size]}], "outputs": [{"data_shape": [0]}]},
        "class_to_idx": {},
        "rgb_stats": {"mean": tuple(cfg.crops.normalize_mean), "std": tuple(cfg.crops.normalize_std)},
        "biodino": {**provenance, "config": asdict(cfg)},
    }, path)

