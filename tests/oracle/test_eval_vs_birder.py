"""The frozen-embedding protocols against birder 0.8.4's ``birder.eval.methods`` on the same embeddings: k-NN,
SimpleShot and retrieval equal, AMI within 0.03 with the same seed; the torch linear probe within a few points of
scikit-learn's LogisticRegression; the MLP probe's macro F1 within 0.03 of birder's on multi-label traits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from biodino.eval.protocols import Options, Split, evaluate


def _clustered(n: int, classes: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes around random centres, overlapping enough that no protocol is perfect."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 0.35
    labels = rng.integers(0, classes, size=n)
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels.astype(np.int64)


@pytest.fixture(scope="module")
def sets():
    x, y = _clustered(840, 8, 32, 0)
    train, test = (x[:600], y[:600]), (x[600:], y[600:])
    as_split = lambda xy: Split(torch.from_numpy(xy[0]), torch.from_numpy(xy[1]))  # noqa: E731
    return train, test, as_split(train), as_split(test)


def test_knn_simpleshot_and_retrieval_equal_birders(sets) -> None:
    from birder.eval.methods.knn import evaluate_knn
    from birder.eval.methods.retrieval import evaluate_retrieval
    from birder.eval.methods.simpleshot import evaluate_simpleshot

    (xtr, ytr), (xte, yte), train, test = sets
    ours = evaluate(train, test, ["knn", "simpleshot", "retrieval"], Options(k=20, temperature=0.07))
    knn_pred, _ = evaluate_knn(xtr, ytr, xte, yte, k=20, temperature=0.07)
    shot_pred, _ = evaluate_simpleshot(xtr, ytr, xte, yte)
    mean_ap, recall = evaluate_retrieval(xtr, ytr, xte, yte, [1, 5, 10])
    assert ours["knn"]["top1"] == float(np.mean(knn_pred == yte))
    assert ours["simpleshot"]["top1"] == float(np.mean(shot_pred == yte))
    assert ours["retrieval"]["map"] == pytest.approx(mean_ap, abs=1e-6)
    assert [ours["retrieval"][f"recall@{k}"] for k in (1, 5, 10)] == [recall[k] for k in (1, 5, 10)]
    assert 0.3 < ours["knn"]["top1"] < 0.99  # a task neither trivial nor hopeless


def test_ami_is_within_three_points_of_birders_with_the_same_seed(sets) -> None:
    from birder.eval.methods.ami import evaluate_ami

    (_, _), (xte, yte), train, test = sets
    ours = evaluate(train, test, ["ami"], Options(seed=0))["ami"]["ami"]
    assert ours == pytest.approx(evaluate_ami(xte, yte, n_clusters=8, seed=0), abs=0.03)


def test_linear_probe_is_within_a_few_points_of_scikit_learn(sets) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    (xtr, ytr), (xte, yte), train, test = sets
    ours = evaluate(train, test, ["linear"])["linear"]
    scaler = StandardScaler().fit(xtr)
    reference = LogisticRegression(C=1.0 / (1e-4 * len(xtr)), max_iter=2000).fit(scaler.transform(xtr), ytr)
    assert ours["top1"] == pytest.approx(reference.score(scaler.transform(xte), yte), abs=0.03)
    assert 0.0 < ours["macro_f1"] <= 1.0


def test_svm_equals_birders_on_a_binary_task_with_the_same_seed(sets) -> None:
    from birder.eval.methods.svm import evaluate_svm

    (xtr, ytr), (xte, yte), _, _ = sets
    keep_tr, keep_te = ytr < 2, yte < 2  # a binary task, as NeWT's
    train = Split(torch.from_numpy(xtr[keep_tr]), torch.from_numpy(ytr[keep_tr]))
    test = Split(torch.from_numpy(xte[keep_te]), torch.from_numpy(yte[keep_te]))
    ours = evaluate(train, test, ["svm"], Options(seed=3, svm_iterations=8))["svm"]["accuracy"]
    predicted, _ = evaluate_svm(xtr[keep_tr], ytr[keep_tr], xte[keep_te], yte[keep_te], n_iter=8, n_jobs=1, seed=3)
    assert ours == float(np.mean(predicted == yte[keep_te]))
    assert ours > 0.6


def _traits(n: int, dim: int, traits: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """0/1 traits as noisy random linear functions of Gaussian features, thresholded at 20-50% positives."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    z = x @ rng.normal(size=(dim, traits)) / np.sqrt(dim) + 0.5 * rng.normal(size=(n, traits))
    cut = np.array([np.quantile(z[:, t], q) for t, q in enumerate(rng.uniform(0.5, 0.8, size=traits))])
    return x.astype(np.float32), (z > cut).astype(np.float32)


def test_mlp_probe_is_within_three_points_of_birders_with_the_same_settings() -> None:
    from birder.eval.methods.mlp import evaluate_mlp, train_mlp

    x, y = _traits(1800, 32, 6, 0)
    (xtr, ytr), (xte, yte) = (x[:800], y[:800]), (x[800:], y[800:])
    o = Options(seed=1, mlp_epochs=40)  # birder's AwA2 / FishNet batches of 128 and lr 1e-4; fewer epochs than 100
    ours = evaluate(Split(torch.from_numpy(xtr), torch.from_numpy(ytr)),
                    Split(torch.from_numpy(xte), torch.from_numpy(yte)), ["mlp"], o)["mlp"]["macro_f1"]
    probe = train_mlp(xtr, ytr, 6, torch.device("cpu"), epochs=o.mlp_epochs, batch_size=o.mlp_batch_size, lr=1e-4,
                      seed=o.seed)
    _, _, theirs = evaluate_mlp(probe, xte, yte, batch_size=o.mlp_batch_size)
    assert ours == pytest.approx(theirs, abs=0.03)
    all_positive = float(np.mean(2 * yte.mean(0) / (1 + yte.mean(0))))  # macro F1 of predicting every trait
    assert all_positive + 0.05 < ours < 0.95  # a task neither trivial nor hopeless
