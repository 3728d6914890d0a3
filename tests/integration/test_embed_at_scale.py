"""``biodino embed`` as users run it at scale: list files and real tar shards with labels from a JSON field
(single and multi-label), any model source with --teacher/--student, 2 torchrun ranks equal to 1, and a real
kill mid-run resumed from the parts already written (a second run and a changed command refused meanwhile)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import v2 as T

from biodino.cli.main import main
from biodino.config.recipe import load_config
from biodino.data.decode import to_rgb
from biodino.interop.export import TrainingState, backbone_from_state, export_backbone, export_full
from biodino.run.trainer import build_module
from tests.images import jpeg_bytes, photo, save_photo

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """A tiny training state whose teacher differs from its student: its backbone export and full weights."""
    out = tmp_path_factory.mktemp("models")
    cfg = load_config("tiny")
    weights = build_module(cfg).state_dict()
    weights = {k: v + 0.05 * torch.randn_like(v) if k.startswith("teacher.backbone.encoder") else v
               for k, v in weights.items()}
    state = TrainingState(weights, cfg, 7, out / "in-memory")
    return {"state": state, "export": export_backbone(state, out), "full": export_full(state, out / "full.safetensors"),
            "mean": cfg.crops.normalize_mean, "std": cfg.crops.normalize_std}


def expected(backbone, images: list[Image.Image], resolution: int, mean, std) -> np.ndarray:
    """Class tokens computed independently: torchvision's float pipeline, one image at a time."""
    tf = T.Compose([T.ToImage(), T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                    T.CenterCrop(resolution), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])
    with torch.no_grad():
        return torch.cat([backbone.eval().forward_features(tf(to_rgb(im))[None]).cls for im in images]).numpy()


def write_shards(folder: Path, samples: list[dict]) -> str:
    """Real WebDataset tar shards of 4 samples each; returns their glob."""
    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "s-%04d.tar"), maxcount=4, verbose=0) as sink:
        for s in samples:
            sink.write(s)
    return str(folder / "s-*.tar")


def test_list_files_and_shards_with_labels_from_a_json_field(models, tmp_path, capsys) -> None:
    files = [save_photo(tmp_path / "img" / f"{i}.jpg", seed=i, width=50, height=40) for i in range(5)]
    (tmp_path / "list.txt").write_text("# path<TAB>label\n" + "".join(f"img/{f.name}\t{'bee' if i % 2 else 'moth'}\n"
                                                                      for i, f in enumerate(files)))
    pics = [photo(100 + i, 48, 40) for i in range(8)]
    samples = [{"__key__": f"k{i:02d}", "jpg": jpeg_bytes(pics[i]),
                "json": json.dumps({"taxon": {"species": f"sp{i % 3}"}, "traits": ["wings", "red"][: i % 3]})}
               for i in range(8)]
    samples[3]["json"] = json.dumps({"taxon": {}})  # no label: skipped, named
    samples[6]["jpg"] = b"\xff\xd8 broken"
    glob = write_shards(tmp_path / "shards", samples)
    out = tmp_path / "e.npz"
    assert main(["embed", str(models["export"]), str(tmp_path / "list.txt"), glob, "--label-key", "taxon.species",
                 "--out", str(out), "--part-size", "2", "--batch-size", "3", "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "skipped k03: no 'taxon.species' in its JSON" in err and "skipped k06: not an image" in err
    data = np.load(out)
    kept = [i for i in range(8) if i not in (3, 6)]
    assert list(data["keys"]) == [str(f) for f in files] + [f"k{i:02d}" for i in kept]
    assert list(data["labels"]) == ["moth", "bee", "moth", "bee", "moth"] + [f"sp{i % 3}" for i in kept]
    backbone = backbone_from_state(models["state"], "teacher")
    images = [Image.open(f) for f in files] + [Image.open(io.BytesIO(samples[i]["jpg"])) for i in kept]
    np.testing.assert_allclose(data["embeddings"], expected(backbone, images, 32, models["mean"], models["std"]),
                               atol=2e-5)
    assert (tmp_path / "e.npz.skipped.tsv").read_text().count("\n") == 2
    assert not (tmp_path / "e.npz.parts").exists()

    # trait sets: a multi-hot (n, traits) array with the trait names, from the shards alone, as parquet too
    assert main(["embed", str(models["export"]), glob, "--label-key", "traits", "--out", str(tmp_path / "t.npz")]) == 0
    traits = np.load(tmp_path / "t.npz")
    assert list(traits["label_names"]) == ["red", "wings"]
    want = [["wings", "red"][: i % 3] for i in range(8) if i not in (3, 6)]
    assert traits["labels"].tolist() == [[int("red" in w), int("wings" in w)] for w in want]
    pq = pytest.importorskip("pyarrow.parquet")
    assert main(["embed", str(models["export"]), glob, "--label-key", "traits", "--out", str(tmp_path / "t.parquet")]) == 0
    table = pq.read_table(tmp_path / "t.parquet").to_pydict()
    assert table["key"] == list(traits["keys"]) and [sorted(v) for v in table["label"]] == [sorted(w) for w in want]
    np.testing.assert_allclose(np.stack(table["embedding"]), traits["embeddings"])


def test_student_or_teacher_of_full_weights_and_usage_errors(models, tmp_path, capsys) -> None:
    pics = [photo(i, 40, 40) for i in range(3)]
    for i, p in enumerate(pics):
        p.save(tmp_path / f"{i}.png")
    for network in ("student", "teacher"):
        out = tmp_path / f"{network}.npz"
        assert main(["embed", str(models["full"]), str(tmp_path / "0.png"), str(tmp_path / "1.png"),
                     str(tmp_path / "2.png"), f"--{network}", "--out", str(out), "--workers", "0"]) == 0
        np.testing.assert_allclose(np.load(out)["embeddings"],
                                   expected(backbone_from_state(models["state"], network), pics, 32, models["mean"],
                                            models["std"]), atol=2e-5)
    assert not np.allclose(np.load(tmp_path / "student.npz")["embeddings"], np.load(tmp_path / "teacher.npz")["embeddings"])
    capsys.readouterr()
    for args, message in (([str(models["export"]), str(tmp_path / "0.png"), "--student"], "is a backbone export"),
                          ([str(models["export"]), str(tmp_path / "nowhere")], "input not found"),
                          ([str(models["export"]), str(tmp_path / "none-*.tar")], "no shards match"),
                          ([str(models["export"]), str(tmp_path / "0.png"), "--resolution", "30"], "multiple of"),
                          ([str(tmp_path / "0.png"), str(tmp_path / "0.png")], str(tmp_path / "0.png"))):
        assert main(["embed", *args, "--out", str(tmp_path / "x.npz")]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "x.npz.parts").exists()


def _classes(root: Path, per_class: int = 6) -> Path:
    for j, c in enumerate(("ant", "bee")):
        for i in range(per_class):
            save_photo(root / c / f"{i}.jpg", seed=10 * j + i, width=40, height=36)  # hash() varies by process
    return root


def _embed_cmd(model: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "biodino", "embed", str(model), *args]


def test_two_torchrun_ranks_write_what_one_rank_writes(models, tmp_path) -> None:
    images = _classes(tmp_path / "images", per_class=7)
    common = ["--part-size", "3", "--workers", "0", "--features", "cls+mean"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(_embed_cmd(models["export"], str(images), "--out", str(tmp_path / "one.npz"), *common),
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "biodino", "embed", str(models["export"]), str(images), "--out",
                          str(tmp_path / "two.npz"), *common], capture_output=True, text=True, env=env, timeout=300,
                         cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("14 embeddings of size 192, 2 classes") == 1  # rank 0 reports, once
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert list(a["keys"]) == list(b["keys"]) and len(set(b["keys"])) == 14
    assert list(a["labels"]) == list(b["labels"])
    np.testing.assert_allclose(a["embeddings"], b["embeddings"], atol=1e-5)
    assert not (tmp_path / "two.npz.parts").exists()


def test_a_killed_embed_resumes_from_its_parts(models, tmp_path, capsys) -> None:
    """A FIFO named like an image blocks the reader at the last part: the earlier parts are on disk when the
    process is killed, deterministically."""
    images = _classes(tmp_path / "images")  # 12 images: parts of 4 are ant 0-3, ant 4-5 + bee 0-1, bee 2-5
    os.mkfifo(images / "zz.jpg")  # sorted last: a fourth part of its own
    out, parts = tmp_path / "e.npz", tmp_path / "e.npz.parts"
    args = [str(images), "--out", str(out), "--part-size", "4", "--workers", "0"]
    proc = subprocess.Popen(_embed_cmd(models["export"], *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(parts.glob("*.npz"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert len(list(parts.glob("*.npz"))) == 3 and proc.poll() is None, proc.communicate()
    second = subprocess.run(_embed_cmd(models["export"], *args), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "is in use by" in second.stderr
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()

    capsys.readouterr()  # the reruns in this process: the killed one is gone, its parts stay
    assert main(["embed", str(models["export"]), *args, "--features", "mean"]) == 2
    assert "differs in features" in capsys.readouterr().err and not out.exists()

    (images / "zz.jpg").unlink()
    save_photo(images / "zz.jpg", seed=99, width=40, height=36)
    assert main(["embed", str(models["export"]), *args]) == 0
    assert "3 parts reused" in capsys.readouterr().out
    fresh = tmp_path / "fresh.npz"
    assert main(["embed", str(models["export"]), str(images), "--out", str(fresh), "--part-size", "5"]) == 0
    a, b = np.load(out), np.load(fresh)
    assert list(a["keys"]) == list(b["keys"]) and len(a["keys"]) == 13
    np.testing.assert_allclose(a["embeddings"], b["embeddings"], atol=1e-5)
    assert not parts.exists()


def test_eval_with_a_model_embeds_first_and_equals_embed_then_eval(models, tmp_path, capsys) -> None:
    train, test = _classes(tmp_path / "train"), _classes(tmp_path / "test", per_class=3)
    for split, folder in (("train", train), ("test", test)):
        assert main(["embed", str(models["full"]), str(folder), "--out", str(tmp_path / f"{split}.npz")]) == 0
    assert main(["eval", "--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz"), "--k", "3",
                 "--json", str(tmp_path / "two_steps.json")]) == 0
    capsys.readouterr()
    kept = tmp_path / "kept"
    assert main(["eval", "--model", str(models["full"]), "--train-data", str(train), "--test-data", str(test),
                 "--k", "3", "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"),
                 "--embeddings", str(kept), "--workers", "0"]) == 0
    assert "12 embeddings of size 96, 2 classes" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads((tmp_path / "two_steps.json").read_text())
    assert (tmp_path / "r.md").read_text().startswith("| protocol | metric | value |")
    np.testing.assert_array_equal(np.load(kept / "test.npz")["embeddings"], np.load(tmp_path / "test.npz")["embeddings"])
    for args, message in ((["--train", "a.npz", "--model", "m"], "give --train and --test (embedding files) or"),
                          (["--model", str(models["full"]), "--train-data", str(train)], "--model needs --train-data and"),
                          ([], "--train and --test are required")):
        assert main(["eval", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
