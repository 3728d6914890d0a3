"""What ``biodino embed`` reads, as numbered parts: chunks of image files (folders, list files, single images)
and whole WebDataset shards (a shard index or a glob). A part is the unit of a rank's work and of resumption.

Labels: a folder whose images all sit in sub-folders labels each image with its first sub-folder's name; a list
file labels a line ``path<TAB>label``; a shard sample is labelled by a field of its JSON (``label_key``, dotted
for nested fields), a list value making the labels multi-label (trait sets).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from biodino.data.shard_index import Shard, ShardIndexError, resolve_shards
from biodino.data.sources import IMAGE_SUFFIXES, InputError, list_lines, walk_images

Label = Union[str, tuple[str, ...], None]
GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Part:
    """Image files with their labels (when known), or one shard whose samples carry theirs."""

    name: str
    files: tuple[Path, ...] = ()
    labels: tuple[Label, ...] = ()
    shard: Optional[Path] = None
    samples: int = 0  # the shard's sample count, or the number of files


@dataclass
class Plan:
    parts: list[Part] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # folders that could not be listed, and why

    @property
    def images(self) -> int:
        return sum(p.samples for p in self.parts)

    def digest(self) -> str:
        """Identifies the parts (their names, files, shards and labels): a rerun must plan the same ones."""
        doc = [[p.name, [str(f) for f in p.files], [str(lab) for lab in p.labels], str(p.shard or "")]
               for p in self.parts]
        return hashlib.sha256(json.dumps(doc).encode()).hexdigest()


def plan_parts(inputs: Sequence[str], part_size: int = 1024) -> Plan:
    """Parts of at most ``part_size`` files, in input order, then one part per shard; raises InputError naming a
    missing input, a malformed list line or a bad shard."""
    plan = Plan()
    files, labels, shards = _listed(inputs, plan.unreadable)
    for i in range(0, len(files), part_size):
        chunk = slice(i, i + part_size)
        plan.parts.append(Part(f"files-{i // part_size:06d}", tuple(files[chunk]), tuple(labels[chunk]),
                               samples=len(files[chunk])))
    for j, shard in enumerate(shards):
        plan.parts.append(Part(f"shard-{j:06d}", shard=shard.path, samples=shard.samples))
    return plan


def labelled_paths(inputs: Sequence[str], unreadable: Optional[list[tuple[Path, str]]] = None
                   ) -> tuple[list[Path], Optional[list[Label]]]:
    """The image files of file inputs (shards are not files) and their labels, None unless every one has one."""
    files, labels, _ = _listed(inputs, unreadable if unreadable is not None else [])
    return files, labels if all(lab is not None for lab in labels) and files else None


def _listed(inputs: Sequence[str], unreadable: list[tuple[Path, str]]) -> tuple[list[Path], list[Label], list[Shard]]:
    files: list[Path] = []
    labels: list[Label] = []
    shards: list[Shard] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found = walk_images(path, unreadable)
            files += found
            labels += _folder_labels(path, found)
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)
            labels.append(None)
        elif path.suffix in (".json", ".tar") or GLOB_CHARS & set(spec):
            shards += _shards(spec)
        elif path.is_file():
            listed = _read_labelled_list(path)
            files += [p for p, _ in listed]
            labels += [lab for _, lab in listed]
        else:
            raise InputError(f"input not found: {path}")
    return files, labels, shards


def _shards(spec: str) -> list[Shard]:
    try:
        return resolve_shards(spec)
    except ShardIndexError as err:
        raise InputError(str(err)) from None


def _folder_labels(root: Path, found: list[Path]) -> list[Label]:
    """Class sub-folder names when every image sits in one, else no labels."""
    if found and all(len(p.relative_to(root).parts) > 1 for p in found):
        return [p.relative_to(root).parts[0] for p in found]
    return [None] * len(found)


def _read_labelled_list(list_file: Path) -> list[tuple[Path, Label]]:
    """Lines ``path`` or ``path<TAB>label`` (``sources.list_lines``)."""
    return [(path, label or None) for _, path, label in list_lines(list_file)]


def label_of(meta: dict, label_key: str) -> Label:
    """The (dotted) field ``label_key`` of a sample's JSON: a string, or a tuple of strings for a list value;
    None when it is missing."""
    value: object = meta
    for part in label_key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    return None if value is None else str(value)
