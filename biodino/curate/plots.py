"""The figures ``biodino curate`` leaves in ``DIR/plots/``: similarity histograms at the thresholds, and the
finest clusters' sizes before and after balanced sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from biodino.fs.atomic import atomic_write


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def similarity_histogram(path: Path, sims: np.ndarray, threshold: float, title: str) -> None:
    """Histogram of similarities (log counts) with the threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(sims[np.isfinite(sims)], bins=100, range=(-1, 1), log=True, color="tab:blue")
    ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold}")
    ax.set(xlabel="cosine similarity", ylabel="images", title=title)
    ax.legend()
    _save(fig, path)


def cluster_sizes(path: Path, before: np.ndarray, after: np.ndarray) -> None:
    """The finest clusters' sizes, largest first, before and after sampling (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-before, kind="stable")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(len(order)), before[order], label="before sampling")
    ax.plot(np.arange(len(order)), after[order], label="after sampling")
    ax.set(yscale="symlog", xlabel="finest clusters, largest first", ylabel="images", title="cluster sizes")
    ax.legend()
    _save(fig, path)
