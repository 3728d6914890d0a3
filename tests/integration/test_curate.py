"""``biodino curate`` on a planted pool (``tests/planted_pool.py``) with a tiny backbone trained a few steps on it:
near duplicates removed while distinct images stay, charts excluded by chart examples, a budget rebalancing the
long-tailed concepts; 2 torchrun ranks equal to 1; a killed run resumed without re-embedding; bad input refused
in one line with exit 2 before anything is written; the two Slurm jobs it renders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from biodino.cli.main import main
from tests.planted_pool import CONCEPTS, concept_image, make_pool

ROOT = Path(__file__).resolve().parents[2]
DEDUP = ["--dedup-threshold", "0.9975", "--exclude-examples"]  # the examples folder follows
EXCLUDE = ["--exclude-threshold", "0.85", "--workers", "0"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """The pool, its truth, and a vit_tiny_p8 (LayerScale off: at init, LayerScale's 1e-5 leaves every class
    token alike) trained 8 steps on the pool's shards, exported."""
    from biodino.config.recipe import load_config
    from biodino.data.pack import PackOptions, pack
    from biodino.interop.export import export_backbone, load_training_state
    from biodino.run.trainer import train

    root = tmp_path_factory.mktemp("planted")
    pool = make_pool(root)
    pack([str(root / "pool")], PackOptions(out=root / "shards", prefix="pool", min_side=16, near_threshold=None))
    cfg = load_config("tiny", [f"runs_dir={root / 'runs'}", "name=curate", f"data.shards={root / 'shards/pool.json'}",
                               "model.layer_scale_init=0", "schedule.epochs=1", "schedule.steps_per_epoch=8",
                               "schedule.batch_size=16", "checkpoint.every_n_steps=8"])
    run = train(cfg).run
    return {"pool": pool, "model": export_backbone(load_training_state(run.root), root / "export")}


def _curate(planted: dict, out: Path, *extra: str) -> list[str]:
    pool = planted["pool"]
    return ["curate", str(pool.root / "pool"), "--model", str(planted["model"]), "--out", str(out), *DEDUP,
            str(pool.examples), *EXCLUDE, *extra]


def _kept(out: Path, step: str) -> set[str]:
    keys = json.loads((out / "pool" / "keys.json").read_text())
    with np.load(out / "steps" / f"{step}.npz") as data:
        return {k for k, kept in zip(keys, data["kept"]) if kept}


def test_curation_removes_duplicates_and_charts_then_a_budget_rebalances(planted, tmp_path, capsys) -> None:
    pool, out = planted["pool"], tmp_path / "cur"
    assert main(_curate(planted, out)) == 0
    after_dedup = _kept(out, "near_duplicates")
    pairs = list(pool.copies.items())
    assert sum(not (c in after_dedup and o in after_dedup) for c, o in pairs) / len(pairs) >= 0.9
    assert sum(o in after_dedup for o in pool.originals) / len(pool.originals) >= 0.97
    selected = set((out / "selected.txt").read_text().split())
    assert sum(c not in selected for c in pool.charts) / len(pool.charts) >= 0.85
    assert sum(o in selected for o in pool.originals) / len(pool.originals) >= 0.97  # examples spare the photos
    report = json.loads((out / "report.json").read_text())
    assert report["pool"] == len(pool.originals) + len(pool.copies) + len(pool.charts) == 114
    assert report["near_duplicates"]["removed"] == 114 - len(after_dedup)
    assert report["selected"] == len(selected) == 114 - report["near_duplicates"]["removed"] - \
        report["examples"]["removed"]
    assert all(s["closest_example"].startswith(str(pool.examples)) for s in report["examples"]["exclude"]["charts"]
               ["sample"])
    for plot in ("near_duplicates.png", "exclude-charts.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    embedded, dedup_step = (out / "pool" / "embeddings.npy").stat(), (out / "steps" / "near_duplicates.npz").stat()

    capsys.readouterr()
    assert main(_curate(planted, out, "--budget", "30", "--clusters", "8,4")) == 0  # same folder: a later step
    assert "reused" in capsys.readouterr().err
    assert (out / "pool" / "embeddings.npy").stat().st_mtime_ns == embedded.st_mtime_ns
    assert (out / "steps" / "near_duplicates.npz").stat().st_mtime_ns == dedup_step.st_mtime_ns
    chosen = (out / "selected.txt").read_text().split()
    assert len(chosen) == 30 and set(chosen) <= selected
    concept = {**pool.originals, **{c: pool.originals[o] for c, o in pool.copies.items()}}
    available = {name: sum(concept.get(k) == name for k in selected) for name in CONCEPTS}
    picked = {name: sum(concept.get(k) == name for k in chosen) for name in CONCEPTS}
    assert picked["orchid"] == available["orchid"] == CONCEPTS["orchid"]  # the rarest concept kept whole
    assert picked["moss"] <= available["moss"] / 3  # the most common thinned to a fair share
    sizes = json.loads((out / "report.json").read_text())["sampling"]
    assert 1 <= sizes["smallest_cluster"][0] <= sizes["largest_cluster"][0]  # of the 8 finest clusters, before
    assert 1 <= sizes["smallest_cluster"][1] <= sizes["largest_cluster"][1] < sizes["largest_cluster"][0]  # thinned
    assert (out / "plots" / "cluster_sizes.png").is_file()


def test_include_examples_keep_only_their_concept_and_keep_largest_picks_the_biggest_copy(planted, tmp_path,
                                                                                          capsys) -> None:
    pool, wanted = planted["pool"], tmp_path / "wanted" / "coral"
    wanted.mkdir(parents=True)
    for i in range(4):
        concept_image("coral", 100 + i).save(wanted / f"{i}.png")  # new pictures of the concept, not in the pool
    out = tmp_path / "include"
    assert main(["curate", str(pool.root / "pool"), "--model", str(planted["model"]), "--out", str(out), "--no-dedup",
                 "--include-examples", str(wanted.parent), "--include-threshold", "0.8", "--workers", "0"]) == 0
    selected = set((out / "selected.txt").read_text().split())
    concept = {**pool.originals, **{c: pool.originals[o] for c, o in pool.copies.items()}}
    coral = {k for k, c in concept.items() if c == "coral"}
    assert len(selected & coral) >= 0.9 * len(coral) and len(selected - coral) <= 0.05 * (114 - len(coral))

    images = tmp_path / "sizes"
    images.mkdir()
    small = concept_image("moss", 3)
    small.save(images / "a.png")
    small.resize((144, 144)).save(images / "b.png")  # the same picture, twice the size: the one to keep
    concept_image("beetle", 4).save(images / "c.png")
    out = tmp_path / "largest"
    assert main(["curate", str(images), "--model", str(planted["model"]), "--out", str(out), "--dedup-threshold",
                 "0.9975", "--keep", "largest", "--workers", "0"]) == 0
    assert [Path(k).name for k in (out / "selected.txt").read_text().split()] == ["b.png", "c.png"]


def test_two_ranks_curate_as_one_rank(planted, tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_curate(planted, one, "--part-size", "16", "--budget", "30", "--clusters", "8,4")) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "biodino",
           *_curate(planted, two, "--part-size", "16", "--budget", "30", "--clusters", "8,4")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("114 images") == 1  # rank 0 reports, once
    assert json.loads((one / "pool/keys.json").read_text()) == json.loads((two / "pool/keys.json").read_text())
    np.testing.assert_array_equal(np.load(one / "pool/embeddings.npy"), np.load(two / "pool/embeddings.npy"))
    assert (one / "selected.txt").read_text() == (two / "selected.txt").read_text()


def test_a_killed_curate_resumes_without_reembedding(planted, tmp_path, capsys) -> None:
    """A FIFO named like an image blocks the embedding at the last part, so the kill lands with the earlier parts
    on disk, deterministically; a second run meanwhile is refused, the rerun embeds only that part, and a rerun
    with another threshold embeds nothing."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        concept_image("coral", i).save(images / f"{i}.png")
    os.mkfifo(images / "zz.png")  # sorted last: the third part of 4
    out = tmp_path / "cur"
    cmd = [sys.executable, "-m", "biodino", "curate", str(images), "--model", str(planted["model"]), "--out",
           str(out), "--part-size", "4", "--workers", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    parts = out / "embeddings.npz.parts"
    deadline = time.monotonic() + 120
    while len(list(parts.glob("*.npz"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert len(list(parts.glob("*.npz"))) == 2 and proc.poll() is None, proc.communicate()
    capsys.readouterr()
    assert main(cmd[3:]) == 2 and "is in use by" in capsys.readouterr().err  # a second run meanwhile: refused
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "pool").exists()

    (images / "zz.png").unlink()
    concept_image("coral", 8).save(images / "zz.png")
    capsys.readouterr()
    assert main(cmd[3:]) == 0
    assert "2 parts reused" in capsys.readouterr().err
    embedded = (out / "pool" / "embeddings.npy").stat().st_mtime_ns
    assert main([*cmd[3:], "--dedup-threshold", "0.5"]) == 0
    assert "embeddings of" in capsys.readouterr().err  # "... reused"
    assert (out / "pool" / "embeddings.npy").stat().st_mtime_ns == embedded
    assert json.loads((out / "report.json").read_text())["near_duplicates"]["threshold"] == 0.5


@pytest.mark.parametrize("case", ["empty pool", "not a backbone", "budget over the pool", "unknown category"])
def test_bad_input_is_one_line_and_exit_2_before_anything_is_written(planted, tmp_path, capsys, case) -> None:
    pool, out = planted["pool"], tmp_path / "cur"
    args = _curate(planted, out)
    if case == "empty pool":
        (tmp_path / "empty").mkdir()
        args[1], expected = str(tmp_path / "empty"), "no images in"
    elif case == "not a backbone":
        fake = tmp_path / "model.safetensors"
        fake.write_bytes(b"not a model")
        args[3], expected = str(fake), "model.safetensors"
    elif case == "budget over the pool":
        args, expected = [*args, "--budget", "115"], "larger than the pool (114 images)"
    else:
        args, expected = [*args, "--threshold", "drawings=0.7"], "names no example category: drawings"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err, err
    assert not out.exists()
    assert pool.examples.is_dir()


def test_slurm_curate_renders_the_embedding_then_the_steps_after_it(planted, tmp_path, capsys) -> None:
    args = _curate(planted, tmp_path / "cur", "--budget", "30")
    assert main(["slurm", *args, "--nodes", "4", "--gpus-per-node", "8"]) == 0
    text = capsys.readouterr().out
    first, second = text.split("### job 2 of 2: ")
    assert "#SBATCH --nodes=4" in first and "--embed-only" in first
    assert second.startswith("biodino-curate-cur, submitted with --dependency=afterok:<job of biodino-curate-cur-embed>")
    assert "#SBATCH --nodes=1" in second and "--embed-only" not in second and "--budget 30" in second
    assert "#SBATCH --ntasks-per-node=8" in second
