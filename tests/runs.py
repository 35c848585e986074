"""Running ``python -m lmim.train`` in real subprocesses for tests: the small configs, the
command line's environment, waiting for files, and reading checkpoints and logged losses."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# A run small enough for a loaded 2-core machine: the 8-block test ViT with a narrow decoder at
# 32 px on two embedded photos, one thread per process (OpenMP threads fighting over shared
# cores make CPU steps 10-50x slower).
SMALL = [
    "model=vit_test",
    "model.decoder_dim=64",
    "model.decoder_heads=2",
    "data=demo",
    "data.images=[astronaut,coffee]",
    "data.img_size=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "trainer=cpu",
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "~callbacks.reconstruction",
    "optim.warmup_steps=2",
    "optim.blr=1e-2",
]
# 24 samples / 4 = 6 steps per epoch, 2 epochs; last.ckpt every 4 steps (mid-epoch 0 and 1).
RESUMABLE = [
    *SMALL,
    "data.samples_per_epoch=24",
    "trainer.max_epochs=2",
    "trainer.deterministic=true",
    "callbacks.last_checkpoint.every_n_train_steps=4",
]


def cli_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {
        **{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},  # see conftest
        "PYTHONPATH": path,
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmim.train", *args],
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def start_cli(*args: str, cwd: Path, log: Path, **env: str) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "lmim.train", *args],
            cwd=cwd,
            env=cli_env(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until ``path`` exists; fails if the process ends first."""
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {path}"
        assert time.monotonic() < end, f"no {path} after {timeout} s"
        time.sleep(0.01)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def loss_rows(metrics_csv: Path) -> dict[int, float]:
    with open(metrics_csv) as f:
        return {
            int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]
        }


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = load(a), load(b)
    assert sa["global_step"] == sb["global_step"]
    assert sa["state_dict"].keys() == sb["state_dict"].keys()
    for k, v in sa["state_dict"].items():
        assert torch.equal(v, sb["state_dict"][k]), k


def max_weight_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between two checkpoints' weights (same step and keys)."""
    sa, sb = load(a), load(b)
    assert sa["global_step"] == sb["global_step"]
    assert sa["state_dict"].keys() == sb["state_dict"].keys()
    return max(
        float((v.double() - sb["state_dict"][k].double()).abs().max())
        for k, v in sa["state_dict"].items()
        if v.is_floating_point()
    )


def finished_wandb_file(path: Path, timeout: float = 120):
    """A W&B transaction log, read once its run's exit record is there (W&B's writer process
    may still be flushing the file when ``wandb.finish`` returns)."""
    from lmim.wandb_file import read_wandb_file

    end = time.monotonic() + timeout
    while True:
        run = read_wandb_file(path)
        if run.exit_code is not None:
            return run
        assert time.monotonic() < end, f"{path}: no exit record after {timeout} s"
        time.sleep(0.2)
