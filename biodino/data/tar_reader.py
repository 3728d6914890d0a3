"""Random access to the samples of a tar shard: member offsets read once from the headers, data by seek."""

from __future__ import annotations

import tarfile
from pathlib import Path


class TarShard:
    """Samples of one WebDataset shard in tar order, ``{ext: bytes}`` by index; a truncated tail is dropped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.truncated = False
        size = path.stat().st_size
        members: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    if m.offset_data + m.size > size:
                        self.truncated = True
                        break
                    key, _, ext = Path(m.name).name.partition(".")
                    members.setdefault(str(Path(m.name).parent / key), {})[ext] = (m.offset_data, m.size)
        except (tarfile.ReadError, EOFError, OSError):
            self.truncated = True
        self.keys = list(members)  # the samples' WebDataset keys (member path up to the first dot)
        self.samples = list(members.values())

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int, exts: tuple[str, ...]) -> bytes | None:
        """The bytes of the sample's first member whose extension is in ``exts`` (None if it has none)."""
        members = self.samples[index]
        ext = next((e for e in exts if e in members), None)
        if ext is None:
            return None
        offset, size = members[ext]
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(size)
