"""The demo pipeline end to end at a small size: generate, pack, train, export, k-NN against random init."""

from __future__ import annotations

from pathlib import Path

from biodino.data.synthetic import SHAPE_CLASSES
from biodino.cli.main import main
from biodino.cli.demo import labelled_folder, run_demo, split


def test_demo_pipeline_runs_end_to_end_small(tmp_path) -> None:
    tiny = ("schedule.epochs=1", "schedule.steps_per_epoch=3", "schedule.batch_size=16")
    result = run_demo(tmp_path, seed=0, per_class=12, overrides=tiny)
    assert result["bank"] == 100 and result["queries"] == 20  # every 6th image of a class is a query
    assert 0.0 <= result["knn_random"] <= 1.0 and 0.0 <= result["knn_trained"] <= 1.0
    assert list((tmp_path / "export").glob("vit_tiny_p8_demo-seed0_3.safetensors"))
    assert (Path(result["run"]) / "plots" / "losses.png").exists()
    # the online monitor ran at the end of training on the 20 held-out queries, never trained on
    assert list(result["curve"]) == [3] and 0.0 <= result["curve"][3] <= 1.0
    assert (Path(result["run"]) / "plots" / "eval.png").stat().st_size > 0
    assert sum(1 for _ in (tmp_path / "heldout").rglob("*.png")) == 20


def test_split_is_per_class_and_disjoint(tmp_path) -> None:
    from biodino.data.synthetic import write_shapes

    write_shapes(tmp_path, 7)
    items = labelled_folder(tmp_path)
    bank, queries = split(items)
    assert len(items) == 7 * len(SHAPE_CLASSES) and not set(bank) & set(queries)
    assert sorted(lab for _, lab in queries) == sorted(list(range(len(SHAPE_CLASSES))) * 2)


def test_demo_on_a_folder_without_classes_is_a_usage_error(tmp_path, capsys) -> None:
    (tmp_path / "flat").mkdir()
    assert main(["demo", "--data", str(tmp_path / "flat"), "--out", str(tmp_path / "o")]) == 2
    assert "one sub-folder per class" in capsys.readouterr().err
