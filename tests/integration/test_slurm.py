"""`biodino slurm` and training under a real Slurm controller started here (tests/slurm_cluster.py): a 2-node
FSDP2 job over gloo, and a job preempted with SIGUSR1 that saves, requeues itself and finishes identically."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

from biodino.run.history import read_history
from biodino.checkpoint.run_dir import RunDir
from biodino.config.recipe import load_config
from biodino.run.slurm import Allocation, recipe_args, render
from biodino.cli.main import main
from tests.images import save_photo
from tests.slurm_cluster import LocalSlurm, cannot_run_reason

ROOT = Path(__file__).resolve().parents[2]


def directives(script: str) -> dict[str, str]:
    """``#SBATCH --key=value`` lines as {key: value} (flags map to "")."""
    found = re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", script, flags=re.M)
    return {k: v for k, v in found}


def test_the_rendered_script_for_4_nodes_of_8_gpus(tmp_path) -> None:
    alloc = Allocation(nodes=4, gpus_per_node=8, partition="gpu", time="48:00:00", account="bio")
    script = render(load_config("tiny"), recipe_args("tiny", ["schedule.batch_size=32"]), alloc, workdir=tmp_path)
    assert directives(script) == {
        "job-name": "biodino-tiny", "nodes": "4", "ntasks-per-node": "8", "gpus-per-node": "8",
        "cpus-per-task": "3", "signal": "USR1@120", "requeue": "", "open-mode": "append", "output": "%x-%j.out",
        "chdir": str(tmp_path), "partition": "gpu", "time": "48:00:00", "account": "bio"}
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert srun == [f"srun --kill-on-bad-exit=1 {sys.executable} -m biodino train tiny schedule.batch_size=32 trainer.num_nodes=4 "
                    "trainer.devices=8"]
    assert 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell


def test_the_hand_editable_example_is_valid_shell() -> None:
    script = (ROOT / "slurm" / "train.sbatch").read_text()
    assert {"signal", "requeue", "open-mode", "ntasks-per-node"} <= directives(script).keys()
    subprocess.run(["bash", "-n", str(ROOT / "slurm" / "train.sbatch")], check=True)


def test_slurm_cli_refuses_a_bad_key_with_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "biodino", "slurm", "tiny", "--nodes", "2", "--gpus-per-node", "4",
                           "trainer.bogus=1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "bogus" in proc.stderr and proc.stdout == ""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = cannot_run_reason()
    if reason:
        pytest.skip(f"no local Slurm cluster: {reason}")
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield slurm
    slurm.stop()



@pytest.fixture
def submitted(cluster, tmp_path, monkeypatch, capsys):
    """``biodino slurm ARGS --submit`` run by ``main`` here (no interpreter to start while jobs compete for the
    CPUs), its sbatch pointed at the test cluster and started in ``tmp_path``; returns what it printed."""
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> str:
        capsys.readouterr()
        assert main(["slurm", *args, "--submit"]) == 0, capsys.readouterr().err
        return capsys.readouterr().out.strip()
    return run


def _tiny_fsdp(shards: Path, workdir: Path, name: str) -> list[str]:
    """`biodino slurm` arguments for 2 nodes x 1 CPU task, FSDP2 over gloo, 12 steps."""
    return ["tiny", "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "2", f"data.shards={shards}",
            f"runs_dir={workdir / 'runs'}", f"name={name}", "trainer.strategy=fsdp", "schedule.epochs=3",
            "schedule.steps_per_epoch=4", "checkpoint.every_n_steps=5"]


def test_a_preempted_job_requeues_and_finishes_like_an_uninterrupted_one(cluster, submitted, tiny_shards,
                                                                         tmp_path) -> None:
    plain = submitted(*_tiny_fsdp(tiny_shards, tmp_path, "plain"))
    preempted = submitted(*_tiny_fsdp(tiny_shards, tmp_path, "preempted"))
    run = RunDir(tmp_path / "runs" / "preempted")
    deadline = time.time() + 300
    while len(read_history(run.history)) < 3:
        assert time.time() < deadline, cluster.job(preempted)
        time.sleep(0.1)
    cluster.run("scancel", "--signal=USR1", preempted)

    for job in (plain, preempted):
        info = cluster.wait(job)
        assert info["ExitCode"] == "0:0", (info, cluster.logs())
    assert cluster.job(plain)["Restarts"] == "0"
    assert cluster.job(preempted)["Restarts"] == "1"
    log = (tmp_path / f"biodino-preempted-{preempted}.out").read_text()
    saved = re.search(r"SIGUSR1: saved step (\d+); requeueing job", log)
    assert saved and 3 <= int(saved.group(1)) < 12, log[-3000:]
    restored = re.search(r"Restored all states from the checkpoint at \S+/step=(\d+)\.ckpt", log)
    assert restored and restored.group(1) == f"{int(saved.group(1)):07d}", log[-3000:]  # the save on SIGUSR1

    # (1) the 2-node job trained with FSDP2: its checkpoints hold one shard per rank
    newest = RunDir(tmp_path / "runs" / "plain").newest_checkpoint()
    assert newest.name == "step=0000012.ckpt"
    assert sorted(p.name for p in newest.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # (2) the requeued run finished all steps with the losses of the uninterrupted one
    expected, resumed = read_history(tmp_path / "runs" / "plain" / "logs" / "history.jsonl"), read_history(run.history)
    assert sorted(resumed) == sorted(expected) == list(range(12))
    for step in range(12):
        for key in ("loss/total", "loss/dino", "loss/ibot", "loss/koleo"):
            assert resumed[step][key] == expected[step][key], (step, key)


def test_eval_jobs_render_after_each_stage_on_one_gpu(tmp_path, capsys, monkeypatch) -> None:
    for split in ("train", "test"):
        save_photo(tmp_path / split / "ant" / "0.jpg", seed=1)
    monkeypatch.chdir(tmp_path)
    tiny = ROOT / "configs" / "bio_dino_tiny" / "schedule.yaml"
    assert main(["slurm", str(tiny), "--nodes", "2", "--gpus-per-node", "8", "--eval",
                 f"{tmp_path / 'train'},{tmp_path / 'test'}", "--eval-protocol", "knn,linear",
                 f"runs_dir={tmp_path / 'runs'}"]) == 0
    proc = capsys.readouterr()
    headers = re.findall(r"^### job (\d) of 6: (\S+?)(?:, submitted with --dependency=afterok:<job of (\S+)>)?$",
                         proc.out, flags=re.M)
    assert headers == [("1", "bio_dino_tiny-s1_32", ""), ("2", "bio_dino_tiny-s1_32:eval", "bio_dino_tiny-s1_32"),
                       ("3", "bio_dino_tiny-s2_40", "bio_dino_tiny-s1_32"),
                       ("4", "bio_dino_tiny-s2_40:eval", "bio_dino_tiny-s2_40"),
                       ("5", "bio_dino_tiny-s3_48", "bio_dino_tiny-s2_40"),
                       ("6", "bio_dino_tiny-s3_48:eval", "bio_dino_tiny-s3_48")]
    evaluation = proc.out.split("### job 2 of 6")[1].split("### job 3 of 6")[0]
    assert {k: v for k, v in directives(evaluation).items() if k in ("nodes", "ntasks-per-node", "gpus-per-node")} == {
        "nodes": "1", "ntasks-per-node": "1", "gpus-per-node": "1"}
    run = tmp_path / "runs" / "bio_dino_tiny-s1_32"
    assert (f"-m biodino eval --model {run / 'export' / 'backbone.safetensors'} --train-data {tmp_path / 'train'} "
            f"--test-data {tmp_path / 'test'} --protocol knn,linear") in evaluation
    assert f"--json {run / 'results.json'} --markdown {run / 'results.md'}" in evaluation
    assert main(["slurm", str(tiny), "--nodes", "1", "--gpus-per-node", "0", "--eval", str(tmp_path / "train")]) == 2
    assert "--eval must be TRAIN_DATA,TEST_DATA" in capsys.readouterr().err


def test_a_schedule_is_one_job_per_stage_each_after_the_previous_succeeded(cluster, submitted, tiny_shards,
                                                                          tmp_path) -> None:
    """Two stages of the tiny Bio-DINO schedule as a chain: the second job starts only once the first completed;
    after each, an evaluation job writes the stage's results beside its weights."""
    tiny = ROOT / "configs" / "bio_dino_tiny"
    schedule = tmp_path / "two_stages.yaml"
    schedule.write_text(f"name: chain\nstages:\n  - {{name: a, recipe: {tiny / 'stage1.yaml'}}}\n"
                        f"  - {{name: b, recipe: {tiny / 'stage2.yaml'}}}\n")
    for k, (split, count) in enumerate((("train", 4), ("test", 2))):
        for j, c in enumerate(("ant", "bee")):
            for i in range(count):
                save_photo(tmp_path / split / c / f"{i}.jpg", seed=100 * k + 10 * j + i, width=48, height=40)
    out = submitted(str(schedule), "--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "1", "--eval",
                    f"{tmp_path / 'train'},{tmp_path / 'test'}", "--eval-protocol", "knn,retrieval",
                    f"data.shards={tiny_shards}", f"runs_dir={tmp_path / 'runs'}")
    jobs = dict(reversed(line.split()) for line in out.splitlines())
    assert list(jobs) == ["chain-a", "chain-a:eval", "chain-b", "chain-b:eval"]
    assert cluster.job(jobs["chain-b"])["Dependency"] == f"afterok:{jobs['chain-a']}(unfulfilled)"
    assert cluster.job(jobs["chain-b:eval"])["Dependency"] == f"afterok:{jobs['chain-b']}(unfulfilled)"
    done = {name: cluster.wait(job) for name, job in jobs.items()}
    assert all(info["ExitCode"] == "0:0" for info in done.values()), (done, cluster.logs())
    assert done["chain-b"]["StartTime"] >= done["chain-a"]["EndTime"]  # ISO timestamps order as strings
    assert done["chain-a:eval"]["StartTime"] >= done["chain-a"]["EndTime"]
    for stage in ("chain-a", "chain-b"):
        run = tmp_path / "runs" / stage
        assert (run / "final.safetensors").is_file() and (run / "results.md").is_file()
        local = tmp_path / f"{stage}.json"  # the same evaluation, run here on the stage's export
        assert main(["eval", "--model", str(run / "export" / "backbone.safetensors"), "--train-data",
                     str(tmp_path / "train"), "--test-data", str(tmp_path / "test"), "--protocol", "knn,retrieval",
                     "--json", str(local)]) == 0
        assert json.loads((run / "results.json").read_text()) == json.loads(local.read_text())


def test_an_embedding_job_on_two_nodes_writes_what_one_local_rank_writes(cluster, submitted, tmp_path) -> None:
    """`biodino slurm embed` on 2 nodes x 1 task: srun's ranks (Lightning's Slurm environment) split the parts,
    rank 0 merges; the same embeddings as one process here."""
    import numpy as np

    model = _tiny_export(tmp_path)
    for j, c in enumerate(("ant", "bee")):
        for i in range(5):
            save_photo(tmp_path / "images" / c / f"{i}.jpg", seed=10 * j + i, width=48, height=40)
    args = [str(model), str(tmp_path / "images"), "--part-size", "2", "--workers", "0"]
    info = cluster.wait(submitted("embed", *args, "--out", str(tmp_path / "two.npz"), "--nodes", "2",
                                  "--gpus-per-node", "0", "--cpus-per-task", "1"))
    assert info["ExitCode"] == "0:0", (info, cluster.logs())
    assert main(["embed", *args, "--out", str(tmp_path / "one.npz")]) == 0
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert list(one["keys"]) == list(two["keys"]) and list(one["labels"]) == list(two["labels"])
    np.testing.assert_allclose(one["embeddings"], two["embeddings"], atol=1e-5)
    log = next(tmp_path.glob("biodino-embed-two-*.out")).read_text()
    assert log.count("10 embeddings of size 96, 2 classes") == 1  # rank 0 of 2 reports
    assert "rank 0 of 2: 3 of the 5 parts" in log and "rank 1 of 2: 2 of the 5 parts" in log


def test_a_curation_embeds_on_two_nodes_then_its_steps_job_goes_on_from_the_pool(cluster, submitted,
                                                                                   tmp_path) -> None:
    """`biodino slurm curate`: the embedding job on 2 nodes x 1 task, then (afterok) the steps job on one node,
    which reuses the pool; the same pool and selection as one local `biodino curate`."""
    import numpy as np
    from PIL import Image

    model = _tiny_export(tmp_path)
    for j, c in enumerate(("ant", "bee")):
        for i in range(5):
            save_photo(tmp_path / "images" / c / f"{i}.jpg", seed=10 * j + i, width=48, height=40)
    Image.open(tmp_path / "images" / "ant" / "0.jpg").resize((40, 33)).save(tmp_path / "images" / "ant" / "copy.png")
    args = [str(tmp_path / "images"), "--model", str(model), "--dedup-threshold", "0.99", "--budget", "6",
            "--clusters", "3", "--part-size", "3", "--workers", "0"]
    out = submitted("curate", *args, "--out", str(tmp_path / "cur"), "--nodes", "2", "--gpus-per-node", "0",
                    "--cpus-per-task", "1")
    jobs = dict(reversed(line.split()) for line in out.splitlines())
    assert list(jobs) == ["biodino-curate-cur-embed", "biodino-curate-cur"]
    embed_job = jobs["biodino-curate-cur-embed"]
    assert cluster.job(jobs["biodino-curate-cur"])["Dependency"].startswith(f"afterok:{embed_job}")
    done = {name: cluster.wait(job) for name, job in jobs.items()}
    assert all(info["ExitCode"] == "0:0" for info in done.values()), (done, cluster.logs())
    assert done["biodino-curate-cur-embed"]["NumNodes"] == "2" and done["biodino-curate-cur"]["NumNodes"] == "1"
    report = json.loads((tmp_path / "cur" / "report.json").read_text())
    assert report["embedding"]["pool_reused"] is True and report["pool"] == 11  # embedded by the first job only
    assert [[Path(k).name for k in g] for g in report["near_duplicates"]["largest_groups"]] == [["0.jpg", "copy.png"]]
    assert main(["curate", *args, "--out", str(tmp_path / "local")]) == 0
    for name in ("pool/keys.json", "selected.txt"):
        assert (tmp_path / "cur" / name).read_text() == (tmp_path / "local" / name).read_text(), name
    np.testing.assert_allclose(np.load(tmp_path / "cur" / "pool" / "embeddings.npy").astype(np.float32),
                               np.load(tmp_path / "local" / "pool" / "embeddings.npy").astype(np.float32), atol=2e-3)
    assert len((tmp_path / "cur" / "selected.txt").read_text().split()) == 6


def _tiny_export(folder: Path) -> Path:
    """A backbone export of the tiny recipe's network at initialization, without LayerScale (whose 1e-5 at
    initialization gives every image nearly the same class token)."""
    from biodino.interop.export import TrainingState, export_backbone
    from biodino.run.trainer import build_module

    cfg = load_config("tiny", ["model.layer_scale_init=0"])
    return export_backbone(TrainingState(build_module(cfg).state_dict(), cfg, 0, folder / "mem"), folder)
