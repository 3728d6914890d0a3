"""The MLP probe: the same seed gives the same probe (and leaves the global RNG alone), single labels are probed
one-hot, multi-label files are read as 0/1 traits, and ``biodino eval`` refuses what a protocol cannot use in one
line with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from biodino.cli.main import main
from biodino.eval.mlp_probe import mlp_probe_predict
from biodino.eval.protocols import LabelKindError, Options, Split, evaluate, read_split

FAST = Options(mlp_epochs=15, mlp_batch_size=32)


def _traits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, 16) and 4 traits thresholded from noisy linear functions of them."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    return x, (x @ rng.normal(size=(16, 4)) + 0.5 * rng.normal(size=(n, 4)) > 0.3).astype(np.float32)


def _split(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.from_numpy(x), torch.from_numpy(y))


def test_the_same_seed_gives_the_same_predictions_and_leaves_the_global_rng_alone() -> None:
    x, y = _traits(300)
    xtr, ytr, xte = (torch.from_numpy(a) for a in (x[:200], y[:200], x[200:]))
    state = torch.get_rng_state()
    first = mlp_probe_predict(xtr, ytr, xte, epochs=5, batch_size=32, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, mlp_probe_predict(xtr, ytr, xte, epochs=5, batch_size=32, seed=4))
    assert first.shape == (100, 4) and set(first.unique().tolist()) <= {0, 1}
    assert not torch.equal(first, mlp_probe_predict(xtr, ytr, xte, epochs=5, batch_size=32, seed=5))


def test_multi_label_macro_f1_beats_predicting_every_trait_and_repeats_report_a_std() -> None:
    x, y = _traits(700)
    result = evaluate(_split(x[:500], y[:500]), _split(x[500:], y[500:]), ["mlp"], FAST, repeats=2)["mlp"]
    all_positive = float(np.mean(2 * y[500:].mean(0) / (1 + y[500:].mean(0))))
    assert all_positive < result["macro_f1"] <= 1.0 and result["macro_f1_std"] >= 0.0


def test_single_labels_are_probed_one_hot() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=300)
    x = (4.0 * rng.normal(size=(3, 16))[labels] + rng.normal(size=(300, 16))).astype(np.float32)
    result = evaluate(_split(x[:200], labels[:200]), _split(x[200:], labels[200:]), ["mlp"], FAST)
    assert result["mlp"]["macro_f1"] > 0.9  # chance is about 1/3


def test_single_label_protocols_refuse_multi_label_sets() -> None:
    x, y = _traits(60)
    with pytest.raises(LabelKindError, match=r"protocol knn needs single labels \(one class per sample\); these "
                                             r"are multi-label \(4 traits\)"):
        evaluate(_split(x[:40], y[:40]), _split(x[40:], y[40:]), ["mlp", "knn"], FAST)


@pytest.mark.parametrize("dtype", [bool, np.int64, np.float64])
def test_two_d_labels_of_zeros_and_ones_read_as_float_traits(tmp_path, dtype) -> None:
    x, y = _traits(10)
    np.savez(tmp_path / "t.npz", embeddings=x, labels=y.astype(dtype))
    split = read_split(str(tmp_path / "t.npz"), torch.device("cpu"), {})
    assert split.labels.dtype == torch.float32 and torch.equal(split.labels, torch.from_numpy(y))


@pytest.mark.parametrize("labels,message", [
    (np.full((10, 2), 2), "must be 0 or 1, found 2"),
    (np.full((10, 2), np.nan), "must be 0 or 1, found nan"),
    (np.full((10, 2), "a"), "must be 0/1 numbers, got dtype <U1"),
    (np.zeros((10, 2, 2)), "do not match as (n, dim) and (n,) or (n, traits)"),
    (np.zeros((10, 0)), "have no traits"),
])
def test_other_labels_are_refused_naming_the_file(tmp_path, labels, message) -> None:
    np.savez(tmp_path / "bad.npz", embeddings=np.zeros((10, 4), np.float32), labels=labels)
    with pytest.raises(ValueError, match="bad.npz: ") as err:
        read_split(str(tmp_path / "bad.npz"), torch.device("cpu"), {})
    assert message in str(err.value)


@pytest.fixture()
def files(tmp_path):
    x, y = _traits(200, seed=2)
    for name, rows in (("a", slice(0, 150)), ("b", slice(150, 200))):
        np.savez(tmp_path / f"{name}.npz", embeddings=x[rows], labels=y[rows])
    return str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), x, y


def test_cli_writes_the_mlp_macro_f1(files, tmp_path, capsys) -> None:
    train, test, x, y = files
    out = tmp_path / "out.json"
    assert main(["eval", "--train", train, "--test", test, "--protocol", "mlp", "--mlp-epochs", "5",
                 "--mlp-batch-size", "32", "--device", "cpu", "--json", str(out)]) == 0
    expected = evaluate(_split(x[:150], y[:150]), _split(x[150:], y[150:]), ["mlp"],
                        Options(mlp_epochs=5, mlp_batch_size=32))
    assert json.loads(out.read_text()) == expected and list(expected["mlp"]) == ["macro_f1"]
    assert "| mlp | macro_f1 |" in capsys.readouterr().out


def _refused(args: list[str], message: str, capsys) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_refuses_what_a_protocol_cannot_use_in_one_line(files, tmp_path, capsys) -> None:
    train, test, x, y = files
    base = ["eval", "--train", train, "--test", test, "--device", "cpu"]
    _refused(base + ["--protocol", "knn"], "protocol knn needs single labels (one class per sample); these are "
             "multi-label (4 traits)", capsys)
    np.savez(tmp_path / "three.npz", embeddings=x[:20], labels=y[:20, :3])
    _refused(base[:4] + [str(tmp_path / "three.npz"), "--protocol", "mlp"], "--test has 3 traits, --train 4 traits", capsys)
    np.savez(tmp_path / "classes.npz", embeddings=x[:20], labels=np.arange(20) % 3)
    _refused(base[:4] + [str(tmp_path / "classes.npz"), "--protocol", "mlp"], "--test has single labels, --train "
             "4 traits", capsys)
    np.savez(tmp_path / "two.npz", embeddings=x[:20], labels=2 * y[:20])
    _refused(base[:4] + [str(tmp_path / "two.npz"), "--protocol", "mlp"], "two.npz: 2-D labels (multi-label traits) "
             "must be 0 or 1, found", capsys)
    _refused(base + ["--protocol", "mlp", "--mlp-epochs", "0"], "--mlp-epochs must be at least 1, got 0", capsys)
    _refused(base + ["--protocol", "mlp", "--mlp-batch-size", "0"], "--mlp-batch-size must be at least 1", capsys)
