"""Careless inputs to pack and export: one line naming the culprit, exit code 2, nothing written; unreadable inputs
named in the report; exported files readable as the user's umask says."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from biodino.cli.main import main
from tests.images import save_photo

# Root ignores file permissions through these two capabilities; dropped, permissions hold for it too.
DROP_CAPS = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
             "-dac_override,-dac_read_search"]


def _obeying_permissions(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` so that file permissions apply to it, as they do to every user but root."""
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv (util-linux): file permissions cannot be made to apply")
        cmd = DROP_CAPS + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    return [save_photo(folder / f"p{i}.jpg", seed=seed + i, width=80, height=60) for i in range(n)]


def _pack_cli(*args: str) -> tuple[int, list[str]]:
    proc = subprocess.run([sys.executable, "-m", "biodino", "pack", *args], capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, [line for line in proc.stderr.splitlines() if line.strip() and "%|" not in line]


@pytest.mark.parametrize("case", ["empty folder", "no image files", "only broken images", "max count 0",
                                  "output is a file"])
def test_pack_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, case) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    extra: list[str] = []
    if case == "empty folder":
        pass
    elif case == "no image files":
        (src / "notes.txt").write_text("nothing to see")
    elif case == "only broken images":
        (src / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 nope")
        (src / "b.png").write_bytes(b"")
    else:
        _photos(src, 3)
    if case == "max count 0":
        extra = ["--max-count", "0"]
    if case == "output is a file":
        out.write_text("x")
    code, err = _pack_cli(str(src), "--out", str(out), "--min-side", "16", *extra)
    message = {"empty folder": f"no images in {src}", "no image files": f"no images in {src}",
               "only broken images": "none of the 2 images", "max count 0": "--max-count must be at least 1",
               "output is a file": "is a file, not a folder"}[case]
    assert code == 2 and len(err) == 1 and err[0].startswith("biodino pack: error: ") and message in err[0], err
    if case == "output is a file":
        assert out.read_text() == "x"
    else:
        assert not out.exists()  # not even created, so no .shard-packing either


def test_pack_into_a_read_only_output_is_refused(tmp_path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _photos(src, 3)
    out.mkdir()
    out.chmod(0o555)
    proc = _obeying_permissions([sys.executable, "-m", "biodino", "pack", str(src), "--out", str(out), "--jobs", "1"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"biodino pack: error: --out {out}: {out} is not writable"
    assert list(out.iterdir()) == []


def test_unreadable_files_and_folders_are_named_in_the_report(tmp_path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _photos(src, 4)
    locked_file = src / "p1.jpg"
    locked_file.chmod(0o000)
    locked_dir = src / "private"
    locked_dir.mkdir()
    _photos(locked_dir, 2, seed=50)
    locked_dir.chmod(0o000)
    proc = _obeying_permissions([sys.executable, "-m", "biodino", "pack", str(src), "--out", str(out), "--jobs", "1",
                                 "--min-side", "16"])
    locked_dir.chmod(0o755)  # so that pytest can clean up
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert any(line.split() == ["unreadable", "2"] for line in lines), lines
    assert f"unreadable: {locked_dir} (Permission denied)" in lines
    assert f"unreadable: {locked_file} (Permission denied)" in lines
    assert any(line.split() == ["written", "3"] for line in lines)


def _checkpoint_like(tmp_path: Path) -> tuple[Path, Path]:
    """A Lightning-layout checkpoint of the tiny preset whose config claims another preset, and a good one."""
    from dataclasses import asdict

    from biodino.config.recipe import load_config
    from biodino.run.trainer import build_module

    cfg = load_config("tiny")
    state = build_module(cfg).state_dict()
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"config": asdict(cfg)}, "global_step": 3}, good)
    other = asdict(load_config("tiny", ["crops.global_size=48"]))
    bad = tmp_path / "misfit.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"config": other}, "global_step": 3}, bad)
    return good, bad


def test_export_of_something_that_is_not_a_fitting_checkpoint_exits_2(tmp_path, capsys) -> None:
    good, misfit = _checkpoint_like(tmp_path)
    text = tmp_path / "notes.ckpt"
    text.write_text("these are not weights\n")
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x00" * 40)
    out = tmp_path / "out"
    cases = {text: f"{text} is not a torch checkpoint", empty: f"{empty} is empty (0 bytes)",
             fake: f"{fake} is not a safetensors file",
             misfit: f"{misfit} does not fit the vit_tiny_p8 backbone at 48 px: pos_embedding has shape (1, 17, 96), "
                     "the model's is (1, 37, 96)"}
    for source, message in cases.items():
        for extra in ([], ["--full"]) if source != misfit else ([],):
            assert main(["export", str(source), "--out", str(out), *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and message in err[0], (source, err)
    assert not out.exists()
    assert main(["export", str(good), "--out", str(out)]) == 0


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_exported_files_follow_the_umask(tmp_path, umask) -> None:
    good, _ = _checkpoint_like(tmp_path)
    old = os.umask(umask)
    try:
        assert main(["export", str(good), "--out", str(tmp_path / "b")]) == 0
        assert main(["export", str(good), "--out", str(tmp_path / "f"), "--full"]) == 0
        assert main(["export", str(good), "--out", str(tmp_path / "r"), "--format", "birder"]) == 0
    finally:
        os.umask(old)
    written = [p for d in ("b", "f", "r") for p in (tmp_path / d).iterdir()]
    assert len(written) == 4  # backbone + sidecar, full weights, birder release
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
