"""Staged schedules: the tiny Bio-DINO schedule (32 -> 40 -> 48 px) end to end with a real SIGKILL in stage 2,
and the shipped Bio-DINO schedule's values against the published table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from biodino.run.history import read_history
from biodino.config.recipe import ConfigError, load_config
from biodino.checkpoint.run_dir import RunDir
from biodino.run.stages import load_schedule

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "bio_dino_tiny" / "schedule.yaml"



def _start(shards: Path, runs: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "biodino", "train", str(TINY), f"data.shards={shards}", f"runs_dir={runs}"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _pos_tokens(weights: Path) -> int:
    with safe_open(str(weights), "pt") as f:
        return f.get_slice("teacher.backbone.pos_embedding").get_shape()[1]


def test_the_tiny_schedule_runs_its_stages_and_a_killed_stage_resumes_without_redoing_the_first(tiny_shards, tmp_path):
    stages = {s.name: RunDir(tmp_path / f"bio_dino_tiny-{s.name}") for s in load_schedule(str(TINY))}
    proc = _start(tiny_shards, tmp_path)
    deadline = time.time() + 400
    while len(read_history(stages["s2_40"].history)) < 4:  # past stage 2's checkpoint at step 3
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = stages["s1_32"]
    first_files = {p: p.stat().st_mtime_ns for p in first.root.rglob("*") if p.is_file()}
    assert not (stages["s2_40"].root / "final.safetensors").exists()

    proc = _start(tiny_shards, tmp_path)
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err.decode()[-3000:]
    # stage 1 was not redone: no file of its run changed, its history has each step once
    assert {p: p.stat().st_mtime_ns for p in first.root.rglob("*") if p.is_file()} == first_files
    assert len(first.history.read_text().splitlines()) == 6
    assert "bio_dino_tiny-s2_40/checkpoints/step=0000003.ckpt" in err.decode()  # stage 2 resumed from its checkpoint
    for (name, run), size in zip(stages.items(), (32, 40, 48)):
        cfg = load_config(str(run.config))
        assert (cfg.crops.global_size, cfg.name) == (size, f"bio_dino_tiny-{name}")
        assert sorted(read_history(run.history)) == list(range(6))
        assert _pos_tokens(run.root / "final.safetensors") == 1 + (size // 8) ** 2  # class token + patch grid
        sidecar = json.loads((run.root / "export" / "backbone.json").read_text())  # export: last (the default)
        assert (sidecar["provenance"]["step"], sidecar["resolution"]) == (6, size)
    # each later stage started from its predecessor's final full weights
    assert load_config(str(stages["s2_40"].config)).init.full_weights == str(stages["s1_32"].root / "final.safetensors")
    assert load_config(str(stages["s3_48"].config)).init.full_weights == str(stages["s2_40"].root / "final.safetensors")


def test_a_stage_whose_predecessor_has_not_run_is_refused_naming_it(tiny_shards, tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "biodino", "train", str(TINY), "--stage", "s2_40",
                           f"data.shards={tiny_shards}", f"runs_dir={tmp_path}"], capture_output=True, text=True)
    assert proc.returncode == 2 and "run stage 's1_32' first" in proc.stderr


def test_schedule_errors_name_the_problem(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  - {name: a}\n")
    with pytest.raises(ConfigError, match=r"stages\[0\] must have name and recipe"):
        load_schedule(str(bad))
    bad.write_text("name: x\nstage: []\n")
    with pytest.raises(ConfigError, match="unknown schedule keys"):
        load_schedule(str(bad))


def test_the_bio_dino_schedule_has_the_published_values() -> None:
    """configs/bio_dino against the table of the published training commands."""
    s1, s2, s3 = (s.cfg for s in load_schedule(str(ROOT / "configs" / "bio_dino" / "schedule.yaml")))
    table = {  # resolution, local, epochs, steps/epoch, warmup, batch, accumulation, lr, wd, wd_end, momentum,
        # teacher-temp warmup, freeze, strategy
        "s1": (224, 98, 250, 2500, 40, 48, 8, 4e-4, 0.04, 0.2, 0.992, 20, 1, "ddp"),
        "s2": (252, 112, 80, 2500, 0, 40, 8, 1e-4, 0.1, 0.1, 0.998, 15, 0, "fsdp"),
        "s3": (336, 140, 30, 1000, 0, 32, 8, 5e-5, 0.1, 0.1, 0.999, 0, 0, "fsdp"),
    }
    for cfg, expected in zip((s1, s2, s3), table.values()):
        got = (cfg.crops.global_size, cfg.crops.local_size, cfg.schedule.epochs, cfg.schedule.steps_per_epoch,
               cfg.optim.warmup_epochs, cfg.schedule.batch_size, cfg.schedule.accumulate_grad_batches,
               cfg.optim.base_lr, cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.objective.momentum_teacher,
               cfg.objective.warmup_teacher_temp_epochs, cfg.objective.freeze_last_layer_epochs, cfg.trainer.strategy)
        assert got == expected
        assert cfg.trainer.devices == 8 and cfg.global_batch_size == cfg.schedule.batch_size * 8 * 8
        assert (cfg.model.preset, cfg.objective.centering, cfg.objective.ibot.separate_head) == (
            "vit_reg4_so150m_p14_ls", "softmax", True)
        assert cfg.objective.dino.head.num_prototypes == cfg.objective.ibot.head.num_prototypes == 98304
        assert cfg.objective.dino.head.bottleneck_dim == 320 and cfg.optim.clip_grad == 3.0
        assert cfg.optim.min_lr == 1e-6 and cfg.crops.normalize_mean == cfg.crops.normalize_std == (0.5, 0.5, 0.5)
        assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.compile
    assert s2.trainer.fsdp.reshard_after_forward is False and s3.trainer.fsdp.reshard_after_forward is True
    assert s2.trainer.fsdp.param_dtype == s3.trainer.fsdp.param_dtype == "bfloat16"
