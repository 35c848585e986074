"""Reliability: resume after kills and preemption, bad images, non-finite steps, DDP = 1 process,
config mistakes caught before training. Real CLI runs, real Trainer, real files."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image

from lmim.data.images import load_rgb
from lmim.errors import BadDataError, ConfigError, NonFiniteError
from lmim.resume import AtomicCheckpointIO, remove_stale_temp_files
from lmim.train import train
from tests.hooks import WeightChanges
from tests.runs import (
    RESUMABLE,
    SMALL,
    assert_same_weights,
    assert_two_processes_match_one,
    cli,
    cli_env,
    finished_wandb_file,
    load,
    loss_rows,
    start_cli,
    wait_for,
)


@pytest.fixture
def one_thread():
    """In-process runs on one intra-op thread (see SMALL), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- 1. resume ---------------------------------------------------------------------------------


class DiskFull:
    """Fails the way a full disk fails a write."""

    def __reduce__(self):
        raise OSError(28, "No space left on device")


def test_atomic_checkpoint_survives_kill_while_saving(tmp_path):
    """SIGKILL while last.ckpt is being rewritten leaves the previous complete file; the
    unfinished temporary file is recognised and removed. (Writing in place would leave an empty
    last.ckpt.)"""
    script = f"""
import sys, time, torch
from lmim.resume import AtomicCheckpointIO

class SlowToPickle:
    def __reduce__(self):
        time.sleep(60)
        return (dict, ())

io = AtomicCheckpointIO()
io.save_checkpoint({{"step": 1, "w": torch.arange(5.0)}}, {str(tmp_path / "last.ckpt")!r})
print("saved", flush=True)
io.save_checkpoint({{"step": 2, "slow": SlowToPickle()}}, {str(tmp_path / "last.ckpt")!r})
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=cli_env(), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "saved"
    end = time.monotonic() + 60
    while not list(tmp_path.glob(".last.ckpt.tmp-*")):
        assert time.monotonic() < end and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = load(tmp_path / "last.ckpt")
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.arange(5.0))
    assert remove_stale_temp_files(tmp_path) and not list(tmp_path.glob(".*tmp-*"))
    # a failure while writing (here: a full disk) leaves the old file and nothing else
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"x": DiskFull()}, tmp_path / "last.ckpt")
    assert load(tmp_path / "last.ckpt")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the RESUMABLE run, never stopped, started here so that it runs beside the
    first test's run (one thread each); a function returning its final last.ckpt once it has
    ended."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    proc = start_cli(*RESUMABLE, f"hydra.run.dir={tmp}/run", cwd=tmp, log=tmp / "run.log")
    last = tmp / "run" / "checkpoints" / "last.ckpt"

    def finished() -> Path:
        assert proc.wait(timeout=600) == 0, (tmp / "run.log").read_text()[-3000:]
        assert load(last)["global_step"] == 12
        return last

    yield finished
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigkill_mid_epoch_then_rerun_resumes_to_same_weights(tmp_path, uninterrupted):
    """Kill -9 right after the first last.ckpt (step 4 of a 6-step epoch), re-run the same
    command: it resumes from step 4 and ends with exactly the uninterrupted run's weights (same
    data order, augmentation, masks, optimizer and lr schedule). Nothing written is lost: the
    first run's metrics stay next to the resumed run's."""
    args = [*RESUMABLE, f"hydra.run.dir={tmp_path}/run"]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    proc = start_cli(*args, cwd=tmp_path, log=tmp_path / "first.log")
    wait_for(last, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = load(last)["global_step"]
    assert killed_at % 6 != 0, "not mid-epoch"
    assert killed_at < 12, (tmp_path / "first.log").read_text()[-2000:]

    again = cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {last} (step {killed_at})" in again.stdout + again.stderr
    assert "settings changed" not in again.stdout + again.stderr
    reference_last = uninterrupted()
    assert_same_weights(last, reference_last)
    csv_dir = tmp_path / "run" / "csv"
    first, second = loss_rows(csv_dir / "metrics.part1.csv"), loss_rows(csv_dir / "metrics.csv")
    assert min(first) == 0 and min(second) == killed_at and max(second) == 11
    reference = loss_rows(reference_last.parents[1] / "csv" / "metrics.csv")
    assert second == pytest.approx({s: reference[s] for s in second}, abs=1e-6)


# SIGUSR1 (Slurm's time-limit signal) in the fast suite; SIGTERM takes the same path (and is
# sent to one node of four in tests/test_multinode.py, slow).
@pytest.mark.parametrize("signame", [pytest.param("SIGTERM", marks=pytest.mark.slow), "SIGUSR1"])
def test_preemption_signal_saves_and_rerun_resumes(tmp_path, uninterrupted, signame):
    """SIGTERM (Slurm preemption) or SIGUSR1 (time limit): the run finishes its step, saves
    last.ckpt there, exits with 128 + signal and says how to resume; under Slurm, SIGUSR1 also
    requeues the job. Re-running resumes to the uninterrupted run's weights."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    scontrol = fake_bin / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/scontrol.args\n')
    scontrol.chmod(0o755)
    env = {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    args = [*RESUMABLE, f"hydra.run.dir={tmp_path}/run"]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    proc = start_cli(*args, cwd=tmp_path, log=tmp_path / "first.log", **env)
    wait_for(last, proc)
    proc.send_signal(getattr(signal, signame))
    status = proc.wait(timeout=300)
    out = (tmp_path / "first.log").read_text()
    signum = int(getattr(signal, signame))
    assert status == 128 + signum, out[-3000:]
    step = load(last)["global_step"]
    assert 4 <= step < 12
    assert f"lmim: stopped: {signame} received: saved {last} at step {step}" in out
    if signame == "SIGUSR1":
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    else:
        assert not (tmp_path / "scontrol.args").exists()

    again = cli(*args, cwd=tmp_path, **env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_weights(last, uninterrupted())


@pytest.mark.slow
def test_ddp_preemption_of_one_process_stops_all_and_resumes(tmp_path):
    """Under DDP (2 gloo processes), SIGTERM to rank 0 alone: the ranks agree at the next step,
    save one last.ckpt and all exit with 143; re-running resumes to the weights of an
    uninterrupted DDP run."""
    ddp = [o for o in RESUMABLE if not o.startswith(("trainer=", "data.batch_size"))]
    ddp += ["trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=2"]
    ref = cli(*ddp, f"hydra.run.dir={tmp_path}/ref", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    args = [*ddp, f"hydra.run.dir={tmp_path}/run"]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    proc = start_cli(*args, cwd=tmp_path, log=tmp_path / "first.log")
    wait_for(last, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    out = (tmp_path / "first.log").read_text()
    assert out.count("lmim: stopped: SIGTERM received") == 1, out[-3000:]
    step = load(last)["global_step"]
    assert 4 <= step < 12
    again = cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_weights(last, tmp_path / "ref" / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_mid_epoch(workers):
    """A loader restored from another's state_dict hands out exactly the rest of the epoch
    (same samples, same augmentation), with and without worker processes; the next epoch is
    never skipped into."""
    from lmim.data import DemoDataModule

    def make() -> DemoDataModule:
        dm = DemoDataModule(
            images=["astronaut"],
            samples_per_epoch=12,
            img_size=32,
            batch_size=2,
            num_workers=workers,
            seed=3,
        )
        dm.setup("fit")
        return dm

    first = make().train_dataloader()
    first.sampler.set_epoch(1)
    batches = iter(first)
    seen = [next(batches)[0] for _ in range(2)]
    state = first.state_dict()
    rest = [b[0] for b in batches]
    assert state == {"epoch": 1, "batches": 2} and len(seen) + len(rest) == 6

    resumed = make().train_dataloader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # what Lightning does at the epoch start
    again = [b[0] for b in resumed]
    assert len(again) == 4 and all(torch.equal(a, b) for a, b in zip(again, rest, strict=True))
    resumed.sampler.set_epoch(2)  # a later epoch starts from its beginning
    assert len(list(resumed)) == 6
    complete = make().train_dataloader()
    complete.load_state_dict({"epoch": 1, "batches": 6})
    complete.sampler.set_epoch(2)  # the saved epoch was complete: Lightning starts the next
    assert len(list(complete)) == 6


def test_resume_warns_about_changed_settings(make_cfg, tmp_path, caplog, one_thread):
    """Resuming with a changed setting says which, and the drawn seed (seed=null) of the first
    run is kept in its checkpoint and reused."""
    first = [*SMALL, "seed=null", "data.samples_per_epoch=8", "trainer.max_epochs=1"]
    train(make_cfg(first))
    ckpt = load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    seeds = ckpt["lmim_seed"], ckpt["DemoDataModule"]["seed"]  # masks, data
    assert all(isinstance(s, int) for s in seeds)
    caplog.set_level("WARNING", logger="lmim")
    train(make_cfg([*first[:-1], "trainer.max_epochs=2", "optim.blr=2e-2"]))
    warned = [r.getMessage() for r in caplog.records if "settings changed" in r.getMessage()]
    assert len(warned) == 1 and "optim.blr: 0.01 -> 0.02" in warned[0]
    assert "max_epochs" not in warned[0]
    ckpt = load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert (ckpt["lmim_seed"], ckpt["DemoDataModule"]["seed"]) == seeds


def test_resumed_run_continues_its_wandb_run(make_cfg, tmp_path, one_thread):
    """The run folder records its W&B run's id (wandb_run_id); resuming the folder logs to that
    run again (real offline W&B: both launches' transaction logs name the same run), so one
    training across interruptions is one W&B run; a new folder starts a new one."""
    first = [*SMALL, "logger=wandb", "data.samples_per_epoch=8", "trainer.max_epochs=1"]
    train(make_cfg(first))
    run = tmp_path / "run"
    recorded = (run / "wandb_run_id").read_text().strip()
    time.sleep(1.1)  # W&B names offline folders by the second
    train(make_cfg([*first[:-1], "trainer.max_epochs=2"]))
    logs = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 2
    runs = [finished_wandb_file(f) for f in logs]
    assert [r.run_id for r in runs] == [recorded, recorded]
    assert (run / "wandb_run_id").read_text().strip() == recorded
    steps = [[h["trainer/global_step"] for h in r.history if "train/loss" in h] for r in runs]
    assert steps == [[0, 1], [2, 3]]  # the second launch continued from step 2
    train(make_cfg(first, tmp_path / "other"))
    assert (tmp_path / "other" / "wandb_run_id").read_text().strip() != recorded


def test_existing_checkpoint_is_never_overwritten(make_cfg, tmp_path):
    """resume=false, or another ckpt_path, in a folder holding last.ckpt stops before training
    with the keys that fix it."""
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"progress")
    with pytest.raises(ConfigError, match=r"resume=false.*run_id="):
        train(make_cfg([*SMALL, "resume=false"]))
    with pytest.raises(ConfigError, match=r"ckpt_path=.*run_id="):
        train(make_cfg([*SMALL, f"ckpt_path={tmp_path}/other.ckpt"]))
    # resuming from an unreadable last.ckpt names it instead of starting over
    with pytest.raises(ConfigError, match=r"cannot resume from .*last\.ckpt"):
        train(make_cfg(SMALL))
    assert last.read_bytes() == b"progress"
    # a missing explicit checkpoint is named with its key, in a fresh folder
    with pytest.raises(ConfigError, match=r"ckpt_path=.*missing\.ckpt .*FileNotFoundError"):
        train(make_cfg([*SMALL, f"ckpt_path={tmp_path}/missing.ckpt"], tmp_path / "fresh"))


# -- 2. bad data -------------------------------------------------------------------------------


@pytest.fixture
def messy_folder(tmp_path) -> tuple[Path, set[str]]:
    """An ImageFolder tree: 12 good photos-like images, a truncated JPEG, a text file named
    .jpg, and readable oddities (CMYK, 16x16, greyscale, 16-bit, RGBA, palette+transparency)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)

    def noise(h, w, ch=3):
        return rng.integers(0, 256, (h, w, ch) if ch > 1 else (h, w), dtype=np.uint8)

    for i in range(12):
        Image.fromarray(noise(48, 40)).save(root / "train" / "ab"[i % 2] / f"good{i}.jpg")
    truncated = root / "train" / "a" / "truncated.jpg"
    Image.fromarray(noise(64, 64)).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    text = root / "train" / "b" / "notes.jpg"
    text.write_text("<html>403 Forbidden</html>")
    Image.fromarray(noise(40, 40, 4), mode="CMYK").save(root / "train" / "a" / "cmyk.jpg")
    Image.fromarray(noise(16, 16)).save(root / "train" / "b" / "tiny.png")
    Image.fromarray(noise(40, 40, 1)).save(root / "train" / "a" / "gray.png")
    Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)).save(
        root / "train" / "b" / "gray16.png"
    )
    Image.fromarray(noise(40, 40, 4), mode="RGBA").save(root / "train" / "a" / "rgba.png")
    pal = Image.fromarray(noise(40, 40, 1), mode="L").convert("P")
    pal.info["transparency"] = 0
    pal.save(root / "train" / "b" / "palette.png", transparency=0)
    return root, {str(truncated), str(text)}


def test_image_modes_are_converted(messy_folder):
    """Readable oddities decode to 8-bit RGB of their own size; 16-bit greyscale is scaled
    (not clipped to white) and transparency is composited over white."""
    root, _ = messy_folder
    for name in ("a/cmyk.jpg", "b/tiny.png", "a/gray.png", "b/gray16.png", "a/rgba.png"):
        img = load_rgb(root / "train" / name)
        assert img.mode == "RGB", name
    assert load_rgb(root / "train" / "b" / "tiny.png").size == (16, 16)
    gray16 = np.asarray(load_rgb(root / "train" / "b" / "gray16.png"))
    assert 64 < gray16.mean() < 192  # uniform 16-bit noise, scaled: mid-grey on average
    pal = np.asarray(load_rgb(root / "train" / "b" / "palette.png"))
    assert (pal == 255).all(axis=-1).any()  # transparent entries became white


def bad_data_cfg(make_cfg, root: Path, share: float):
    return make_cfg(
        [
            *[o for o in SMALL if not o.startswith("data=") and not o.startswith("data.images")],
            "data=imagefolder",
            f"data.root={root}",
            "data.drop_last=false",
            f"data.max_skipped_share={share}",
            "trainer.max_epochs=1",
        ]
    )


def test_bad_images_skipped_named_counted(make_cfg, messy_folder, tmp_path, caplog, one_thread):
    """One epoch over the messy folder trains to the end; exactly the two unreadable files are
    named in warnings, listed in skipped_images.tsv and counted in data/skipped."""
    root, bad = messy_folder
    caplog.set_level("WARNING", logger="lmim")
    handler = signal.getsignal(signal.SIGTERM)
    result = train(bad_data_cfg(make_cfg, root, 0.2))
    assert signal.getsignal(signal.SIGTERM) is handler  # the run's handlers are gone
    assert result["metrics"]["data/skipped"] == 2.0
    assert math.isfinite(result["metrics"]["train/loss"])
    report = (tmp_path / "run" / "skipped_images.tsv").read_text().splitlines()
    assert {line.split("\t")[0] for line in report} == bad and len(report) == 2
    warned = {r.getMessage().split()[3] for r in caplog.records if "skipped unreadable" in r.msg}
    assert warned == bad


def test_too_many_bad_images_stop_the_run(make_cfg, messy_folder, one_thread):
    """Past data.max_skipped_share the run stops, naming the files and the key."""
    root, bad = messy_folder
    with pytest.raises(BadDataError, match=r"data\.max_skipped_share=0\.05") as err:
        train(bad_data_cfg(make_cfg, root, 0.05))
    assert any(path in str(err.value) for path in bad)


# -- 3. numerical faults -----------------------------------------------------------------------


# fp16 with a GradScaler, on the CPU (Lightning turns precision=16-mixed into bf16 there): the
# scaler's unscale/inf-check/skip path is the one a GPU takes. init_scale=1 avoids fp16 overflow
# in the first steps, so that only the injected NaN is non-finite.
FP16_SCALER = {
    "_target_": "lightning.pytorch.plugins.MixedPrecision",
    "precision": "16-mixed",
    "device": "cpu",
    "scaler": {"_target_": "torch.amp.GradScaler", "device": "cpu", "init_scale": 1.0},
}


@pytest.mark.parametrize("how", ["mul", "add"])
@pytest.mark.parametrize(
    "precision", ["32-true", "bf16-mixed", "bf16-true", "16-mixed+fused", "16-mixed+foreach"]
)
def test_nan_loss_step_is_skipped_and_counted(make_cfg, tmp_path, precision, how, one_thread):
    """A NaN loss at step 2 (a forward hook; NaN gradients with ``mul``, finite ones with
    ``add``) skips exactly that update (weights and AdamW state untouched), is counted in
    train/nonfinite_steps, and training goes on to the end, under every precision; with fp16
    the GradScaler sees the skipped step."""
    fp16 = precision.startswith("16-mixed")
    cfg = make_cfg(
        [
            *SMALL,
            "data.samples_per_epoch=20",
            "trainer.max_epochs=1",
            f"trainer.precision={'null' if fp16 else precision}",
            f"optim.optimizer.fused={precision != '16-mixed+foreach'}",
            "optim.warmup_steps=0",  # a warm-up from lr 0 would leave step 0 without change
            "+callbacks.nan._target_=tests.hooks.NaNLoss",
            "+callbacks.nan.steps=[2]",
            f"+callbacks.nan.how={how}",
            "+callbacks.record._target_=tests.hooks.WeightChanges",
        ]
    )
    if fp16:
        # growth every clean step: the final scale tells whether the scaler saw step 2
        scaler = {**FP16_SCALER["scaler"], "growth_interval": 1}
        with open_dict(cfg):
            cfg.trainer.plugins.append({**FP16_SCALER, "scaler": scaler})
    result = train(cfg)
    assert result["metrics"]["train/nonfinite_steps"] == 1.0
    assert WeightChanges.changed == {0: True, 1: True, 2: False, 3: True, 4: True}
    ckpt = load(Path(result["checkpoint"]))
    assert ckpt["global_step"] == 5
    adam_steps = {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert adam_steps == {4}
    rows = loss_rows(Path(result["metrics_csv"]))
    assert math.isnan(rows[2]) and all(math.isfinite(v) for s, v in rows.items() if s != 2)
    if fp16:
        scale = ckpt["MixedPrecision"]["scale"]
        # From 1.0, x2 after each clean step: 1 -> 2 -> 4, x0.5 at the skipped step 2 when the
        # scaler sees it (NaN gradients, or the fused optimizer's NaN-filled one), then 8. With
        # finite gradients the foreach path drops them after unscaling: the scaler sees a clean
        # step and grows, 32.
        seen = how == "mul" or precision == "16-mixed+fused"
        assert scale == (8.0 if seen else 32.0)


def test_nan_every_step_stops_keeping_last_good_checkpoint(make_cfg, tmp_path, one_thread):
    """NaN losses at every step from step 3 stop the run after optim.max_nonfinite_in_a_row=3
    skipped steps with a message naming the key; last.ckpt stays the one before the NaNs."""
    cfg = make_cfg(
        [
            *SMALL,
            "data.samples_per_epoch=40",
            "trainer.max_epochs=1",
            "optim.max_nonfinite_in_a_row=3",
            "callbacks.last_checkpoint.every_n_train_steps=2",
            "+callbacks.nan._target_=tests.hooks.NaNLoss",
            "+callbacks.nan.start=3",
        ]
    )
    with pytest.raises(NonFiniteError, match=r"optim\.max_nonfinite_in_a_row=3") as err:
        train(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert err.value.checkpoint == str(last)
    ckpt = load(last)
    assert ckpt["global_step"] == 2
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )


def test_targets_and_loss_are_float32_under_bf16():
    """Under bf16 autocast the targets and every loss are float32."""
    from lmim import create_pretrainer

    net = create_pretrainer("vit_test", "hog", img_size=32, decoder_dim=64, decoder_heads=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 3, 32, 32))
    assert out.preds[0].dtype == torch.bfloat16  # the network itself does run in bf16
    assert all(t.dtype == torch.float32 for t in out.targets)
    assert out.loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.losses.values())


# -- 4. multi-process ----------------------------------------------------------------------------


# Slow: 4 processes on 2 "nodes" equal 1 process in the fast suite (tests/test_multinode.py), and
# Lightning's own launcher of `trainer.devices=2` runs there in tests/test_figure.py.
@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    """2 gloo processes x 4 images and 1 process x 8 images (same global batch, same data order,
    augmentation on) log the same global-batch losses over 5 steps, within 1e-5."""
    common = [
        *[o for o in SMALL if not o.startswith(("trainer=", "data.batch_size"))],
        "data.samples_per_epoch=40",
        "trainer.max_steps=5",
        "trainer.max_epochs=-1",
    ]
    assert_two_processes_match_one(common, tmp_path, steps=5)


# -- 5. config mistakes --------------------------------------------------------------------------


def test_accumulation_longer_than_an_epoch_is_refused(make_cfg, tmp_path):
    """accumulate_grad_batches above the batches of an epoch stops before training."""
    cfg = make_cfg([*SMALL, "data.samples_per_epoch=16", "trainer.accumulate_grad_batches=8"])
    with pytest.raises(ConfigError, match=r"trainer\.accumulate_grad_batches=8 .* 4 batches"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fewer_images_than_devices_need_is_refused(make_cfg, tmp_path):
    """A dataset that cannot give each of 2 processes one batch stops before any process starts."""
    tiny = [o for o in SMALL if not o.startswith("trainer=")]
    cfg = make_cfg([*tiny, "trainer=ddp_cpu", "data.samples_per_epoch=6", "data.batch_size=4"])
    with pytest.raises(ConfigError, match=r"data\.batch_size=4 x 2 processes"):
        train(cfg)


def test_unknown_model_or_target_lists_the_valid_ones(tmp_path):
    """An unknown model or target name, on the command line or in the API, names the valid ones."""
    from lmim import create_pretrainer

    with pytest.raises(ConfigError, match=r"model 'vit_zz'.*vit_b, vit_h, vit_l, vit_s"):
        create_pretrainer("vit_zz", "hog")
    with pytest.raises(ConfigError, match=r"target 'hug'.*hog, hog18, pixel"):
        create_pretrainer("vit_test", "hug")
    proc = cli("model=vit_zz", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("lmim: error: model=vit_zz is not an option of the 'model' group")
    assert all(m in line for m in ("vit_b", "vit_s", "vit_test", "vit_tiny"))
