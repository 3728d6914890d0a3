"""The online monitor on a tiny ``biodino train`` run: k-NN and retrieval of a held-out labelled folder logged at
every evaluation step to the history and the metrics table, drawn in plots/eval.png, and equal to what
``biodino embed`` + the protocols compute from the exported teacher of the same step."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from biodino.checkpoint.run_dir import RunDir
from biodino.config.recipe import load_config
from biodino.config.schema import ConfigError
from biodino.eval.embed import embed_images, eval_transform
from biodino.eval.protocols import Options, Split, evaluate
from biodino.interop.export import export_backbone, load_backbone, load_training_state
from biodino.run.history import read_history
from biodino.run.monitor import EvalMonitor, held_out
from biodino.run.trainer import check_runnable, train
from biodino.run.stages import load_schedule
from tests.images import save_photo

TINY_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def held_out_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    for c, name in enumerate(("ant", "bee", "moth")):
        for i in range(6):
            save_photo(root / name / f"{i}.jpg", seed=100 * c + i, width=60, height=48)
    return root


def test_the_monitor_logs_each_evaluation_and_matches_the_exported_teacher(tiny_shards, held_out_folder,
                                                                          tmp_path) -> None:
    cfg = load_config("tiny", [f"data.shards={tiny_shards}", f"runs_dir={tmp_path}", "name=m", "schedule.epochs=1",
                               "schedule.steps_per_epoch=6", "checkpoint.every_n_steps=3", "trainer.log_every_n_steps=1",
                               f"eval.data={held_out_folder}", "eval.k=3", "logging.wandb=disabled"])
    train(cfg)
    run = RunDir(tmp_path / "m")
    history = read_history(run.history)
    evaluated = [s for s, m in history.items() if "eval/knn_top1" in m]
    assert evaluated == [2, 5]  # after optimizer steps 3 and 6 (0-based steps 2 and 5)
    assert all(0 <= history[s]["eval/retrieval_map"] <= 1 and history[s]["eval/seconds"] > 0 for s in evaluated)
    rows = list(csv.DictReader((run.logs / "metrics.csv").open()))
    assert [r["step"] for r in rows if r.get("eval/knn_top1")] == ["2", "5"]
    assert (run.plots / "eval.png").stat().st_size > 0

    # independently: the final teacher exported, embedded as `biodino embed` does, the same split and protocols
    backbone, meta = load_backbone(export_backbone(load_training_state(run.root), tmp_path))
    paths, labels = held_out(str(held_out_folder), cfg.eval.max_images)
    x = embed_images(backbone.eval(), paths, eval_transform(meta["resolution"], meta["normalization"]["mean"],
                                                            meta["normalization"]["std"]))
    monitor = EvalMonitor(cfg)
    import torch

    y = torch.tensor(labels)
    expected = evaluate(Split(x[monitor.gallery], y[monitor.gallery]), Split(x[monitor.queries], y[monitor.queries]),
                        ["knn", "retrieval"], Options(k=3, seed=cfg.seed))
    assert history[5]["eval/knn_top1"] == pytest.approx(expected["knn"]["top1"])
    assert history[5]["eval/retrieval_map"] == pytest.approx(expected["retrieval"]["map"], abs=1e-5)
    assert sorted(monitor.gallery.tolist() + monitor.queries.tolist()) == list(range(18))
    assert len(monitor.gallery) == len(monitor.queries) == 9  # 3 of each class in each part


def test_a_missing_or_unlabelled_eval_folder_is_refused_before_anything_is_written(tiny_shards, tmp_path) -> None:
    cfg = load_config("tiny", [f"data.shards={tiny_shards}", f"runs_dir={tmp_path}", f"eval.data={tmp_path / 'no'}"])
    with pytest.raises(ConfigError, match="eval.data: folder not found"):
        check_runnable(cfg)
    save_photo(tmp_path / "flat" / "a.jpg", seed=1)
    with pytest.raises(ConfigError, match="needs at least two class sub-folders"):
        held_out(str(tmp_path / "flat"), 10)


def test_the_best_checkpoint_is_kept_besides_the_newest_and_a_stage_exports_it(tiny_shards, held_out_folder,
                                                                               tmp_path) -> None:
    """A one-stage schedule with ``export: best``: best.json names the step where the monitored metric first
    peaked, that checkpoint survives keep_last=1, and the stage's backbone export holds its teacher."""
    import json

    import torch
    from safetensors.torch import load_file

    from biodino.run.stages import load_schedule, run_schedule

    overrides = [f"data.shards={tiny_shards}", "schedule.epochs=1", "schedule.steps_per_epoch=8",
                 "checkpoint.every_n_steps=2", "checkpoint.keep_last=1", f"eval.data={held_out_folder}", "eval.k=3",
                 "eval.protocols=[retrieval]", "checkpoint.monitor=eval/retrieval_map", "logging.wandb=disabled"]
    schedule = tmp_path / "schedule.yaml"
    schedule.write_text(json.dumps({"name": "sched", "stages": [{"name": "only", "recipe": str(TINY_RECIPE),
                                                                 "overrides": overrides, "export": "best"}]}))
    (stage,) = load_schedule(str(schedule), [f"runs_dir={tmp_path}"])
    run_schedule([stage])
    run = RunDir(tmp_path / "sched-only")
    history = read_history(run.history)
    scores = {s + 1: m["eval/retrieval_map"] for s, m in history.items() if "eval/retrieval_map" in m}
    assert sorted(scores) == [2, 4, 6, 8]
    best_step = max(scores, key=lambda s: (scores[s], -s))  # the first step reaching the highest value
    best = json.loads((run.checkpoints / "best.json").read_text())
    assert (best["step"], best["metric"]) == (best_step, "eval/retrieval_map")
    assert best["value"] == pytest.approx(scores[best_step])
    kept = sorted(p.name for p in run.checkpoints.glob("step=*.ckpt"))
    assert kept == sorted({f"step={best_step:07d}.ckpt", "step=0000008.ckpt"})
    exported = load_file(str(run.root / "export" / "backbone.safetensors"))
    teacher = {k[len("teacher.backbone."):]: v for k, v in
               load_training_state(run.checkpoints / f"step={best_step:07d}.ckpt").weights.items()
               if k.startswith("teacher.backbone.")}
    assert exported.keys() == teacher.keys() and all(torch.equal(exported[k], teacher[k]) for k in teacher)
    sidecar = json.loads((run.root / "export" / "backbone.json").read_text())
    assert sidecar["provenance"]["step"] == best_step and (run.root / "final.safetensors").is_file()


def test_export_best_needs_a_monitored_metric(tmp_path) -> None:
    schedule = tmp_path / "schedule.yaml"
    schedule.write_text(f"name: s\nstages:\n  - {{name: a, recipe: {TINY_RECIPE}, export: best}}\n")
    with pytest.raises(ConfigError, match=r"stages\[0\].export: best needs checkpoint.monitor"):
        load_schedule(str(schedule))
    schedule.write_text(f"name: s\nstages:\n  - {{name: a, recipe: {TINY_RECIPE}, export: first}}\n")
    with pytest.raises(ConfigError, match=r"export must be one of last, best, got 'first'"):
        load_schedule(str(schedule))


def test_a_monitored_metric_needs_the_monitor(tiny_shards, tmp_path) -> None:
    cfg = load_config("tiny", [f"data.shards={tiny_shards}", "checkpoint.monitor=eval/knn_top1"])
    with pytest.raises(ConfigError, match="checkpoint.monitor: 'eval/knn_top1' is not a metric of the online monitor"):
        check_runnable(cfg)
