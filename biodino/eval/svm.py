"""The SVM protocol of NeWT-style binary tasks: standardized features, an SVC whose C, kernel and gamma come from a
seeded randomized search with cross-validation on the train set (scikit-learn)."""

from __future__ import annotations

import numpy as np


def svm_predict(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, iterations: int = 100,
                seed: int = 0) -> np.ndarray:
    """Predicted labels of the test rows by the best of ``iterations`` sampled SVCs (5-fold cross-validation)."""
    from scipy.stats import loguniform
    from sklearn.model_selection import RandomizedSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    space = {"svc__C": loguniform(1e-3, 1e1), "svc__kernel": ["rbf", "linear", "sigmoid", "poly"],
             "svc__gamma": loguniform(1e-4, 1e-3)}
    search = RandomizedSearchCV(make_pipeline(StandardScaler(), SVC()), space, n_iter=iterations, random_state=seed)
    return search.fit(train, train_labels).predict(test)
