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
    "callbacks.perf.count_flops=false",  # ~1.5 s a launch; counted in tests/test_budget.py
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
    """The environment of a command line started by a test: lmim and ``tests`` importable,
    offline W&B, one thread, and none of the test process's W&B service (see conftest) or
    ``HYDRA_FULL_ERROR`` (the one-line errors are what the tests read)."""
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    skip = ("WANDB_SERVICE", "HYDRA_FULL_ERROR")
    return {
        **{k: v for k, v in os.environ.items() if k not in skip},
        "PYTHONPATH": path,
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


class Commands:
    """Command lines started together, so that independent ones share the machine's cores
    (most runs of the suite are one thread each), each read back (waited for) when a test asks
    for it. Output goes to files, so that no process blocks on a full pipe.

    Args:
        folder: where each command's output files go.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: dict[str, tuple[subprocess.Popen, Path, Path | None]] = {}
        self.queued: list[tuple[str, str, tuple[str, ...], Path, bool, dict[str, str]]] = []

    def add(
        self, key: str, module: str, *args: str, cwd: Path, merge: bool = False, **env: str
    ) -> None:
        """Queue ``python -m <module> <args>`` in ``cwd`` (started by :meth:`start_all`);
        ``merge`` sends stderr into stdout (one stream, in the order a terminal shows it)."""
        self.queued.append((key, module, args, cwd, merge, env))

    def start_all(self) -> None:
        """Start every queued command (after their inputs are written: the commands compete
        for the cores)."""
        for key, module, args, cwd, merge, env in self.queued:
            self.start(key, module, *args, cwd=cwd, merge=merge, **env)
        self.queued = []

    def start(
        self, key: str, module: str, *args: str, cwd: Path, merge: bool = False, **env: str
    ) -> None:
        out, err = self.folder / f"{key}.out", None if merge else self.folder / f"{key}.err"
        with open(out, "w") as fout, open(err or os.devnull, "w") as ferr:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                cwd=cwd,
                env=cli_env(**env),
                stdout=fout,
                stderr=subprocess.STDOUT if merge else ferr,
                text=True,
            )
        self.procs[key] = (proc, out, err)

    def result(self, key: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """The command's exit status and output, once it has ended."""
        proc, out, err = self.procs[key]
        proc.wait(timeout=timeout)
        stderr = err.read_text() if err else ""
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), stderr)

    def stop(self) -> None:
        for proc, _, _ in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def photo_folder(
    root: Path,
    splits: dict[str, int],
    photos: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins"),
    seed: int = 0,
    size: int = 48,
) -> Path:
    """A small real ImageFolder: random crops of scikit-image's bundled photos saved as JPEGs
    in ``<root>/<split>/<photo>/``, ``splits[split]`` per photo (no download)."""
    import numpy as np

    from lmim.data import load_demo_images

    rng = np.random.default_rng(seed)
    for name, img in zip(photos, load_demo_images(photos), strict=True):
        w, h = img.size
        for split, count in splits.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                side = int(rng.integers(min(w, h) // 4, min(w, h) // 2))
                x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
                crop = img.crop((x, y, x + side, y + side)).resize((size, size))
                crop.save(folder / f"{split}_{i}.jpg", quality=90)
    return root


def cli(
    *args: str, cwd: Path, module: str = "lmim.train", **env: str
) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in ``cwd``, to its end (``env``: more variables)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def start_cli(
    *args: str,
    cwd: Path,
    log: Path,
    module: str = "lmim.train",
    new_session: bool = False,
    **env: str,
) -> subprocess.Popen:
    """``python -m <module> <args>`` started in ``cwd``, stdout and stderr to ``log``;
    ``new_session``: in a process group of its own (with the processes it launches, which
    ``os.killpg(proc.pid, ...)`` then reaches)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=cwd,
            env=cli_env(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )


def wait_for(
    path: Path, proc: subprocess.Popen, timeout: float = 300, log: Path | None = None
) -> None:
    """Until ``path`` exists; fails if the process ends first (showing the tail of ``log``)."""
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None else ""
            raise AssertionError(f"the run ended (status {proc.returncode}) before {path}\n{tail}")
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


def assert_two_processes_match_one(common: list[str], tmp_path: Path, steps: int) -> None:
    """``python -m lmim.train <common>`` as 1 process x 8 images and as 2 gloo processes x 4
    images (the same global batch): the same global-batch losses at each of ``steps`` steps,
    within 1e-5, and the loss moves (the comparison is not vacuous)."""
    one = cli(
        *common, "trainer=cpu", "data.batch_size=8", f"hydra.run.dir={tmp_path}/one", cwd=tmp_path
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli(
        *common,
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "data.batch_size=4",
        f"hydra.run.dir={tmp_path}/two",
        cwd=tmp_path,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = loss_rows(tmp_path / "one" / "csv" / "metrics.csv")
    b = loss_rows(tmp_path / "two" / "csv" / "metrics.csv")
    assert sorted(a) == sorted(b) == list(range(steps))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    assert len(set(a.values())) == steps
