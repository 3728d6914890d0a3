"""Collating multi-crop samples: crops stacked crop-major per size group, so each group is one batch."""

from __future__ import annotations

from typing import Any

import torch


def collate_crops(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``[{"global_crops": [...], "local_crops": [...]}]`` -> rows [crop 0 of every image, crop 1 of every image, ...]."""
    n_global, n_local = len(samples[0]["global_crops"]), len(samples[0]["local_crops"])
    global_crops = torch.stack([s["global_crops"][i] for i in range(n_global) for s in samples])
    if n_local:
        local_crops = torch.stack([s["local_crops"][i] for i in range(n_local) for s in samples])
    else:
        local_crops = global_crops.new_empty((0, *global_crops.shape[1:]))
    return {"global_crops": global_crops, "local_crops": local_crops}
