"""Reading torch distributed checkpoints (DCP directories) without running pickled code.

DCP's own reader unpickles its ``.metadata`` file with plain ``pickle`` and its non-tensor entries with
``torch.load(weights_only=False)``. Here the metadata unpickler accepts only DCP's metadata classes, torch
dtypes and sizes, and the entries are read with ``weights_only=True``; anything else raises CheckpointError.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed.checkpoint as dcp
from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME as META_FILE
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from biodino.checkpoint.safe_load import CheckpointError, load_torch

MODEL_KEY = "state_dict"  # Lightning's names for the model and the i-th optimizer inside a DCP save
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath"},
}


def is_dcp(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = name in _ALLOWED.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                          torch.dtype))
        if not allowed:
            raise CheckpointError(f"distributed checkpoint metadata refers to {module}.{name}, which is not a "
                                  "checkpoint metadata type; refusing to run pickled code")
        return super().find_class(module, name)


class SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, AttributeError) as err:
            raise CheckpointError(f"{path}: unreadable distributed checkpoint metadata ({err})") from err
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not distributed checkpoint metadata")
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """Non-tensor entries (optimizer hyper-parameters) are read with ``weights_only=True``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _load(state: dict[str, Any], path: Path, no_dist: bool = False) -> None:
    dcp.load(state, storage_reader=SafeReader(path), planner=SafePlanner(), no_dist=no_dist)


def load_into(path: Path, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    """Load model and optimizer shards from ``path`` at this run's world size (DCP reshards); return the rest
    of Lightning's checkpoint (loops, callbacks, hyper-parameters) from its ``meta.pt``."""
    model_state = {MODEL_KEY: get_model_state_dict(model)}
    _load(model_state, path)
    set_model_state_dict(model, model_state[MODEL_KEY])
    for i, optimizer in enumerate(optimizers):
        key = f"optimizer_{i}"
        optim_state = {key: get_optimizer_state_dict(model, optimizer)}
        _load(optim_state, path)
        set_optimizer_state_dict(model, optimizer, optim_state[key])
    return load_torch(path / META_FILE)


def read_model_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The whole (unsharded) model state dict and ``meta.pt``, in one process: what export needs."""
    metadata = SafeReader(path).read_metadata()
    prefix = MODEL_KEY + "."
    tensors = {key[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype)
               for key, m in metadata.state_dict_metadata.items()
               if key.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    state = {MODEL_KEY: tensors}
    _load(state, path, no_dist=True)
    return state[MODEL_KEY], load_torch(path / META_FILE)
