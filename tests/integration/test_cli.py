"""The ``biodino`` command: entry point, ``models`` listing, usage errors."""

from __future__ import annotations

import subprocess
import sys

from biodino.cli.main import main


def test_models_lists_seed_presets_with_counts(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "vit_reg4_so150m_p14_ls" in out and "133,623,712" in out and "(1, 896)" in out
    assert "vit_b16_ls" in out and "85,817,088" in out and "(1, 768)" in out


def test_models_at_another_size(capsys) -> None:
    assert main(["models", "--size", "252"]) == 0
    out = capsys.readouterr().out
    assert "133,684,640" in out
    assert "vit_b16_ls" not in out  # 252 is not a multiple of 16


def test_console_entry_point_and_usage_error_exit_code() -> None:
    ok = subprocess.run([sys.executable, "-m", "biodino", "models"], capture_output=True, text=True)
    assert ok.returncode == 0 and "85,817,088" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "biodino", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "frobnicate" in bad.stderr
