"""The files biodino ships: the recipes (``configs/``) and the sbatch templates (``slurm/``).

In the repository they sit at its root, where users look for them; the wheel maps them into the package
(``biodino/configs``, ``biodino/slurm``: hatchling's ``force-include``), so an installed biodino finds them from
any directory. A source checkout or an editable install reads the root folders.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[2]


def shipped(name: str) -> Path:
    """The folder ``name`` ("configs" or "slurm") of this installation."""
    packaged = Path(str(resources.files("biodino") / name))
    return packaged if packaged.is_dir() else SOURCE_ROOT / name


def configs_dir() -> Path:
    return shipped("configs")


def slurm_template(name: str = "train.sbatch.template") -> Path:
    return shipped("slurm") / name
