"""``biodino pack``: curation counts exactly as planted, shards readable by plain webdataset, determinism."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from biodino.data.pack import OutputNotEmptyError, PackOptions, pack
from tests.images import jpeg_bytes, photo, save_photo

PLANTED = {"inputs": 21, "unreadable": 0, "undecodable": 2, "too_small": 2, "exact_duplicates": 2,
           "near_duplicates": 2, "kept": 13, "written": 15, "unreadable_paths": []}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    photos = root / "photos"
    originals = [save_photo(photos / f"a{i:02d}.jpg", seed=i) for i in range(12)]
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (photos / "truncated.jpg").write_bytes(originals[0].read_bytes()[:600])
    save_photo(photos / "tiny1.jpg", seed=100, width=20, height=20)
    save_photo(photos / "tiny2.jpg", seed=101, width=63, height=80)
    shutil.copy(originals[1], photos / "z_copy1.jpg")
    (photos / "sub").mkdir()
    shutil.copy(originals[2], photos / "sub" / "copy2.jpg")
    for i, name in ((3, "z_near1.jpg"), (4, "z_near2.jpg")):  # resized and re-encoded: same photograph
        (photos / name).write_bytes(jpeg_bytes(photo(i).resize((86, 64), Image.Resampling.BICUBIC), quality=60))
    extra = save_photo(root / "other" / "weighted.jpg", seed=50)
    listing = root / "birds.txt"
    listing.write_text(f"# one path, repeated 3 times\n{extra.relative_to(root)}\t3\n")
    return {"photos": photos, "list": listing, "root": root}


def _pack(corpus, out: Path, **kw) -> dict:
    return pack([str(corpus["photos"]), str(corpus["list"])], PackOptions(out=out, prefix="bio", **kw))


def _read(out: Path) -> list[dict]:
    urls = sorted(str(p) for p in out.glob("bio-*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))


def test_curation_counts_exactly_as_planted(corpus, tmp_path) -> None:
    report = _pack(corpus, tmp_path / "out", max_count=4)
    assert report == PLANTED
    index = json.loads((tmp_path / "out" / "bio.json").read_text())
    assert index["curation"] == PLANTED
    assert [e["nsamples"] for e in index["shardlist"]] == [4, 4, 4, 3] and index["total_samples"] == 15
    assert [e["url"] for e in index["shardlist"]] == [f"bio-{i:06d}.tar" for i in range(4)]
    assert not list((tmp_path / "out").glob(".*"))  # no temporary leftovers


def test_shards_read_back_with_plain_webdataset(corpus, tmp_path) -> None:
    _pack(corpus, tmp_path / "out", max_count=4)
    samples = _read(tmp_path / "out")
    assert len(samples) == 15 and len({s["__key__"] for s in samples}) == 15
    sources = [Path(s["json"]["source_path"]).name for s in samples]
    assert sources.count("weighted.jpg") == 3
    assert not {"broken.jpg", "truncated.jpg", "tiny1.jpg", "tiny2.jpg", "z_copy1.jpg", "copy2.jpg",
                "z_near1.jpg", "z_near2.jpg"} & set(sources)
    for s in samples:
        assert s["jpg"].size == (s["json"]["width"], s["json"]["height"])
        assert s["json"]["source"] in {"photos", "birds"}


def test_output_order_is_deterministic_and_seeded(corpus, tmp_path) -> None:
    def order(out, **kw):
        _pack(corpus, out, **kw)
        return [s["json"]["source_path"] for s in _read(out)]

    a = order(tmp_path / "a", seed=1)
    assert order(tmp_path / "b", seed=1, jobs=2) == a
    assert order(tmp_path / "c", seed=2) != a


def test_reencoding_bounds_the_side_and_changes_the_format(corpus, tmp_path) -> None:
    _pack(corpus, tmp_path / "out", max_side=48, format="webp")
    samples = _read(tmp_path / "out")
    assert all("webp" in s and max(s["webp"].size) <= 48 for s in samples)


def test_non_empty_output_is_refused_unless_overwrite(corpus, tmp_path) -> None:
    out = tmp_path / "out"
    _pack(corpus, out)
    before = (out / "bio.json").read_text()
    with pytest.raises(OutputNotEmptyError, match="bio-000000.tar"):
        _pack(corpus, out, seed=5)
    assert (out / "bio.json").read_text() == before  # nothing touched
    _pack(corpus, out, seed=5, overwrite=True)
    assert json.loads((out / "bio.json").read_text())["seed"] == 5


def test_cli_usage_errors_exit_2_naming_the_path(corpus, tmp_path) -> None:
    missing = tmp_path / "nowhere"
    run = subprocess.run([sys.executable, "-m", "biodino", "pack", str(missing), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and str(missing) in run.stderr
    assert not (tmp_path / "o").exists()
    ok = subprocess.run([sys.executable, "-m", "biodino", "pack", str(corpus["photos"]), "--out", str(tmp_path / "o"),
                         "--prefix", "bio", "--jobs", "1"], capture_output=True, text=True)
    assert ok.returncode == 0 and "near duplicates   2" in ok.stdout and "kept              12" in ok.stdout
    again = subprocess.run([sys.executable, "-m", "biodino", "pack", str(corpus["photos"]), "--out",
                            str(tmp_path / "o"), "--prefix", "bio"], capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr
