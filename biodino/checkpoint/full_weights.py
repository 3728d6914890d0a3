"""Full training weights: student, teacher (backbones, heads, mask tokens) and loss centers in one
safetensors file with metadata. What a release publishes for continued self-supervised training."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from biodino.models.pos_embed import resize_pos_embed
from biodino.fs.atomic import atomic_write_file
from biodino.config.schema import TrainConfig
from biodino.checkpoint.safe_load import CheckpointError, listed

FORMAT = "biodino-full/1"
# Module attribute -> released name (birder's layout names the centers after their losses).
CENTERS = {"dino_center.center": "dino_loss.center", "ibot_center.center": "ibot_patch_loss.center"}


def weights_of(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released tensors from a DINOv2/Franca module state dict."""
    out = {k: v for k, v in state_dict.items() if k.startswith(("student.", "teacher."))}
    out.update({CENTERS[k]: v for k, v in state_dict.items() if k in CENTERS})
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def module_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``weights_of``'s renaming: released center names back to module state-dict keys."""
    released = {r: m for m, r in CENTERS.items()}
    return {released.get(k, k): v for k, v in tensors.items()}


def metadata_for(cfg: TrainConfig, step: int, stage: str = "") -> dict[str, str]:
    return {"format": FORMAT, "config": json.dumps(asdict(cfg)), "step": str(step), "stage": stage,
            "preset": cfg.model.preset, "resolution": str(cfg.crops.global_size),
            "normalization": json.dumps({"mean": cfg.crops.normalize_mean, "std": cfg.crops.normalize_std})}


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """safetensors written atomically, readable as the umask says (see ``atomic``)."""
    return atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a full-weights file, checked for its format."""
    if not path.is_file():
        raise CheckpointError(f"full weights not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a safetensors file: {err}") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not biodino full weights (format {metadata.get('format')!r})")
    return tensors, metadata


def load_tensors(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Module-state tensors read from ``path``, weights only, into a freshly built module; position embeddings
    resized to the module's grid. Every student/teacher tensor and center must be there, and nothing else."""
    try:
        for net in ("student", "teacher"):
            backbone = getattr(module, net).backbone
            key = f"{net}.backbone.pos_embedding"
            if key in state:
                old_grid = int(round((state[key].shape[1] - backbone.num_prefix_tokens) ** 0.5))
                state[key] = resize_pos_embed(state[key], backbone.num_prefix_tokens, (old_grid,) * 2,
                                              backbone.grid, antialias=True)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path} does not fit the recipe's model: {str(err).splitlines()[0]}") from None
    expected = module.state_dict()
    wrong = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise CheckpointError(f"{path} does not fit the recipe's model: {wrong[0]} has shape "
                              f"{tuple(state[wrong[0]].shape)}, the model's is {tuple(expected[wrong[0]].shape)} "
                              f"({len(wrong)} mismatching tensors)")
    unused_centers = [k for k in CENTERS if k in state and k not in expected]  # Franca files of earlier versions
    state = {k: v for k, v in state.items() if k not in unused_centers}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith(("student.", "teacher.")) or k in CENTERS]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the recipe's model: missing {listed(missing)}; "
                              f"unexpected {listed(unexpected)}")

