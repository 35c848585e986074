"""The Hydra configs resolve from an installed wheel, not only from a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_configs_ship_in_the_wheel(tmp_path):
    """Build the wheel, install it into a bare folder and compose a config from there."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("lmim-*.whl"))
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    code = (
        "import lmim, lmim.utils\n"
        "print(lmim.utils.config_dir())\n"
        "net = lmim.create_pretrainer('vit_test', 'pixel', img_size=64)\n"
        "print(type(net).__name__, net.cell_sizes)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    conf, model = proc.stdout.strip().splitlines()
    assert Path(conf) == target / "lmim" / "conf"
    assert model == "LocalMIM [4.0, 8.0, 16.0, 32.0]"
