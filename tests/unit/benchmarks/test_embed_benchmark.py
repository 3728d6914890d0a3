"""The embedding benchmark: a CPU smoke run of the script printing its JSON line, with ``biodino embed``'s
embeddings checked against the plain loop's (CI does not time anything; the figures come from real runs)."""

from __future__ import annotations

import json

from benchmarks import embed


def test_the_benchmark_runs_on_cpu_and_both_sides_embed_the_same(capsys, tmp_path) -> None:
    out = embed.main(["--device", "cpu", "--images", "12", "--width", "64", "--height", "48", "--preset",
                      "vit_tiny_p8", "--resolution", "32", "--batch", "4", "--workers", "0", "2", "--repeats", "1",
                      "--features", "cls+mean", "--dir", str(tmp_path)])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line) == json.loads(json.dumps(out))
    assert out["baseline"]["img_per_s"] > 0
    assert set(out["biodino_embed"]) == set(out["embed_parts"]) == set(out["ratio"]) == {"0", "2"}
    for name in ("biodino_embed", "embed_parts"):
        for side in out[name].values():
            assert side["img_per_s"] > 0 and 0 <= side["wait_share"] <= 1
            # the same pixels reach the network: only the normalization's float rounding differs (~1e-6)
            assert side["max_abs_diff"] <= 1e-4
    assert out["feature_std"] > 0.1  # the embeddings compared depend on the image
    assert out["config"]["preset"] == "vit_tiny_p8" and out["config"]["resolution"] == 32
    assert list(tmp_path.iterdir()) == []  # the work folder is removed


def test_the_generated_jpegs_are_seeded_and_all_different(tmp_path) -> None:
    first = embed.write_jpegs(tmp_path / "a", 6, 40, 30, distinct=2)
    again = embed.write_jpegs(tmp_path / "b", 6, 40, 30, distinct=2)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert len({p.read_bytes() for p in first}) == 6
