"""A rank's sample stream as a pure function of (seed, rank, position).

The stream is a sequence of blocks. Block ``b`` draws ``shards_per_block`` shards (with replacement,
weighted by sample count, from a generator seeded by (seed, rank, b)) and a permutation of their
samples. Position ``p`` therefore names one sample without reading any data, so resuming needs only
the number of samples consumed, any worker can produce any batch, and a shard count smaller than
ranks x workers simply means shards are visited by several streams.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from biodino.data.shard_index import Shard

# Domains of the seed sequences [seed, rank, domain, index], so the draws of different purposes never coincide.
SHARD_DRAW, SAMPLE_AUGMENT, BATCH_MASKS, BATCH_PHOTOMETRIC, BATCH_MODEL = 0, 1, 2, 3, 4


def derived_seed(*key: int) -> int:
    """A 63-bit seed for one purpose, from integers such as (seed, rank, domain, index)."""
    return int(np.random.SeedSequence(list(key)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class Block:
    shard_ids: tuple[int, ...]
    order: np.ndarray  # permutation over the concatenated samples of ``shard_ids``
    offsets: tuple[int, ...]  # start of each chosen shard in the concatenation


class SampleStream:
    """Maps a position of rank ``rank``'s infinite stream to (shard id, sample index within the shard)."""

    def __init__(self, shards: list[Shard], seed: int, rank: int, shards_per_block: int = 4) -> None:
        self.counts = np.array([s.samples for s in shards], dtype=np.int64)
        self.weights = self.counts / self.counts.sum()
        self.seed, self.rank, self.per_block = seed, rank, shards_per_block
        self._starts = [0]  # start position of each block computed so far
        self.block = lru_cache(maxsize=8)(self._block)

    def _draw(self, b: int) -> tuple[np.random.Generator, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.rank, SHARD_DRAW, b])
        return rng, rng.choice(len(self.counts), size=self.per_block, p=self.weights)

    def _block(self, b: int) -> Block:
        rng, ids = self._draw(b)
        sizes = self.counts[ids]
        order = rng.permutation(int(sizes.sum()))
        return Block(tuple(int(i) for i in ids), order, tuple(int(o) for o in np.cumsum(sizes) - sizes))

    def _block_of(self, position: int) -> int:
        while self._starts[-1] <= position:  # block sizes need only the shard draw, not the permutation
            _, ids = self._draw(len(self._starts) - 1)
            self._starts.append(self._starts[-1] + int(self.counts[ids].sum()))
        return bisect.bisect_right(self._starts, position) - 1

    def locate(self, position: int) -> tuple[int, int]:
        """(shard id, sample index in that shard) of the sample at ``position``."""
        b = self._block_of(position)
        block = self.block(b)
        k = int(block.order[position - self._starts[b]])
        slot = bisect.bisect_right(block.offsets, k) - 1
        return block.shard_ids[slot], k - block.offsets[slot]
