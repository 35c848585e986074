"""Training through the real composed config, real Lightning Trainer and real (offline) W&B."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest

from lmim.module import param_groups
from lmim.train import build, train
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def read_metrics(path: str) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_fast_dev_run(make_cfg):
    """One batch through the whole stack (fast_dev_run) on the tiny ViT."""
    cfg = make_cfg([*TINY, "debug=fdr"])
    result = train(cfg)
    taps = [result["metrics"][f"train/loss_block{i}"] for i in (1, 3, 5, 7)]
    assert result["metrics"]["train/loss"] == pytest.approx(sum(taps), rel=1e-6)  # unweighted


def test_matmul_precision_reaches_torch_and_a_bad_one_stops_every_entry_point(make_cfg, tmp_path):
    """``matmul_precision=high`` is torch's float32 matmul precision in the run; a value torch
    does not have stops train, finetune and linprobe before they build or write anything."""
    import torch

    from lmim.errors import ConfigError
    from lmim.finetune import finetune
    from lmim.linprobe import linprobe

    before = torch.get_float32_matmul_precision()
    try:
        probe = ["init_model=vit_test"]
        for run, name, args in ((train, "train", TINY), (finetune, "finetune", probe),
                                (linprobe, "linprobe", probe)):  # fmt: skip
            cfg = make_cfg([*args, "matmul_precision=fast"], config_name=name)
            with pytest.raises(ConfigError, match="matmul_precision=fast: use one of highest, "):
                run(cfg)
        assert not (tmp_path / "run").exists()
        assert torch.get_float32_matmul_precision() == before == "highest"
        train(make_cfg([*TINY, "debug=fdr", "matmul_precision=high"]))
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize(
    ("every", "final_step", "logged"),
    [(2, True, ["1", "2"]), (3, True, ["2"]), (2, False, ["1"])],
    ids=["every-2", "every-3", "every-2-without-callback"],
)
def test_last_step_of_the_last_epoch_is_logged_once(make_cfg, every, final_step, logged):
    """A 3-step epoch: the steps trainer.log_every_n_steps selects, plus the last one (its
    step 2) once, however the two coincide; callbacks.final_step is what adds it."""
    overrides = [
        *TINY,
        "data.samples_per_epoch=24",
        "trainer.max_epochs=1",
        f"trainer.log_every_n_steps={every}",
        "trainer.enable_progress_bar=false",
        "~callbacks.reconstruction",
    ]
    result = train(make_cfg([*overrides, *([] if final_step else ["~callbacks.final_step"])]))
    rows = [r for r in read_metrics(result["metrics_csv"]) if r.get("train/loss")]
    assert [r["step"] for r in rows] == logged
    assert all(r["perf/device_hours"] and r["lr"] for r in rows)


def test_demo_data_30_steps_loss_goes_down(make_cfg, tmp_path):
    """30 optimizer steps on the embedded photos lower the loss; the run leaves a checkpoint,
    metrics and a reconstruction figure."""
    cfg = make_cfg(
        [
            *TINY,
            "data.samples_per_epoch=80",
            "trainer.max_steps=30",
            "trainer.max_epochs=-1",
            "trainer.log_every_n_steps=1",
            "optim.blr=1e-2",
            "optim.warmup_steps=3",
        ]
    )
    result = train(cfg)
    rows = [r for r in read_metrics(result["metrics_csv"]) if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    # lr warms up from 0 then decays
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(1e-2 * 8 / 256, rel=1e-3)
    assert Path(result["checkpoint"]).is_file()
    assert Path(result["figure"]).is_file() and Path(result["figure"]).stat().st_size > 10_000
    assert float(rows[-1]["perf/device_hours"]) > 0
    assert float(rows[-1]["perf/images_seen"]) == 30 * 8


def test_lr_scales_with_global_batch(make_cfg):
    """lr = blr x batch x devices x accumulation / 256; per-update linear warm-up from 0, then a
    cosine to min_lr, as seen by the optimizer of a real fit."""

    class RecordLR(L.Callback):
        lrs: list[float] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.lrs.append(optimizer.param_groups[0]["lr"])

    cfg = make_cfg(
        [
            *TINY,
            "trainer.accumulate_grad_batches=2",
            "optim.blr=1e-3",
            "optim.warmup_epochs=1",
            "optim.min_lr=1e-5",
            "trainer.max_epochs=4",
            "callbacks=none",
        ]
    )
    datamodule, module = build(cfg)
    rec = RecordLR()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=4,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[rec],
    )
    trainer.fit(module, datamodule=datamodule)
    assert module.global_batch == 8 * 2
    peak = 1e-3 * 16 / 256
    assert module.lr == pytest.approx(peak)
    # 32 samples / 8 per batch = 4 batches = 2 updates per epoch; 4 epochs = 8 updates,
    # 2 of them warm-up (1 epoch), then a cosine over the remaining 6.
    lrs = rec.lrs
    assert len(lrs) == 8
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(peak / 2)
    cos = [1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * t / 6)) for t in range(6)]
    assert lrs[2:] == pytest.approx(cos, rel=1e-6)


def test_weight_decay_groups():
    """No decay on biases, norms, position embeddings and tokens; decay on weight matrices."""
    from lmim import create_pretrainer

    net = create_pretrainer("vit_test", "hog", img_size=64)
    groups = param_groups(net, 0.05)
    names = {id(p): n for n, p in net.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert "encoder.cls_token" in no_decay and "decoders.0.mask_token" in no_decay
    assert "encoder.blocks.0.norm1.weight" in no_decay and "norms.0.weight" in no_decay
    assert "encoder.blocks.0.attn.qkv.bias" in no_decay
    assert "encoder.blocks.0.attn.qkv.weight" in decay and "decoders.0.embed.weight" in decay
    assert "encoder.patch_embed.proj.weight" in decay
    assert not decay & no_decay
    assert decay | no_decay == {n for n, p in net.named_parameters() if p.requires_grad}
    assert {g["name"] for g in groups} == {
        "encoder/decay",
        "encoder/no_decay",
        "decoders/decay",
        "decoders/no_decay",
    }


def test_wandb_offline_run_records_metrics(make_cfg, tmp_path):
    """The default W&B logger goes offline without a key and writes a run holding the config
    and, at every step, the losses, lr, images/s and device-hours: the same values as the CSV
    logger beside it."""
    from lmim.callbacks.perf import DEVICE_HOURS
    from lmim.wandb_file import read_wandb_file

    cfg = make_cfg([*TINY, "logger=many", "debug=limit"])
    train(cfg)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # wandb.finish() returns before W&B's service process has written the whole file on a busy
    # machine: read it once its exit record is there
    end = time.monotonic() + 120
    while (run := read_wandb_file(runs[0])).exit_code is None and time.monotonic() < end:
        time.sleep(0.1)
    assert run.exit_code == 0
    keys = ["train/loss", *(f"train/loss_block{i}" for i in (1, 3, 5, 7)), "lr", DEVICE_HOURS]
    logged = [r for r in run.history if "train/loss" in r]
    assert len(logged) == 6  # debug=limit: 2 epochs of 3 steps, every step logged
    assert all(set(keys) | {"perf/images_per_sec"} <= set(r) for r in logged)
    rows = [r for r in read_metrics(str(tmp_path / "run" / "csv" / "metrics.csv")) if r["lr"]]
    for key in keys:
        assert [r[key] for r in logged] == pytest.approx([float(r[key]) for r in rows], rel=1e-6)
    lrs = [r["lr"] for r in logged]  # the warm-up: from 0, rising every step
    assert lrs[0] == 0.0 and all(b > a for a, b in zip(lrs, lrs[1:], strict=False))
    assert run.config["model"]["mask_ratio"] == 0.75
    import wandb

    assert wandb.run is None  # finished


def test_wandb_finished_when_training_fails(make_cfg, tmp_path):
    """A failure inside fit (here: a NaN loss stopping the run) still finishes the W&B run and
    propagates the error."""
    from lmim.errors import NonFiniteError

    cfg = make_cfg(
        [
            *TINY,
            "logger=wandb",
            "debug=limit",
            "optim.max_nonfinite_in_a_row=1",
            "+callbacks.nan._target_=tests.hooks.NaNLoss",
            "+callbacks.nan.start=0",
        ]
    )
    with pytest.raises(NonFiniteError):
        train(cfg)
    import wandb

    assert wandb.run is None


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lmim.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_multirun_two_jobs(tmp_path):
    """`-m target=hog,pixel` runs two jobs, each in its own output folder."""
    proc = run_cli(
        "-m",
        "target=hog,pixel",
        *TINY,
        "debug=fdr",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    targets = [(p / ".hydra" / "overrides.yaml").read_text() for p in jobs]
    assert "target=hog" in targets[0] and "target=pixel" in targets[1]


def test_cli_bad_value_one_line(tmp_path):
    """A bad value stops the CLI with exit code 2 and one line naming the key, writing nothing
    but Hydra's own run folder."""
    proc = run_cli(*TINY, "model.mask_ratio=1.5", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("lmim: error:")]
    assert len(errors) == 1 and "model.mask_ratio=1.5" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


# Slow: tests/test_reliability.py's 2-process run (same launch, losses equal to one process's,
# so the same lr) and tests/test_multinode.py's 4-process run cover it in the fast suite.
@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    """trainer=ddp_cpu runs two gloo processes from the same command; the global batch (and so
    the lr and the images counted) doubles."""
    tiny = [o for o in TINY if not o.startswith("trainer=")]
    proc = run_cli(
        *tiny,
        "trainer=ddp_cpu",
        "debug=limit",
        "trainer.devices=2",
        "optim.warmup_steps=1",
        "optim.blr=1e-3",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("checkpoint:") == 1  # only rank 0 reports
    rows = [
        r
        for r in read_metrics(str(tmp_path / "run" / "csv" / "metrics.csv"))
        if r.get("train/loss")
    ]
    # 32 samples / (8 per batch x 2 ranks) = 2 steps per epoch, 2 epochs
    assert float(rows[-1]["perf/images_seen"]) == 4 * 16
    assert max(float(r["lr"]) for r in rows) == pytest.approx(1e-3 * 16 / 256, rel=1e-3)
