"""Atomic file writes: a hidden temporary file beside the target, fsynced, renamed over it, the directory fsynced.

A kill leaves either the old file or the complete new one; a failure (a full disk above all) removes the partial
file and, for a full disk, raises ``DiskFullError`` naming the target. Files get the mode the user's umask gives
(safetensors and ``tempfile`` would otherwise write 0600, unreadable by the group on a shared cluster).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional


class DiskFullError(OSError):
    """No space left on the device holding ``path``; the partial file was removed."""

    def __init__(self, path: Path) -> None:
        super().__init__(errno.ENOSPC, "no space left on device", str(path))
        self.path = path

    def __str__(self) -> str:
        return f"no space left on device: {self.path}"


FULL_BELOW = 1 << 20  # free bytes under which a failed write is taken for a full disk


def is_disk_full(err: BaseException, directory: Optional[Path] = None) -> bool:
    """Whether ``err`` or anything in its chain is ENOSPC (torch's writer wraps it in a RuntimeError), or, when
    the chain lost it (torch's distributed checkpoint re-raises only the ranks' tracebacks as text), whether
    ``directory``'s filesystem has under 1 MiB free right after the failure."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    if directory is None:
        return False
    try:
        return shutil.disk_usage(directory).free < FULL_BELOW
    except OSError:
        return False


def umask_mode(base: int = 0o666) -> int:
    """``base`` as the process umask restricts it: what ``open()`` would have created."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def temporary_name(path: Path) -> Path:
    """The hidden name a write of ``path`` goes to first (``.NAME.tmp``); ``remove_partial`` clears leftovers."""
    return path.with_name(f".{path.name}.tmp")


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def failing_cleanly(path: Path, partial: Path) -> Iterator[None]:
    """Remove ``partial`` on any failure; a full disk becomes ``DiskFullError(path)``."""
    try:
        yield
    except BaseException as err:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        if is_disk_full(err, path.parent):
            raise DiskFullError(path) from None
        raise


def atomic_write(path: Path, write: Callable[[BinaryIO], None],
                 before_rename: Optional[Callable[[], None]] = None) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then make it ``path`` atomically
    (``before_rename()`` runs once the data is durable, e.g. to write its checksum first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    with failing_cleanly(path, tmp):
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_file(path: Path, write_to: Callable[[Path], None]) -> Path:
    """For writers that take a file name (safetensors): ``write_to(tmp)``, then rename as above."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    with failing_cleanly(path, tmp):
        write_to(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


class HashingWriter:
    """A binary file wrapper that hashes (SHA-256) everything written through it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
