"""The model cards' frozen-embedding protocols over train/test embedding sets, as one registry: each protocol maps
the two sets to its metrics. ``evaluate`` runs a list of them, ``repeats`` times with seeds seed, seed + 1, ...
for the stochastic ones (mean and std). Labels are one class per sample, or 0/1 traits per sample (multi-label),
which only the MLP probe takes."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from biodino.eval.clustering import ami_score
from biodino.eval.knn import knn_predict
from biodino.eval.linear_probe import linear_probe_predict
from biodino.eval.mlp_probe import mlp_probe_predict
from biodino.eval.retrieval import retrieval_metrics
from biodino.eval.simpleshot import simpleshot_predict
from biodino.eval.svm import svm_predict


@dataclass(frozen=True)
class Split:
    """Embeddings (n, dim) and labels of one set, on the device the protocols run on: integer classes (n,) or
    float32 multi-hot traits (n, traits)."""

    embeddings: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class Options:
    k: int = 20
    temperature: float = 0.07
    seed: int = 0
    recall_at: tuple[int, ...] = (1, 5, 10)
    svm_iterations: int = 100
    mlp_epochs: int = 100  # birder's AwA2 and FishNet benchmarks' --epochs
    mlp_batch_size: int = 128  # and their --batch-size


class LabelKindError(ValueError):
    """A protocol given labels of a kind it cannot use (multi-label to a single-label one, or train and test unlike)."""


def _kind(split: Split) -> str:
    """How a set's labels read in an error: ``single labels`` or ``multi-label (T traits)``."""
    return f"multi-label ({split.labels.shape[1]} traits)" if split.labels.ndim == 2 else "single labels"


def _top1(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predicted.cpu() == labels.cpu()).double().mean())


def _macro_f1(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels.cpu().numpy(), predicted.cpu().numpy(), average="macro", zero_division=0))


def knn(train: Split, test: Split, o: Options) -> dict[str, float]:
    classes = int(max(train.labels.max(), test.labels.max())) + 1
    k = min(o.k, len(train.labels))
    return {"top1": _top1(knn_predict(train.embeddings, train.labels, test.embeddings, k, o.temperature, classes),
                          test.labels)}


def simpleshot(train: Split, test: Split, o: Options) -> dict[str, float]:
    return {"top1": _top1(simpleshot_predict(train.embeddings, train.labels, test.embeddings), test.labels)}


def retrieval(train: Split, test: Split, o: Options) -> dict[str, float]:
    return retrieval_metrics(train.embeddings, train.labels, test.embeddings, test.labels, o.recall_at)


def ami(train: Split, test: Split, o: Options) -> dict[str, float]:
    return {"ami": ami_score(test.embeddings.cpu().numpy(), test.labels.cpu().numpy(), seed=o.seed)}


def linear(train: Split, test: Split, o: Options) -> dict[str, float]:
    classes = int(max(train.labels.max(), test.labels.max())) + 1
    predicted = linear_probe_predict(train.embeddings, train.labels, test.embeddings, classes, seed=o.seed)
    return {"top1": _top1(predicted, test.labels), "macro_f1": _macro_f1(predicted, test.labels)}


def svm(train: Split, test: Split, o: Options) -> dict[str, float]:
    predicted = svm_predict(train.embeddings.cpu().numpy(), train.labels.cpu().numpy(), test.embeddings.cpu().numpy(),
                            o.svm_iterations, o.seed)
    return {"accuracy": _top1(torch.from_numpy(predicted), test.labels)}


def _targets(train: Split, test: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """0/1 targets of both sets: multi-hot traits as they are, single labels one-hot over the classes of either."""
    if train.labels.ndim != test.labels.ndim or (train.labels.ndim == 2 and
                                                  train.labels.shape[1] != test.labels.shape[1]):
        raise LabelKindError(f"train labels are {_kind(train)}, test labels {_kind(test)}")
    if train.labels.ndim == 2:
        return train.labels, test.labels
    classes = int(max(train.labels.max(), test.labels.max())) + 1
    targets, truth = (torch.nn.functional.one_hot(s.labels.long(), classes).float() for s in (train, test))
    return targets, truth


def mlp(train: Split, test: Split, o: Options) -> dict[str, float]:
    """Macro F1 over traits; single labels are probed as one-hot traits, one per class."""
    targets, truth = _targets(train, test)
    predicted = mlp_probe_predict(train.embeddings, targets, test.embeddings, o.mlp_epochs, o.mlp_batch_size, o.seed)
    return {"macro_f1": _macro_f1(predicted, truth.long())}


# name -> (protocol, stochastic: whether repeats with other seeds differ)
PROTOCOLS: dict[str, tuple[Callable[[Split, Split, Options], dict[str, float]], bool]] = {
    "knn": (knn, False), "simpleshot": (simpleshot, False), "retrieval": (retrieval, False),
    "ami": (ami, True), "linear": (linear, False), "svm": (svm, True), "mlp": (mlp, True),
}
MULTI_LABEL = frozenset({"mlp"})  # the protocols that take multi-hot traits


def evaluate(train: Split, test: Split, protocols: list[str], options: Options = Options(),
             repeats: int = 1) -> dict[str, dict[str, float]]:
    """Metrics by protocol; a stochastic protocol run ``repeats`` times also reports ``<metric>_std``."""
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol {unknown[0]!r}; available: {', '.join(PROTOCOLS)}")
    for name in protocols:  # before any runs, so a bad mix fails fast
        for split in (train, test):
            if split.labels.ndim == 2 and name not in MULTI_LABEL:
                raise LabelKindError(f"protocol {name} needs single labels (one class per sample); these are "
                                     f"{_kind(split)}")
    results = {}
    for name in protocols:
        fn, stochastic = PROTOCOLS[name]
        try:
            runs = [fn(train, test, Options(**{**options.__dict__, "seed": options.seed + i}))
                    for i in range(repeats if stochastic else 1)]
        except ImportError as err:
            raise ImportError(f"protocol {name} needs {err.name}: pip install 'biodino[eval]'") from err
        merged = {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}
        if len(runs) > 1:
            merged.update({f"{k}_std": statistics.stdev(r[k] for r in runs) for k in runs[0]})
        results[name] = merged
    return results


def markdown(results: dict[str, dict[str, float]]) -> str:
    """A table of protocol, metric, value."""
    rows = ["| protocol | metric | value |", "|---|---|---|"]
    rows += [f"| {p} | {m} | {v:.4f} |" for p, metrics in results.items() for m, v in metrics.items()]
    return "\n".join(rows)


def read_split(path: str, device: torch.device, classes: dict[str, int]) -> Split:
    """An embeddings file as ``biodino embed`` writes it (``.npz`` with arrays ``embeddings`` and ``labels``);
    labels (n,) are classes, string ones mapped through ``classes`` (grown as new names appear), and labels
    (n, traits) of 0/1 are multi-hot traits. Errors name the file and the key."""
    with np.load(path, allow_pickle=False) as data:
        for key in ("embeddings", "labels"):
            if key not in data:
                raise ValueError(f"{path}: no array {key!r} (has {', '.join(data.files) or 'none'})")
        embeddings, labels = data["embeddings"], data["labels"]
    if embeddings.ndim != 2 or labels.ndim not in (1, 2) or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{path}: embeddings {embeddings.shape} and labels {labels.shape} do not match as (n, dim) "
                         "and (n,) or (n, traits)")
    x = torch.from_numpy(embeddings.astype(np.float32)).to(device)
    if labels.ndim == 2:
        return Split(x, torch.from_numpy(_multi_hot(path, labels)).to(device))
    if labels.dtype.kind in "iu":
        ids = labels.astype(np.int64)
    else:
        ids = np.array([classes.setdefault(str(v), len(classes)) for v in labels], dtype=np.int64)
    return Split(x, torch.from_numpy(ids).to(device))


def _multi_hot(path: str, labels: np.ndarray) -> np.ndarray:
    """2-D labels as float32 traits, refused unless they are numbers that are all 0 or 1."""
    if labels.shape[1] == 0:
        raise ValueError(f"{path}: labels {labels.shape} have no traits")
    if labels.dtype.kind not in "biuf":
        raise ValueError(f"{path}: 2-D labels (multi-label traits) must be 0/1 numbers, got dtype {labels.dtype}")
    bad = labels[~np.isin(labels, (0, 1))]
    if bad.size:
        raise ValueError(f"{path}: 2-D labels (multi-label traits) must be 0 or 1, found {bad.flat[0].item()!r} "
                         f"({bad.size} such values)")
    return labels.astype(np.float32)
