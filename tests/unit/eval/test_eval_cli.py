"""``biodino eval`` on embedding files: results as the protocols compute them (string labels mapped alike in both
files), a markdown table on stdout, and bad input refused in one line with exit code 2, nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from biodino.cli.main import main
from biodino.eval.protocols import Options, Split, evaluate


def _write(path, x, labels) -> str:
    np.savez(path, embeddings=x, labels=labels)
    return str(path)


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(3)
    names = np.array(["ant", "bee", "moth"])
    centres = rng.normal(size=(3, 16))
    y = rng.integers(0, 3, size=120)
    x = (centres[y] + 1.5 * rng.normal(size=(120, 16))).astype(np.float32)
    return (_write(tmp_path / "train.npz", x[:90], names[y[:90]]), _write(tmp_path / "test.npz", x[90:], names[y[90:]]),
            x, y)


def test_results_are_the_protocols_on_the_files(files, tmp_path, capsys) -> None:
    train, test, x, y = files
    out = tmp_path / "r.json"
    assert main(["eval", "--train", train, "--test", test, "--protocol", "knn,simpleshot,retrieval", "--k", "5",
                 "--json", str(out)]) == 0
    # names map to ids in order of first appearance over train then test: the same for both files
    order = {}
    ids = np.array([order.setdefault(n, len(order)) for n in np.array(["ant", "bee", "moth"])[y]])
    expected = evaluate(Split(torch.from_numpy(x[:90]), torch.from_numpy(ids[:90])),
                        Split(torch.from_numpy(x[90:]), torch.from_numpy(ids[90:])),
                        ["knn", "simpleshot", "retrieval"], Options(k=5))
    assert json.loads(out.read_text()) == expected
    table = capsys.readouterr().out
    assert "| knn | top1 |" in table and "| retrieval | recall@5 |" in table


@pytest.mark.parametrize("change,message", [
    (lambda a: a.__setitem__(a.index("--protocol") + 1, "knn,probe"), "--protocol: unknown 'probe'"),
    (lambda a: a.__setitem__(a.index("--train") + 1, "missing.npz"), "--train: file not found: missing.npz"),
    (lambda a: a.__setitem__(a.index("--k") + 1, "0"), "--k must be at least 1"),
])
def test_usage_errors_exit_2_in_one_line_writing_nothing(files, tmp_path, capsys, change, message) -> None:
    train, test, _, _ = files
    args = ["eval", "--train", train, "--test", test, "--protocol", "knn", "--k", "5", "--json", str(tmp_path / "o.json")]
    change(args)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o.json").exists()


def test_a_file_without_labels_or_of_another_width_is_named(files, tmp_path, capsys) -> None:
    train, test, x, _ = files
    np.savez(tmp_path / "nolabels.npz", embeddings=x)
    np.savez(tmp_path / "wide.npz", embeddings=np.zeros((4, 8), np.float32), labels=np.zeros(4, np.int64))
    assert main(["eval", "--train", train, "--test", str(tmp_path / "nolabels.npz")]) == 2
    assert "nolabels.npz: no array 'labels' (has embeddings)" in capsys.readouterr().err
    assert main(["eval", "--train", train, "--test", str(tmp_path / "wide.npz")]) == 2
    assert "--test embeddings have dim 8, --train 16" in capsys.readouterr().err


def test_the_config_names_every_protocol_and_only_those() -> None:
    from biodino.config.schema import EVAL_PROTOCOLS
    from biodino.eval.protocols import PROTOCOLS

    assert set(EVAL_PROTOCOLS) == set(PROTOCOLS)
