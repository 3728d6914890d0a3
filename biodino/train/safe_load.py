"""Loading checkpoints without running pickled code: safetensors, or ``torch.load(weights_only=True)``."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, unreadable, needs pickled code, wrong content); names the path."""


def load_torch(path: Path) -> dict[str, Any]:
    """A ``torch.save`` file restricted to tensors and primitive containers; anything else is refused."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} needs pickled code to load; refusing it (only tensors and plain containers are loaded): "
            f"{str(err).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {str(err).splitlines()[0]}") from None
