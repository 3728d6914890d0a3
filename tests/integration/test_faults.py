"""Long runs that survive their faults, with real processes: SIGKILL at checkpoints of every kind, SIGTERM and
SIGINT, two runs on one directory, damaged checkpoints, a full disk, and a staged schedule's wandb runs."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from biodino.checkpoint.integrity import verify
from biodino.run.checkpointing import resumable_checkpoint
from biodino.run.history import read_history
from biodino.checkpoint.run_dir import RunDir
from biodino.checkpoint.safe_load import CheckpointError

# 3 epochs of 5 steps, periodic saves every 3 steps: periodic saves at 3, 6, 9, 12, epoch-end saves at 5, 10, 15.
RUN = ["schedule.epochs=3", "schedule.steps_per_epoch=5", "checkpoint.every_n_steps=3", "checkpoint.keep_last=4",
       "trainer.log_every_n_steps=1"]
KEYS = ("loss/total", "loss/dino", "loss/ibot", "loss/koleo", "lr", "wd", "momentum", "grad_norm")


def _start(shards: Path, runs: Path, name: str, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "biodino", "train", "tiny", f"data.shards={shards}", f"runs_dir={runs}",
            f"name={name}", *RUN, *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, code: int = 0) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-3000:]
    return err


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "condition never met"
        time.sleep(0.005)


def _kill_when(proc: subprocess.Popen, condition) -> None:
    """SIGKILL the whole process group (trainer and data workers) as soon as ``condition()`` holds."""
    _wait_for(proc, condition)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _saved(run: RunDir, step: int):
    return lambda: (run.checkpoints / f"step={step:07d}.ckpt").exists()


def _assert_same_steps(run: RunDir, reference: RunDir) -> None:
    """Every step of the uninterrupted run, no other, with bit-equal losses and schedules."""
    expected, got = read_history(reference.history), read_history(run.history)
    assert sorted(got) == sorted(expected) == list(range(15))
    for step in expected:
        for key in KEYS:
            assert got[step][key] == expected[step][key], (step, key)


@pytest.fixture(scope="module")
def reference(tiny_shards, tmp_path_factory) -> RunDir:
    runs = tmp_path_factory.mktemp("reference")
    _finish(_start(tiny_shards, runs, "ref"))
    return RunDir(runs / "ref")


@pytest.mark.parametrize("kind,step", [("periodic", 3), ("epoch end", 5)])
def test_resume_from_a_checkpoint_of_each_kind_ends_like_an_uninterrupted_run(tiny_shards, reference, tmp_path,
                                                                              kind, step) -> None:
    run = RunDir(tmp_path / "k")
    proc = _start(tiny_shards, tmp_path, "k")
    _kill_when(proc, _saved(run, step))
    assert run.newest_checkpoint().name == f"step={step:07d}.ckpt", kind
    logged_before = (run.logs / "metrics.csv").read_text().splitlines()
    _finish(_start(tiny_shards, tmp_path, "k"))
    _assert_same_steps(run, reference)
    assert RunDir(run.root).newest_checkpoint().name == "step=0000015.ckpt"
    after = (run.logs / "metrics.csv").read_text().splitlines()
    before_rows, after_rows = list(csv.DictReader(logged_before)), list(csv.DictReader(after))
    assert before_rows and all(row.items() <= new.items() for row, new in zip(before_rows, after_rows))  # kept
    steps = {int(r["step"]) for r in after_rows if r["loss/total"]}
    assert steps == set(range(15))  # every step logged (log_every_n_steps=1), those before the kill included


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_saves_at_a_step_boundary_exits_nonzero_and_resumes_exactly(tiny_shards, reference, tmp_path,
                                                                                  signum, code) -> None:
    run = RunDir(tmp_path / "s")
    proc = _start(tiny_shards, tmp_path, "s")
    _wait_for(proc, lambda: len(read_history(run.history)) >= 7)
    os.killpg(proc.pid, signum)  # to the whole group, as Slurm and Ctrl-C do: the data workers ignore it
    err = _finish(proc, code)
    saved = run.newest_checkpoint()
    step = int(saved.name[5:12])
    assert step >= 7 and len(read_history(run.history)) == step  # saved exactly where it stopped
    assert f"stopped by {signal.Signals(signum).name}" in err and "Traceback" not in err
    verify(saved)
    _finish(_start(tiny_shards, tmp_path, "s"))
    _assert_same_steps(run, reference)


def test_a_second_run_on_the_same_directory_is_refused_naming_the_holder(tiny_shards, tmp_path) -> None:
    run = RunDir(tmp_path / "busy")
    first = _start(tiny_shards, tmp_path, "busy")
    _wait_for(first, lambda: run.history.exists())
    config = run.config.read_bytes()
    second = _start(tiny_shards, tmp_path, "busy", "optim.base_lr=0.5")
    err = _finish(second, 2)
    assert err.strip().splitlines() == [f"biodino train: error: {run.root} is in use by host {os.uname().nodename} "
                                        f"pid {first.pid}; wait for it to end or use another name/runs_dir"]
    assert run.config.read_bytes() == config
    _finish(first)
    assert read_history(run.history).keys() == set(range(15))
    assert (run.root / ".lock").read_text() == ""  # released: the next run may start
    history = run.history.read_bytes()
    from biodino.cli.main import main  # in this process: the lock is free, no second interpreter needed
    assert main(["train", "tiny", f"data.shards={tiny_shards}", f"runs_dir={tmp_path}", "name=busy", *RUN]) == 0
    assert run.history.read_bytes() == history  # a finished run started again trains nothing more


def _damage(reference: RunDir, tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "ref")
    shutil.copytree(reference.root, run.root)
    newest, second = run.checkpoints_newest_first()[:2]
    assert (newest.name, second.name) == ("step=0000015.ckpt", "step=0000012.ckpt")
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated: a full disk, a dying node
    data = bytearray(second.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit: torch.load alone would not notice
    second.write_bytes(bytes(data))
    return run


def test_damaged_newest_checkpoints_are_skipped_with_a_warning(tiny_shards, reference, tmp_path) -> None:
    run = _damage(reference, tmp_path)
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        verify(run.checkpoints / "step=0000012.ckpt")
    proc = subprocess.Popen([sys.executable, "-m", "biodino", "train", str(run.config), f"data.shards={tiny_shards}",
                             f"runs_dir={tmp_path}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipping checkpoint")]
    assert len(warnings) == 2 and "step=0000015.ckpt" in warnings[0] and "step=0000012.ckpt" in warnings[1]
    _assert_same_steps(run, reference)  # resumed from step 9 and redid 9..14 identically
    assert resumable_checkpoint(run).name == "step=0000015.ckpt"


def test_no_usable_checkpoint_exits_2_naming_each(tiny_shards, reference, tmp_path, capsys) -> None:
    from biodino.cli.main import main

    run = _damage(reference, tmp_path)
    for ckpt in run.checkpoints_newest_first()[2:]:
        ckpt.write_bytes(b"")
    assert main(["train", str(run.config), f"data.shards={tiny_shards}", f"runs_dir={tmp_path}"]) == 2
    *warnings, error = capsys.readouterr().err.strip().splitlines()
    assert error.startswith(f"biodino train: error: no usable checkpoint in {run.checkpoints}")
    names = ("step=0000015.ckpt", "step=0000012.ckpt", "step=0000010.ckpt", "step=0000009.ckpt")
    assert all(name in error for name in names) and len(warnings) == 4
    assert all(w.startswith(f"warning: skipping checkpoint {name}") for w, name in zip(warnings, names))
    assert [p.name for p in run.checkpoints_newest_first()][:2] == ["step=0000015.ckpt", "step=0000012.ckpt"]


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB tmpfs: room for the run, not for what the test then fills it with."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_says_so_in_one_line_and_keeps_the_previous_checkpoints(tiny_shards, small_disk) -> None:
    run = RunDir(small_disk / "full")
    proc = _start(tiny_shards, small_disk, "full", "checkpoint.every_n_steps=2", "logging.plots=false")
    _wait_for(proc, _saved(run, 2))
    free = shutil.disk_usage(small_disk).free
    with open(small_disk / "filler", "wb") as f:  # leave room for log lines, not for a 7 MB checkpoint
        f.write(b"\0" * (free - 512 * 1024))
    err = _finish(proc, 1)
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("biodino train: error: no space left on device: ") and str(run.root) in last, err[-2000:]
    assert not list(run.checkpoints.glob(".*")), "a partial file was left behind"
    kept = run.checkpoints_newest_first()
    assert kept and kept[0].name in {"step=0000002.ckpt", "step=0000004.ckpt"}
    for ckpt in kept:
        verify(ckpt)


def test_a_schedule_logs_each_stage_to_its_own_wandb_run(tiny_shards, tmp_path) -> None:
    schedule = tmp_path / "two.yaml"
    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    schedule.write_text(f"name: two\nstages:\n  - {{name: a, recipe: {tiny}}}\n  - {{name: b, recipe: {tiny}}}\n")
    env = {**os.environ, "WANDB_DIR": str(tmp_path / "wandb-home"), "WANDB_SILENT": "true"}
    args = [sys.executable, "-m", "biodino", "train", str(schedule), f"data.shards={tiny_shards}",
            f"runs_dir={tmp_path / 'runs'}", "logging.wandb=offline", "schedule.epochs=1", "schedule.steps_per_epoch=2"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = []
    for stage in ("a", "b"):
        root = tmp_path / "runs" / f"two-{stage}"
        run_id = (root / "wandb_id").read_text().strip()
        offline = list((root / "logs" / "wandb").glob("offline-run-*"))
        assert [p.name.rsplit("-", 1)[1] for p in offline] == [run_id], stage  # its own run, in its own directory
        ids.append(run_id)
    assert ids[0] != ids[1]


def test_a_full_disk_during_a_sharded_save_fails_cleanly_on_every_rank(tiny_shards, small_disk) -> None:
    """Two FSDP2 ranks over gloo: torch's distributed checkpoint re-raises the ranks' write errors as text, so the
    full disk is recognized by the free space left; no rank hangs and the partial directory is removed."""
    run = RunDir(small_disk / "sharded")
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "biodino", "train", "tiny",
            f"data.shards={tiny_shards}", f"runs_dir={small_disk}", "name=sharded", "trainer.strategy=fsdp",
            "trainer.devices=2", *RUN, "checkpoint.every_n_steps=2", "logging.plots=false"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(proc, lambda: (run.checkpoints / "step=0000002.ckpt").is_dir())
    with open(small_disk / "filler", "wb") as f:
        f.write(b"\0" * (shutil.disk_usage(small_disk).free - 600 * 1024))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    # one line per rank; the two ranks write to one pipe, so their lines may run together
    assert err.count(f"biodino train: error: no space left on device: {run.checkpoints}/") == 2, err[-3000:]
    assert not list(run.checkpoints.glob(".*")), "a partial checkpoint directory was left behind"
    kept = run.checkpoints_newest_first()
    assert kept[0].name in {"step=0000002.ckpt", "step=0000004.ckpt"}
    for ckpt in kept:
        verify(ckpt)
