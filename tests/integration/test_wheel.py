"""The wheel, installed non-editable into a fresh virtual environment and run from a directory outside any
checkout, finds its shipped recipes and templates: ``train tiny``, ``slurm bio_dino/schedule``, ``demo``."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding only the built wheel; the dependencies come from this venv through a .pth line (a
    plain path, so the editable install's own .pth hooks in there are not run)."""
    root = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"),
                            str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (root / "dist").glob("biodino-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    return venv


def _run(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / "biodino"), *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


def test_the_installed_package_is_the_wheel_with_its_recipes(installed, tmp_path) -> None:
    probe = subprocess.run([str(installed / "bin" / "python"), "-c",
                            "import biodino, pathlib; p = pathlib.Path(biodino.__file__).parent; "
                            "print(p); print((p / 'configs' / 'tiny.yaml').is_file(), "
                            "(p / 'slurm' / 'train.sbatch.template').is_file())"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout.split()
    assert probe[0].startswith(str(installed)) and probe[1:] == ["True", "True"]


def test_installed_train_slurm_and_demo_run_from_anywhere(installed, tiny_shards, tmp_path) -> None:
    train = _run(installed, tmp_path, "train", "tiny", f"data.shards={tiny_shards}", "schedule.epochs=1",
                 "schedule.steps_per_epoch=2", "logging.plots=false")
    assert train.returncode == 0, train.stderr[-3000:]
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "step=0000002.ckpt").is_file()

    slurm = _run(installed, tmp_path, "slurm", "bio_dino/schedule", "--nodes", "2", "--gpus-per-node", "8",
                 "data.shards=/data/bio/corpus.json")
    assert slurm.returncode == 0, slurm.stderr[-3000:]
    assert slurm.stdout.count("#SBATCH --nodes=2") == 3 and "--stage s3_336" in slurm.stdout

    demo = _run(installed, tmp_path, "demo", "--out", "demo", "--per-class", "12", "schedule.epochs=1",
                "schedule.steps_per_epoch=2", "schedule.batch_size=8")
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "trained teacher backbone" in demo.stdout
