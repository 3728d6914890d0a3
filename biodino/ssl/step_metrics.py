"""Scalars of the training steps, kept where they are made and read together at log intervals.

A loss or a gradient norm lives on the device; reading it on the host waits for the device to finish everything
queued before it. Reading every metric every step (Lightning's ``self.log`` with a progress bar, ``float()`` of
each value) stalls the GPU many times per step. Here values stay device tensors (host numbers stay floats) until
``read``, which moves all of them to the host with one synchronization.
"""

from __future__ import annotations

from typing import Union

import torch

Value = Union[torch.Tensor, float]


class StepMetrics:
    """Per optimizer step, named scalars; a name logged several times in one step (micro-batches) is averaged, or
    summed if logged with ``total=True`` (counts)."""

    def __init__(self) -> None:
        self._steps: dict[int, dict[str, tuple[Value, int]]] = {}

    def log(self, step: int, name: str, value: Value, total: bool = False) -> None:
        record = self._steps.setdefault(step, {})
        value = value.detach() if isinstance(value, torch.Tensor) else float(value)
        summed, n = record.get(name, (0.0, 0))
        record[name] = (summed + value, 1 if total else n + 1)

    def log_dict(self, step: int, values: dict[str, Value]) -> None:
        for name, value in values.items():
            self.log(step, name, value)

    def __len__(self) -> int:
        return len(self._steps)

    def read(self) -> dict[int, dict[str, float]]:
        """Every step logged since the last read, by step, as floats; one host-device synchronization in all."""
        steps, self._steps = dict(sorted(self._steps.items())), {}
        tensors = [total for record in steps.values() for total, _ in record.values()
                   if isinstance(total, torch.Tensor)]
        host = iter(torch.stack([t.float().reshape(()) for t in tensors]).tolist()) if tensors else iter(())
        out: dict[int, dict[str, float]] = {}
        for step in steps:
            out[step] = {name: (next(host) if isinstance(total, torch.Tensor) else total) / n
                         for name, (total, n) in steps[step].items()}
        return out
