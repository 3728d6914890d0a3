"""Counting the ops that make the host wait for the device, at the dispatcher (a TorchDispatchMode).

Reading a device scalar (``_local_scalar_dense``: ``.item()``, ``float()``, ``bool()``, ``if tensor``),
``nonzero`` and boolean-mask indexing (their output size must be read back) each stall a GPU step. On a CPU run the
same ops reach the dispatcher, so the census counts what a GPU would wait for (host-to-device copies aside).
``Tensor.tolist`` and ``Tensor.numpy`` read the data without an op, so they are counted by wrapping them.
"""

from __future__ import annotations

import collections
import traceback
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::item", "aten::masked_select",
         "aten::equal", "aten::_unique2", "aten::unique_consecutive"}
BOOL_INDEXED = {"aten::index", "aten::index_put", "aten::index_put_"}


class SyncCensus(TorchDispatchMode):
    """``count`` of host waits while active, and ``sites``: where they were called from."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.sites: collections.Counter = collections.Counter()
        self._wrapped: dict[str, Any] = {}

    def __enter__(self) -> "SyncCensus":
        for name in ("tolist", "numpy"):
            real = self._wrapped[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counting(real))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for name, real in self._wrapped.items():
            setattr(torch.Tensor, name, real)
        return super().__exit__(*exc)

    def _counting(self, real: Any) -> Any:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self._record()
            return real(tensor, *args, **kwargs)

        return read

    def _record(self) -> None:
        self.count += 1
        frames = [f for f in traceback.extract_stack() if "python_dispatch" not in f.filename
                  and "sync_census" not in f.filename][-3:]
        self.sites[" <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in frames)] += 1

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        name = func._schema.name
        indices = args[1] if name in BOOL_INDEXED and len(args) > 1 else None
        if name in READS or (indices and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)):
            self._record()
        return func(*args, **(kwargs or {}))
