"""k-NN evaluation: agreement with a brute-force loop, chunking, vote weighting, input checks."""

from __future__ import annotations

import math

import pytest
import torch

from biodino.eval.knn import knn_accuracy


def brute_force_predictions(bank, bank_labels, queries, k: int, temperature: float, num_classes: int) -> list[int]:
    """DINO's weighted k-NN vote written out with Python loops over queries, neighbours and classes."""
    predictions = []
    for q in queries.tolist():
        sims = []
        for b, label in zip(bank.tolist(), bank_labels.tolist()):
            dot = sum(x * y for x, y in zip(q, b))
            norm = math.sqrt(sum(x * x for x in q)) * math.sqrt(sum(y * y for y in b))
            sims.append((dot / norm, label))
        neighbours = sorted(sims, key=lambda s: -s[0])[:k]
        votes = [0.0] * num_classes
        for sim, label in neighbours:
            votes[label] += math.exp(sim / temperature)
        best = 0
        for c in range(1, num_classes):
            if votes[c] > votes[best]:
                best = c
        predictions.append(best)
    return predictions


def random_problem(n_bank: int, n_query: int, dim: int, num_classes: int, seed: int = 0):
    """Weakly clustered random embeddings with integer labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g)
    bank_labels = torch.randint(num_classes, (n_bank,), generator=g)
    query_labels = torch.randint(num_classes, (n_query,), generator=g)
    bank = centres[bank_labels] + 1.5 * torch.randn(n_bank, dim, generator=g)
    queries = centres[query_labels] + 1.5 * torch.randn(n_query, dim, generator=g)
    return bank.double(), bank_labels, queries.double(), query_labels


@pytest.mark.parametrize("k", [1, 2, 5, 13, 40])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_matches_brute_force_prediction_for_every_query(k: int, temperature: float) -> None:
    bank, bank_labels, queries, _ = random_problem(40, 30, 6, num_classes=4, seed=k)
    expected = torch.tensor(brute_force_predictions(bank, bank_labels, queries, k, temperature, 4))
    # Labelling the queries with the reference predictions makes the accuracy 1 only if every prediction agrees,
    # and shifting those labels by one class makes it 0 only if every prediction agrees.
    assert knn_accuracy(bank, bank_labels, queries, expected, k=k, temperature=temperature, num_classes=4) == 1.0
    shifted = (expected + 1) % 4
    assert knn_accuracy(bank, bank_labels, queries, shifted, k=k, temperature=temperature, num_classes=4) == 0.0


def test_accuracy_is_fraction_of_correct_predictions() -> None:
    bank, bank_labels, queries, _ = random_problem(40, 30, 6, num_classes=4, seed=1)
    expected = torch.tensor(brute_force_predictions(bank, bank_labels, queries, 5, 0.07, 4))
    labels = expected.clone()
    labels[:12] = (labels[:12] + 1) % 4
    acc = knn_accuracy(bank, bank_labels, queries, labels, k=5, num_classes=4)
    assert isinstance(acc, float)
    assert acc == pytest.approx(18 / 30)


def test_perfect_on_well_separated_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(5, 16) * 10
    bank_labels, query_labels = torch.arange(5).repeat(40), torch.arange(5).repeat(30)
    bank = centres[bank_labels] + 0.5 * torch.randn(200, 16, generator=g)
    queries = centres[query_labels] + 0.5 * torch.randn(150, 16, generator=g)
    assert knn_accuracy(bank, bank_labels, queries, query_labels, k=20) == 1.0


def test_chance_level_on_unrelated_labels() -> None:
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(2000, 32, generator=g), torch.randn(1000, 32, generator=g)
    bank_labels, query_labels = torch.randint(10, (2000,), generator=g), torch.randint(10, (1000,), generator=g)
    assert 0.05 < knn_accuracy(bank, bank_labels, queries, query_labels, k=20) < 0.16


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 299, 300, 5000])
def test_chunking_does_not_change_the_result(chunk_size: int) -> None:
    bank, bank_labels, queries, query_labels = random_problem(500, 300, 12, num_classes=10, seed=3)
    whole = knn_accuracy(bank, bank_labels, queries, query_labels, k=20, chunk_size=len(queries))
    assert 0.2 < whole < 1.0  # an informative but imperfect problem, so disagreements would show
    assert knn_accuracy(bank, bank_labels, queries, query_labels, k=20, chunk_size=chunk_size) == whole


def test_votes_are_weighted_by_similarity() -> None:
    # One very close neighbour of class 0 against two farther ones of class 1: a sharp temperature lets the
    # close neighbour win, a flat one lets the majority win.
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    bank_labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_accuracy(bank, bank_labels, query, torch.tensor([0]), k=3, temperature=0.07) == 1.0
    assert knn_accuracy(bank, bank_labels, query, torch.tensor([1]), k=3, temperature=10.0) == 1.0
    assert knn_accuracy(bank, bank_labels, query, torch.tensor([0]), k=1, temperature=10.0) == 1.0


def test_uses_cosine_similarity_not_euclidean_distance() -> None:
    # The query is nearer in Euclidean distance to the class-0 row but points the same way as the class-1 row.
    bank = torch.tensor([[1.0, 1.2], [10.0, 0.0]])
    bank_labels = torch.tensor([0, 1])
    assert knn_accuracy(bank, bank_labels, torch.tensor([[2.0, 0.0]]), torch.tensor([1]), k=1) == 1.0


def test_scale_and_dtype_invariance() -> None:
    bank, bank_labels, queries, query_labels = random_problem(200, 100, 8, num_classes=5, seed=4)
    ref = knn_accuracy(bank, bank_labels, queries, query_labels, k=10)
    scales = torch.rand(200, 1, dtype=torch.float64) * 100 + 0.01
    assert knn_accuracy(bank * scales, bank_labels, queries * 3, query_labels, k=10) == ref
    assert knn_accuracy(bank.float(), bank_labels, queries.half(), query_labels.int(), k=10) == pytest.approx(
        ref, abs=0.02
    )


def test_extreme_temperature_does_not_overflow() -> None:
    bank, bank_labels, queries, query_labels = random_problem(100, 50, 8, num_classes=5, seed=5)
    expected = torch.tensor(brute_force_predictions(bank, bank_labels, queries, 1, 1.0, 5))
    acc = knn_accuracy(bank.float(), bank_labels, queries.float(), expected, k=10, temperature=1e-4)
    assert acc == 1.0  # with a tiny temperature the nearest neighbour decides; exp(1e4) would be inf in float32


def _valid():
    return dict(
        bank=torch.randn(10, 4),
        bank_labels=torch.arange(10) % 3,
        queries=torch.randn(5, 4),
        query_labels=torch.arange(5) % 3,
    )


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(bank_labels=torch.zeros(9, dtype=torch.long)), "bank_labels has 9 entries but bank has 10"),
        (dict(query_labels=torch.zeros(6, dtype=torch.long)), "query_labels has 6 entries but queries has 5"),
        (dict(queries=torch.randn(5, 3)), "queries have dim 3 but bank has dim 4"),
        (dict(k=0), "k must be at least 1"),
        (dict(k=11), "k=11 is larger than the bank"),
        (dict(bank=torch.randn(10)), "bank must be 2-D"),
        (dict(queries=torch.randn(5, 4).long()), "queries must be a floating-point"),
        (dict(bank_labels=torch.zeros(10)), "bank_labels must be a 1-D integer"),
        (dict(queries=torch.randn(0, 4), query_labels=torch.zeros(0, dtype=torch.long)), "queries must not be empty"),
        (dict(num_classes=2), r"labels must lie in \[0, num_classes=2\)"),
        (dict(bank_labels=torch.arange(10) - 1), "labels must lie in"),
        (dict(temperature=0.0), "temperature must be positive"),
        (dict(chunk_size=0), "chunk_size must be at least 1"),
    ],
)
def test_invalid_inputs_raise_clear_errors(changes: dict, message: str) -> None:
    args = _valid() | dict(k=3) | changes
    with pytest.raises(ValueError, match=message):
        knn_accuracy(**args)


def test_valid_inputs_pass_and_num_classes_may_exceed_labels() -> None:
    args = _valid()
    assert 0.0 <= knn_accuracy(**args, k=10, num_classes=7) <= 1.0
