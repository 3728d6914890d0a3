"""An exclusive lock on a run directory for the life of a run, so two runs never train into one directory.

``fcntl.flock`` on ``RUN/.lock``: the operating system drops it when the process ends, however it ends, so a
killed run leaves no stale lock. The file records the holder's host and pid for the refusal message. (On NFS and
Lustre ``flock`` works when the filesystem is mounted with lock support, as cluster scratch usually is.)
"""

from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


_held: dict[Path, int] = {}  # lock file -> nesting depth in this process (a schedule stage locks around its run)


@contextmanager
def run_lock(lock_file: Path) -> Iterator[None]:
    """Hold ``lock_file`` exclusively; raise RunLockedError naming the directory and the holder otherwise."""
    key = lock_file.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            raise RunLockedError(f"{lock_file.parent} is in use by {holder}; wait for it to end or use another "
                                 "name/runs_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing drops the flock
