"""Clustering quality of embeddings (Lowe et al. 2024): L2-normalize, reduce with UMAP, cluster with Ward
agglomerative clustering into as many clusters as classes, score by adjusted mutual information."""

from __future__ import annotations

from typing import Optional

import numpy as np


def ami_score(features: np.ndarray, labels: np.ndarray, dims: int = 50, neighbors: int = 15,
              seed: Optional[int] = 0) -> float:
    """AMI between the labels and the Ward clusters of the UMAP-reduced features (umap-learn, scikit-learn).

    A seed makes UMAP deterministic (and single-threaded); ``None`` lets it use every core."""
    import umap
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import adjusted_mutual_info_score

    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    reducer = umap.UMAP(n_neighbors=neighbors, n_components=min(dims, len(x) - 2), min_dist=0.0,
                        random_state=seed, n_jobs=1 if seed is not None else -1)
    clusters = AgglomerativeClustering(n_clusters=len(np.unique(labels)), linkage="ward").fit_predict(
        reducer.fit_transform(x))
    return float(adjusted_mutual_info_score(labels, clusters))
