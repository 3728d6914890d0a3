"""Cost of one ``Photometric`` call at the Bio-DINO sizes, counted at the dispatcher: kernels, memory traffic,
host synchronizations and host-to-device copies.

The budget is the issue's: at most a fifth of the kernels and a quarter of the memory traffic of the first
implementation, which this census measures at 688 kernels and 36.3 GiB (the issue: ~688 / ~36 GiB).

The full-size census runs on the meta device: the same aten ops reach the dispatcher as on a real device, with their
true shapes, but nothing is computed, so it takes a fraction of a second and its byte count needs no scaling. A
second census runs the real computation on the CPU at a small batch: no host copies, no syncs, and the same number
of kernels (the count does not depend on the batch). Both count the second call: the first one makes the cached
constants.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from biodino.config.schema import CropsConfig
from biodino.data.photometric import Photometric

BATCH = 48  # images per micro-batch: 2 global crops (224 px) and 8 local crops (98 px) each
MAX_KERNELS = 688 // 5  # the figures for the first implementation, over the required factors
MAX_BYTES = 36 * 2**30 // 4

aten = torch.ops.aten
# Ops whose output depends on device data in size or is read by the host: each one waits for the device.
SYNC_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default,
            aten.nonzero.default, aten.masked_select.default, aten.repeat_interleave.Tensor, aten.unique_dim.default,
            aten._unique2.default}
METADATA_OPS = {aten._unsafe_view.default}  # a view the schema does not declare as one


def _is_view(func: torch._ops.OpOverload) -> bool:
    """Whether the op only makes a view: an output aliases an input that it does not write (not in-place, not out=)."""
    return func in METADATA_OPS or any(r.alias_info is not None and not r.alias_info.is_write
                                       for r in func._schema.returns)


def _tensors(tree: object) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class Census(TorchDispatchMode):
    """Counts the aten ops of a region: kernels (ops that are not views), the bytes they read and write (the sizes
    of their tensor inputs and outputs; an in-place op reads and writes its input), syncs and host copies."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = self.bytes = self.syncs = self.host_copies = 0
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        if func in SYNC_OPS or (func.overloadpacket in (aten.index, aten.index_put, aten.index_put_)
                                and any(t.dtype == torch.bool for t in _tensors(args[1]))):  # boolean masks
            self.syncs += 1
        if func is aten.lift_fresh.default or (func.overloadpacket in (aten._to_copy, aten.copy_)
                                               and len({t.device for t in inputs + _tensors(out)}) > 1):
            self.host_copies += 1  # torch.tensor(data) or a copy between devices
        if not _is_view(func):
            self.kernels += 1
            self.bytes += sum(t.numel() * t.element_size() for t in inputs + _tensors(out))
            self.ops[str(func)] += 1
        return out


def _census(batch: int, device: str) -> Census:
    """The census of the second call on random uint8 crops of ``batch`` images on ``device``."""
    global_crops = torch.randint(0, 256, (2 * batch, 3, 224, 224), dtype=torch.uint8, device=device)
    local_crops = torch.randint(0, 256, (8 * batch, 3, 98, 98), dtype=torch.uint8, device=device)
    aug = Photometric(CropsConfig())
    aug(global_crops, local_crops, torch.Generator().manual_seed(0))
    with Census() as census:
        aug(global_crops, local_crops, torch.Generator().manual_seed(1))
    return census


def test_call_cost_at_bio_dino_sizes() -> None:
    census = _census(BATCH, "meta")
    assert census.kernels <= MAX_KERNELS, (census.kernels, census.ops)
    assert census.bytes <= MAX_BYTES, f"{census.bytes / 2**30:.2f} GiB"
    assert census.syncs == 0


def test_call_runs_without_syncs_or_host_copies() -> None:
    census = _census(2, "cpu")
    assert census.syncs == 0 and census.host_copies == 0
    assert census.kernels == _census(2, "meta").kernels


def test_census_sees_syncs_host_copies_and_views() -> None:
    x = torch.rand(4, 3)
    with Census() as census:
        x.t().reshape(-1).view(3, 4)[0].add_(1.0)
    assert (census.kernels, census.syncs, census.host_copies) == (2, 0, 0)  # the copy of reshape, add_
    assert census.bytes == 4 * (12 + 12) + 4 * (4 + 4)
    with Census() as census:
        float(x.sum()), x[x > 0.5], torch.tensor([1.0, 2.0])
    assert census.syncs == 2 and census.host_copies == 1
