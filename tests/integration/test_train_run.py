"""`biodino train` as users run it: real processes, real SIGKILLs, resume, export, full weights, wandb modes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from biodino.checkpoint import full_weights
from biodino.interop.init_weights import load_full_weights
from biodino.interop.export import backbone_from_state, export_backbone, export_full, load_backbone, load_training_state
from biodino.run.history import read_history
from biodino.config.recipe import load_config
from biodino.checkpoint.run_dir import RunDir
from biodino.checkpoint.safe_load import CheckpointError
from biodino.run.trainer import build_module
from tests.images import packed_photos, save_photo

STEPS = ["schedule.epochs=2", "schedule.steps_per_epoch=6", "checkpoint.every_n_steps=3"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return packed_photos(tmp_path_factory.mktemp("train"), count=40, per_shard=10, seed=2000)


def _start(shards: Path, runs: Path, name: str, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "biodino", "train", "tiny", f"data.shards={shards}", f"runs_dir={runs}",
            f"name={name}", *STEPS, *extra]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 240) -> None:
    """SIGKILL the whole process group (trainer and data workers) as soon as ``condition()`` holds."""
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "condition never met"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def full_run(shards, tmp_path_factory) -> RunDir:
    runs = tmp_path_factory.mktemp("runs")
    _finish(_start(shards, runs, "full"))
    return RunDir(runs / "full")


def test_resume_after_sigkill_reproduces_every_step_loss(shards, full_run, tmp_path) -> None:
    run = RunDir(tmp_path / "killed")
    proc = _start(shards, tmp_path, "killed")
    _kill_when(proc, lambda: len(read_history(run.history)) >= 8)  # past the checkpoint at step 6
    assert run.newest_checkpoint().name == "step=0000006.ckpt"
    _finish(_start(shards, tmp_path, "killed"))
    expected, resumed = read_history(full_run.history), read_history(run.history)
    assert sorted(resumed) == list(range(12)) == sorted(expected)
    for step in range(12):
        for key in ("loss/total", "loss/dino", "loss/ibot", "loss/koleo", "lr", "momentum"):
            assert resumed[step][key] == expected[step][key], (step, key)


def test_a_kill_while_writing_a_checkpoint_leaves_the_newest_complete_one_loadable(shards, tmp_path) -> None:
    run = RunDir(tmp_path / "big")
    big_heads = ["objective.dino.head.num_prototypes=65536", "objective.dino.head.bottleneck_dim=256"]
    proc = _start(shards, tmp_path, "big", *big_heads)
    _kill_when(proc, lambda: run.checkpoints.exists() and any(run.checkpoints.glob(".*.tmp")))
    newest = run.newest_checkpoint()
    if newest is not None:  # the first save was interrupted: there may be none yet
        assert load_training_state(newest).step > 0
    _finish(_start(shards, tmp_path, "big", *big_heads))  # restarts cleanly, partial file removed
    assert not list(run.checkpoints.glob(".*.tmp")) and load_training_state(run.root).step == 12


def test_run_directory_layout_and_checkpoint_retention(full_run) -> None:
    assert load_config(str(full_run.config)).name == "full"
    assert sorted(p.name for p in full_run.checkpoints.glob("step=*.ckpt")) == ["step=0000009.ckpt",
                                                                                "step=0000012.ckpt"]
    assert (full_run.checkpoints / "last.ckpt").resolve().name == "step=0000012.ckpt"
    assert {p.name for p in full_run.plots.glob("*.png")} >= {"losses.png", "schedules.png"}
    assert (full_run.logs / "metrics.csv").exists()
    state = load_training_state(full_run.root)
    assert state.step == 12 and state.cfg.name == "full"


def test_backbone_export_reloads_to_identical_embeddings_also_resized(full_run, tmp_path) -> None:
    state = load_training_state(full_run.root)
    x = torch.randn(3, 3, 32, 32)
    for network in ("teacher", "student"):
        path = export_backbone(state, tmp_path, network)
        assert path.name == "vit_tiny_p8_full_12.safetensors"
        reloaded, meta = load_backbone(path)
        original = backbone_from_state(state, network).eval()
        assert meta["resolution"] == 32 and meta["embed_dim"] == 96 and meta["provenance"]["network"] == network
        torch.testing.assert_close(reloaded.embedding(x), original.embedding(x), rtol=0, atol=0)
    resized, meta = load_backbone(export_backbone(state, tmp_path, resolution=48, tag="r48"))
    original = backbone_from_state(state).eval()
    original.resize_pos_embed(48)
    assert meta["resolution"] == 48 and resized.grid == (6, 6)
    x48 = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(resized.embedding(x48), original.embedding(x48), rtol=0, atol=0)


def test_full_weights_round_trip_into_a_new_run_also_at_another_resolution(full_run, tmp_path) -> None:
    state = load_training_state(full_run.root)
    path = export_full(state, tmp_path / "full.safetensors")
    tensors, meta = full_weights.read(path)
    assert meta["step"] == "12" and meta["preset"] == "vit_tiny_p8" and "dino_loss.center" in tensors
    cfg = load_config("tiny", [f"init.full_weights={path}"])
    module = build_module(cfg)
    load_full_weights(module, path)
    fresh = module.state_dict()
    for key, value in state.weights.items():
        torch.testing.assert_close(fresh[key], value, rtol=0, atol=0, msg=key)
    bigger = build_module(load_config("tiny", ["crops.global_size=48"]))
    load_full_weights(bigger, path)
    assert bigger.student.backbone.pos_embedding.shape == (1, 1 + 36, 96)
    torch.testing.assert_close(bigger.teacher.dino_head.mlp[0].weight, state.weights["teacher.dino_head.mlp.0.weight"])
    with pytest.raises(CheckpointError, match="preset 'vit_tiny_p8'"):
        load_full_weights(build_module(load_config("tiny", ["model.preset=vit_tiny_p16"])), path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo owned > owned.txt",))


def test_pickle_bearing_checkpoints_are_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {}, "payload": _Exploit()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="needs pickled code"):
        load_training_state(tmp_path / "evil.ckpt")
    assert not (tmp_path / "owned.txt").exists()
    (tmp_path / "fake.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a biodino backbone export"):
        load_backbone(tmp_path / "fake.safetensors")


def test_embed_cli_writes_embeddings_with_paths(full_run, tmp_path) -> None:
    import numpy as np

    from biodino.cli.main import main

    model = export_backbone(load_training_state(full_run.root), tmp_path)
    images = [save_photo(tmp_path / "imgs" / f"{i}.jpg", seed=i, width=50, height=40) for i in range(5)]
    assert main(["embed", str(model), str(tmp_path / "imgs"), "--out", str(tmp_path / "e.npz")]) == 0
    data = np.load(tmp_path / "e.npz")
    assert data["embeddings"].shape == (5, 96) and list(data["keys"]) == [str(p) for p in images]
    assert main(["embed", str(model), str(tmp_path / "nothing"), "--out", str(tmp_path / "f.npz")]) == 2
    assert "labels" not in data.files  # images directly in the folder: no classes


def test_export_embed_eval_from_class_folders(full_run, tmp_path, capsys) -> None:
    """The user's loop: export, embed class sub-folders with 2 workers (labels from the folder names, the same
    embeddings as in-process decoding), evaluate the two embedding files."""
    import json

    import numpy as np

    from biodino.cli.main import main
    from biodino.eval.embed import embed_images, eval_transform

    model = export_backbone(load_training_state(full_run.root), tmp_path)
    for split, seeds in (("train", range(12)), ("test", range(12, 18))):
        for i in seeds:
            save_photo(tmp_path / split / ("moth" if i % 2 else "bee") / f"{i}.jpg", seed=i, width=50, height=40)
    for split in ("train", "test"):
        assert main(["embed", str(model), str(tmp_path / split), "--out", str(tmp_path / f"{split}.npz"),
                     "--workers", "2", "--batch-size", "4", "--features", "cls+mean"]) == 0
    data = np.load(tmp_path / "train.npz")
    paths = [Path(p) for p in data["keys"]]
    assert sorted(set(data["labels"])) == ["bee", "moth"] and data["embeddings"].shape == (12, 192)
    assert all(Path(p).parent.name == label for p, label in zip(paths, data["labels"]))
    backbone, meta = load_backbone(model)
    transform = eval_transform(meta["resolution"], meta["normalization"]["mean"], meta["normalization"]["std"])
    np.testing.assert_allclose(data["embeddings"], embed_images(backbone.eval(), paths, transform, 5,
                                                                features="cls+mean").numpy(), atol=1e-5)
    out = tmp_path / "results.json"
    assert main(["eval", "--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz"), "--k", "3",
                 "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"knn", "simpleshot", "retrieval"} and 0 <= results["knn"]["top1"] <= 1


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_wandb_modes(shards, tmp_path, mode) -> None:
    env = {**os.environ, "WANDB_DIR": str(tmp_path / "wandb-home"), "WANDB_SILENT": "true"}
    args = [sys.executable, "-m", "biodino", "train", "tiny", f"data.shards={shards}", f"runs_dir={tmp_path}",
            "name=w", "schedule.epochs=1", "schedule.steps_per_epoch=2", f"logging.wandb={mode}"]
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    runs = list((tmp_path / "w" / "logs" / "wandb").glob("offline-run-*"))
    if mode == "offline":
        wandb_id = (tmp_path / "w" / "wandb_id").read_text().strip()
        assert len(runs) == 1 and runs[0].name.endswith(wandb_id)
    else:
        assert runs == []


def test_export_keeps_architecture_overrides(tmp_path) -> None:
    from biodino.interop.export import TrainingState

    cfg = load_config("tiny", ["model.layer_scale_init=0"])  # LayerScale off: no gamma parameters
    state = TrainingState(build_module(cfg).state_dict(), cfg, 0, tmp_path / "in-memory")
    reloaded, meta = load_backbone(export_backbone(state, tmp_path))
    assert meta["architecture"]["layer_scale_init"] is None
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reloaded.embedding(x), backbone_from_state(state).eval().embedding(x))
