"""Checkpoint files written atomically with a SHA-256 checksum, and verified before use.

A checksum is kept because ``torch.load`` does not notice damaged bytes: a ``.ckpt`` file has its
``NAME.sha256`` beside it, a sharded checkpoint directory a ``SHA256SUMS`` inside (both ``sha256sum -c`` format).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from biodino.checkpoint import dcp
from biodino.checkpoint.safe_load import CheckpointError, load_torch
from biodino.fs.atomic import HashingWriter, atomic_write, atomic_write_text, sha256_of

SUMS_FILE = "SHA256SUMS"  # inside a sharded checkpoint directory


def sidecar(path: Path) -> Path:
    """The checksum file of a single-file checkpoint."""
    return path.with_name(path.name + ".sha256")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``.NAME.tmp`` beside the target, fsyncs, renames (Lightning's default stages the file in the system
    temp directory and moves it: a copy, not atomic, when that is another filesystem, as on most clusters).
    The checksum is computed while writing and its file renamed into place just before the checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        digest: list[str] = []

        def write(f) -> None:
            hashing = HashingWriter(f)
            torch.save(checkpoint, hashing)
            digest.append(hashing.sha256.hexdigest())

        atomic_write(path, write, lambda: atomic_write_text(sidecar(path), f"{digest[0]}  {path.name}\n"))

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        sidecar(Path(path)).unlink(missing_ok=True)


def write_sums(directory: Path) -> None:
    """``SHA256SUMS`` of every file in a sharded checkpoint directory (written before it is renamed into place)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != SUMS_FILE)
    lines = [f"{sha256_of(p)}  {p.relative_to(directory)}\n" for p in files]
    atomic_write_text(directory / SUMS_FILE, "".join(lines))


def _check_sums(sums: Path, root: Path) -> None:
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        target = root / name
        if not target.is_file():
            raise CheckpointError(f"{target} is missing")
        if sha256_of(target) != digest:
            raise CheckpointError(f"{target} does not match its checksum (damaged or truncated)")


def verify(path: Path) -> None:
    """Raise CheckpointError naming what is wrong with a checkpoint file or directory. With a checksum, every byte
    is checked; a checkpoint written without one (older biodino) must at least load."""
    if path.is_dir():
        if (path / SUMS_FILE).is_file():
            return _check_sums(path / SUMS_FILE, path)
        dcp.SafeReader(path).read_metadata()
        load_torch(path / dcp.META_FILE)
        return
    if sidecar(path).is_file():
        return _check_sums(sidecar(path), path.parent)
    load_torch(path)


def remove_partial(checkpoints: Path) -> None:
    """Temporary files and directories of interrupted saves, and checksums whose checkpoint never appeared."""
    for tmp in checkpoints.glob(".*.tmp"):
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    for sums in checkpoints.glob("*.ckpt.sha256"):
        if not sums.with_suffix("").exists():
            sums.unlink()
