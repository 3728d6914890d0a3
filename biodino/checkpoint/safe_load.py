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
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):  # not a pickle at all: text, an image, random bytes
            raise CheckpointError(f"{path} is not a torch checkpoint ({str(err).splitlines()[0]})") from None
        raise CheckpointError(
            f"{path} needs pickled code to load; refusing it (only tensors and plain containers are loaded): "
            f"{_first_reason(err)}") from None
    except Exception as err:  # torch's reader fails on foreign bytes in many ways (EOF, IndexError, zip errors)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is not a torch checkpoint ({reason})") from None


def _first_reason(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return next((line.strip() for line in lines if "Unsupported global" in line), lines[0] if lines else "")


def listed(keys: list[str], limit: int = 8) -> str:
    """Keys for an error message: the first ``limit``, and how many there are in all."""
    shown = ", ".join(keys[:limit]) or "none"
    return f"{shown} ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_exactly(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path, what: str) -> None:
    """Load ``tensors`` strictly, after checking names and shapes so that a mismatch is a CheckpointError naming
    the file and the first mismatching key, not a traceback listing them all."""
    expected = module.state_dict()
    shapes = [k for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if shapes:
        k = shapes[0]
        raise CheckpointError(f"{source} does not fit {what}: {k} has shape {tuple(tensors[k].shape)}, the model's is "
                              f"{tuple(expected[k].shape)} ({len(shapes)} mismatching tensors)")
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit {what}: missing {listed(missing)}; "
                              f"unexpected {listed(unexpected)}")
    module.load_state_dict(tensors)
