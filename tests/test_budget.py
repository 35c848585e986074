"""Budgets: baselines in the same harness, device-hour accounting, W&B runs and the report."""

from __future__ import annotations

import csv
import importlib.util
import inspect
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from lmim import create_pretrainer
from lmim.callbacks import PerfMonitor
from lmim.callbacks.perf import DEVICE_HOURS, count_flops_per_image, peak_tflops
from lmim.module import LocalMIMModule
from lmim.report import ReportError, Run, load_runs, main, plot, report
from lmim.targets import NormalizedPixels
from lmim.train import build, train
from lmim.utils import config_dir
from lmim.wandb_file import WandbFileError, read_wandb_file
from tests import runs
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = [o for o in TINY if not o.startswith("logger=")]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


# ---- baselines as configs ----------------------------------------------------------------------


def test_mae_vit_b_is_the_released_mae(make_cfg):
    """method=mae on ViT-B/16 has exactly the released MAE's 111,655,680 trainable parameters
    (encoder + final norm, decoder 8 x 512 x 16 heads, per-patch pixel head) and reconstructs
    normalised 16-px patches at the top layer only; the training config builds the same model."""
    net = create_pretrainer("vit_b", method="mae")
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 111_655_680
    assert net.taps == [11] and net.scales == [1.0] and net.tap_names == ["block11"]
    assert isinstance(net.target, NormalizedPixels) and net.target.normalize
    assert net.cell_sizes == [16]
    (decoder,) = net.decoders
    assert decoder.embed.out_features == 512 and len(decoder.blocks) == 8
    assert decoder.blocks[0].attn.num_heads == 16
    assert isinstance(decoder.rescale, nn.Identity) and decoder.proj.out_channels == 16 * 16 * 3
    out = net(torch.randn(1, 3, 224, 224))
    assert list(out.losses) == ["block11"]
    assert [tuple(p.shape) for p in out.preds] == [(1, 196, 768)]
    assert int(out.weights[0].sum()) == 196 - 49  # loss on the masked patches only

    cfg = make_cfg(["method=mae"])
    from_config = instantiate(cfg.model)
    shapes = {n: tuple(p.shape) for n, p in from_config.named_parameters()}
    assert shapes == {n: tuple(p.shape) for n, p in net.named_parameters()}


def _experiments() -> list[str | None]:
    return [None, *sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))]


@pytest.mark.parametrize("experiment", _experiments())
def test_methods_share_data_optimizer_and_trainer(make_cfg, experiment):
    """With every experiment, method=mae swaps target, schedule and decoder and nothing else;
    the target node has only keys its class takes (no HOG keys left on pixels)."""
    base = [f"experiment={experiment}"] if experiment else []
    cfgs = {}
    for method in ("localmim", "mae"):
        cfg = cfgs[method] = make_cfg([*base, f"method={method}"])
        params = inspect.signature(get_class(cfg.target._target_)).parameters
        assert {k for k in cfg.target if not k.startswith("_")} <= set(params), method
        # ${hydra:...} resolves against the config composed last: resolve before the next one
        resolved = OmegaConf.to_container(
            OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
        )
        assert resolved["labels"]["method"] == method
        assert f"method:{method}" in resolved["tags"]
        assert resolved["run_name"].split("-")[1] == method
    mae, local = cfgs["mae"], cfgs["localmim"]
    assert mae.hydra.runtime.choices.target == "pixel"
    assert mae.hydra.runtime.choices.schedule == "top_only"
    assert (mae.model.decoder_dim, mae.model.decoder_depth, mae.model.decoder_heads) == (512, 8, 16)
    assert local.hydra.runtime.choices.target in ("hog", "hog18")
    swin = "Swin" in local.model.encoder._target_
    # the demo's decoders are narrower (128) so that it learns in its few CPU minutes
    vit_dim = 128 if experiment == "demo" else 256
    assert local.model.decoder_dim == ([64, 128, 128, 128] if swin else vit_dim)
    assert local.model.decoder_depth == 1
    for group in ("data", "optim", "trainer", "callbacks"):
        assert mae[group] == local[group], group
    assert mae.model.encoder == local.model.encoder and mae.task_name == local.task_name


def test_command_line_choice_beats_the_method(make_cfg):
    """method=mae target=hog: an explicit group choice wins (MAE's decoder on HOG targets)."""
    cfg = make_cfg([*TINY_RUN, "method=mae", "target=hog"])
    net = instantiate(cfg.model)
    assert type(net.target).__name__ == "HOG" and net.taps == [7]
    assert net.decoders[0].embed.out_features == 512


@pytest.mark.parametrize(
    ("schedule", "taps", "scales"),
    [("top_only", [7], [1.0]), ("single_scale", [1, 3, 5, 7], [1.0] * 4)],
)
def test_ablation_schedules(make_cfg, schedule, taps, scales):
    """top_only: LocalMIM's decoder on the top tap; single_scale: the encoder's paper taps, all
    at the patch scale (16-px cells)."""
    net = instantiate(make_cfg([*TINY_RUN, f"schedule={schedule}"]).model)
    assert net.taps == taps and net.scales == scales and net.cell_sizes == [16] * len(taps)
    assert net.decoders[0].embed.out_features == 256 and len(net.decoders[0].blocks) == 1
    out = net(torch.randn(2, 3, 64, 64))
    assert [tuple(p.shape) for p in out.preds] == [(2, 16, 27)] * len(taps)


# ---- device-hour accounting --------------------------------------------------------------------


class Clock(L.Callback):
    """Reads PerfMonitor's clock (``time.perf_counter``) at the hooks it uses. Placed before
    and after the PerfMonitor in the callback list, two clocks bracket each of its readings:
    the comparisons below are containments that hold however busy the machine is."""

    def __init__(self) -> None:
        self.at: dict[str, list[float]] = {}

    def _mark(self, hook: str) -> None:
        self.at.setdefault(hook, []).append(time.perf_counter())

    def setup(self, trainer, pl_module, stage) -> None:
        self._mark("setup")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._mark("epoch_start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._mark("batch_start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mark("batch_end")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._mark("epoch_end")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._mark("fit_end")


def test_device_hours_match_the_wall_clock_of_a_fit(make_cfg, tmp_path):
    """Under a real Trainer with gradient accumulation: device-hours are the wall-clock from
    the start of fit (setup) to its end (1 device), bracketed by clocks read just before and
    after the monitor's own readings, and so is each epoch's share; images seen = optimizer
    steps x global batch, and the logged series grows to the total."""
    cfg = make_cfg([*TINY_RUN, "data.samples_per_epoch=96", "callbacks=none"])
    datamodule, module = build(cfg)
    module.warmup_steps = 2
    perf, before, after = PerfMonitor(window=5), Clock(), Clock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        accumulate_grad_batches=2,
        logger=CSVLogger(tmp_path, name="csv", version=""),
        callbacks=[before, perf, after],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    wall = time.perf_counter() - t0
    seconds = perf.summary[DEVICE_HOURS] * 3600
    (b_setup,), (a_setup,) = before.at["setup"], after.at["setup"]
    (b_end,), (a_end,) = before.at["fit_end"], after.at["fit_end"]
    assert b_end - a_setup <= seconds <= a_end - b_setup <= wall
    assert trainer.global_step == 2 * (96 // 8) // 2
    assert perf.images_seen == trainer.global_step * 8 * 2 == 192
    rows = read_rows(tmp_path / "csv" / "metrics.csv")
    series = [float(r[DEVICE_HOURS]) for r in rows if DEVICE_HOURS in r]
    assert series == sorted(series) and series[-1] == pytest.approx(seconds / 3600, rel=1e-6)
    assert float(rows[-1]["perf/images_seen"]) == 192
    epochs = [
        float(r["perf/epoch_device_hours"]) * 3600 for r in rows if "perf/epoch_device_hours" in r
    ]
    assert len(epochs) == 2
    for i, epoch in enumerate(epochs):
        lo = before.at["epoch_end"][i] - after.at["epoch_start"][i]
        hi = after.at["epoch_end"][i] - before.at["epoch_start"][i]
        assert lo <= epoch <= hi
    assert sum(epochs) <= seconds


class SlowImages(Dataset):
    """Random 64-px images, each taking ``delay`` seconds to load; ``loads`` records the
    (start, end) of every load on PerfMonitor's clock."""

    def __init__(self, n: int, delay: float) -> None:
        self.n, self.delay = n, delay
        self.loads: list[tuple[float, float]] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        start = time.perf_counter()
        time.sleep(self.delay)
        image = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(i))
        self.loads.append((start, time.perf_counter()))
        return image


class SlowData(L.LightningDataModule):
    def __init__(self, images: SlowImages, batch_size: int = 4) -> None:
        super().__init__()
        self.images, self.batch_size = images, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.images, batch_size=self.batch_size)


def test_slow_loader_shows_as_data_wait(tmp_path):
    """A loader (in the main process) that sleeps 20 ms per image: PerfMonitor's data wait
    holds all of the loading, as the loader itself timed it, and none of the training steps,
    timed between the batch hooks; the logged shares are that wait over the epoch's time. All
    on one clock in one fit, as containments, so a busy machine cannot flip them."""
    torch.manual_seed(0)
    net = create_pretrainer("vit_test", img_size=64)
    module = LocalMIMModule(net, optimizer=torch.optim.AdamW, warmup_steps=1)
    images = SlowImages(32, 0.02)
    perf, before, after = PerfMonitor(window=4), Clock(), Clock()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=CSVLogger(tmp_path, name="csv", version=""),
        callbacks=[before, perf, after],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=SlowData(images))
    rows = read_rows(tmp_path / "csv" / "metrics.csv")
    wait = perf.summary["perf/data_wait_hours"] * 3600
    # every image is loaded inside the epoch, between one batch's end and the next one's start
    (epoch_start,) = after.at["epoch_start"]
    loads = [end - start for start, end in images.loads if start >= epoch_start]
    assert len(loads) == 32
    assert wait >= sum(loads) >= 32 * 0.02
    # ... and the steps, from each batch's start to its end, are not waiting
    (epoch,) = [r for r in rows if "perf/epoch_device_hours" in r]
    epoch_seconds = float(epoch["perf/epoch_device_hours"]) * 3600
    starts, ends = after.at["batch_start"], before.at["batch_end"]
    steps = [end - start for start, end in zip(starts, ends, strict=True)]
    assert len(steps) == 8 and all(s > 0 for s in steps)
    assert wait <= epoch_seconds - sum(steps)
    assert float(epoch["perf/epoch_data_wait_frac"]) == pytest.approx(wait / epoch_seconds)
    shares = [float(r["perf/data_wait_frac"]) for r in rows if "perf/data_wait_frac" in r]
    assert len(shares) == 8 and all(0.0 < s < 1.0 for s in shares)


def test_flops_counted_on_fake_tensors_equal_a_real_count():
    """FLOPs per image from fake tensors equal FlopCounterMode on a real forward + backward, and
    counting leaves gradients and the random-number state alone. MAE's decoder costs more."""
    torch.manual_seed(0)
    net = create_pretrainer("vit_test", img_size=64)
    rng = torch.get_rng_state()
    flops = count_flops_per_image(net, 4, (3, 64, 64))
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in net.parameters())
    with FlopCounterMode(display=False) as counter:
        net(torch.randn(4, 3, 64, 64)).loss.backward()
    assert flops == counter.get_total_flops() / 4 and flops > 0
    mae = create_pretrainer("vit_test", method="mae", img_size=64)
    assert count_flops_per_image(mae, 4, (3, 64, 64)) > 2 * flops


@pytest.mark.parametrize(
    ("name", "precision", "matmul", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16-mixed", "highest", 989.4),
        ("NVIDIA H100 PCIe", "bf16-mixed", "highest", 756.5),
        ("NVIDIA H200", "16-mixed", "highest", 989.4),
        ("NVIDIA A100-SXM4-80GB", "32-true", "highest", 19.5),
        ("NVIDIA A100-SXM4-80GB", "32-true", "high", 156.0),
        ("NVIDIA L40S", "bf16-mixed", "highest", 362.1),
        ("NVIDIA L4", "bf16-mixed", "highest", 121.0),
        ("Tesla V100-SXM2-32GB", "32-true", "high", 15.7),
        ("Tesla T4", "16-mixed", "highest", 65.0),
        ("NVIDIA GeForce RTX 4090", "bf16-mixed", "highest", 165.2),
        ("Some Future GPU", "bf16-mixed", "highest", None),
        ("NVIDIA A100-SXM4-80GB", "64-true", "highest", None),
    ],
)
def test_peak_table(name, precision, matmul, expected):
    """Dense datasheet peaks by device name and precision (TF32 when float32 matmuls may use
    it); unknown devices give None (no MFU unless callbacks.perf.peak_tflops is set)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul)
    try:
        assert peak_tflops(name, precision) == expected
    finally:
        torch.set_float32_matmul_precision(before)


def test_mfu_uses_the_configured_peak(make_cfg):
    """callbacks.perf.peak_tflops gives MFU = FLOPs per image x images/s per device / peak."""
    cfg = make_cfg([*TINY_RUN, "logger=csv", "debug=limit", "callbacks.perf.peak_tflops=0.5"])
    result = train(cfg)
    rows = read_rows(Path(result["metrics_csv"]))
    hparams = OmegaConf.load(Path(result["metrics_csv"]).parent / "hparams.yaml")
    gflops = float(hparams["perf/gflops_per_image"])
    assert gflops == pytest.approx(0.38, rel=0.05)
    assert hparams["perf/peak_tflops"] == 0.5 and hparams["perf/num_devices"] == 1
    mfu = [r for r in rows if "perf/mfu" in r]
    assert len(mfu) == 6
    for r in mfu:
        expected = gflops * 1e9 * float(r["perf/images_per_sec_per_device"]) / 0.5e12
        assert float(r["perf/mfu"]) == pytest.approx(expected, rel=1e-4)
    memory = [float(r["perf/max_memory_gb"]) for r in rows if "perf/max_memory_gb" in r]
    assert len(memory) == 6 and memory[-1] > 0.1  # the process's peak resident memory, GiB


def test_resumed_run_keeps_counting(make_cfg, tmp_path):
    """Device-hours and images seen continue from a checkpoint instead of restarting at 0."""
    tiny = [*TINY_RUN, "logger=csv", "debug=limit"]
    first = train(make_cfg([*tiny, "trainer.max_epochs=1"], tmp_path / "a"))
    # what last.ckpt holds (written at the end of training, before the final picture)
    ckpt = torch.load(first["checkpoint"], map_location="cpu", weights_only=False)
    before = ckpt["callbacks"]["PerfMonitor"]["device_hours"]
    assert 0 < before < float(read_rows(Path(first["metrics_csv"]))[-1][DEVICE_HOURS])
    second = train(make_cfg([*tiny, f"ckpt_path={first['checkpoint']}"], tmp_path / "b"))
    rows = read_rows(Path(second["metrics_csv"]))
    step_rows = [r for r in rows if "perf/images_seen" in r and "train/loss" in r]
    assert float(step_rows[0]["perf/images_seen"]) == 4 * 8
    assert float(step_rows[0][DEVICE_HOURS]) > before
    assert float(rows[-1]["perf/images_seen"]) == 6 * 8


# ---- a real budget sweep: W&B runs and the report ----------------------------------------------


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """The README's budget sweep, shrunk: `-m method=localmim,mae` on the tiny ViT, two jobs
    logging to W&B (offline) and CSV."""
    tmp = tmp_path_factory.mktemp("sweep")
    proc = runs.cli(
        "-m",
        "method=localmim,mae",
        *TINY_RUN,
        "logger=many",
        "debug=limit",
        "trainer.max_epochs=3",
        "task_name=budget_test",
        f"hydra.sweep.dir={tmp}/sweep",
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "sweep"


def test_wandb_offline_run_has_the_device_hours_series(sweep):
    """Each job's offline W&B run holds a growing perf/device_hours series, uses it as the step
    metric of the losses, and is named, grouped and tagged for comparison."""
    files = sorted(sweep.glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2
    for f, method in zip(files, ("localmim", "mae"), strict=True):
        run = read_wandb_file(f)
        assert run.exit_code == 0
        hours = [row[DEVICE_HOURS] for row in run.history if DEVICE_HOURS in row]
        assert len(hours) >= 9 and hours == sorted(hours) and hours[0] > 0
        losses = [row for row in run.history if "train/loss" in row]
        assert len(losses) == 9 and all(DEVICE_HOURS in row for row in losses)
        assert run.metrics["train/loss"]["step_metric"] == DEVICE_HOURS
        assert run.metrics["perf/images_per_sec"]["step_metric"] == DEVICE_HOURS
        schedule, target = ("localmim", "hog") if method == "localmim" else ("top_only", "pixel")
        assert run.name == f"vit_test-{method}-{target}-{schedule}-3ep"
        assert run.group == "budget_test"
        assert {f"method:{method}", "model:vit_test", "budget:3ep"} <= set(run.tags)
        assert run.config["labels"]["method"] == method
        assert run.config["perf/gflops_per_image"] > 0


def test_wandb_file_reader_tolerates_a_cut_tail_and_catches_damage(sweep, tmp_path):
    """A run still being written (cut tail) reads up to the cut; a flipped byte is an error."""
    src = next(sweep.glob("0/wandb/offline-run-*/run-*.wandb")).read_bytes()
    full = read_wandb_file(next(sweep.glob("0/wandb/offline-run-*/run-*.wandb")))
    cut = tmp_path / "run-cut.wandb"
    cut.write_bytes(src[: len(src) // 2])
    partial = read_wandb_file(cut)
    assert 0 < len(partial.history) < len(full.history) and partial.exit_code is None
    bad = bytearray(src)
    bad[len(src) // 3] ^= 0xFF
    damaged = tmp_path / "run-bad.wandb"
    damaged.write_bytes(bytes(bad))
    with pytest.raises(WandbFileError):
        read_wandb_file(damaged)


def _has_colour(png: Path, rgb: tuple[float, float, float], min_pixels: int = 50) -> bool:
    import matplotlib.image

    img = matplotlib.image.imread(png)[..., :3]
    return int((np.abs(img - np.array(rgb)).max(axis=-1) < 0.02).sum()) >= min_pixels


def panels(fig) -> list[tuple[str, str, dict[str, list[int]]]]:
    """(title, y label, {legend entry: points of each line in its colour}) of each panel of a
    report figure."""
    out = []
    for ax in fig.axes:
        handles, names = ax.get_legend_handles_labels()
        by_colour = {tuple(h.get_color()): name for h, name in zip(handles, names, strict=True)}
        lines: dict[str, list[int]] = {}
        for ln in ax.get_lines():
            lines.setdefault(by_colour[tuple(ln.get_color())], []).append(len(ln.get_xdata()))
        out.append((ax.get_title(), ax.get_ylabel(), lines))
    return out


def test_report_compares_both_methods(sweep, tmp_path):
    """`lmim.report` on the sweep writes a PNG with one line per method, the HOG and pixel
    losses in panels of their own (not one y-axis), and a Markdown table with a row per
    method; offline W&B logs and CSV logs give the same numbers."""
    import matplotlib.pyplot as plt

    from lmim.report import figure

    result = report([str(sweep)], tmp_path / "out")
    runs = result["runs"]
    assert sorted(r.method for r in runs) == ["localmim", "mae"]
    md = result["markdown"].read_text()
    assert "| localmim | vit_test-localmim-hog-localmim-3ep | 3ep | 9 | 72 |" in md
    assert "| mae | vit_test-mae-pixel-top_only-3ep | 3ep | 9 | 72 |" in md
    assert "budget.png" in md
    fig = figure(runs, None)
    assert panels(fig) == [
        ("pre-training loss, target hog", "train/loss (hog target)", {"localmim": [9]}),
        ("pre-training loss, target pixel", "train/loss (pixel target)", {"mae": [9]}),
    ]
    plt.close(fig)
    png = result["png"]
    for i in range(2):  # tab10 colours 0 and 1: one line per method
        assert _has_colour(png, plt.get_cmap("tab10")(i)[:3]), i
    assert not _has_colour(png, plt.get_cmap("tab10")(2)[:3])

    from_csv = report([str(sweep)], tmp_path / "csv", source="csv")
    by_method = {r["method"]: r for r in result["rows"]}
    for row in from_csv["rows"]:
        other = by_method[row["method"]]
        assert row["device-hours"] == pytest.approx(other["device-hours"], rel=1e-5)
        assert row["final loss"] == pytest.approx(other["final loss"], rel=1e-6)
        assert row["steps"] == other["steps"] == 9 and row["images"] == other["images"] == 72

    assert main([str(sweep), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "budget.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory) -> Path:
    """Two 3-step runs through `python -m lmim.train` with the default
    trainer.log_every_n_steps=50: one as configured, one without callbacks.final_step (a run
    as short runs were before: no train/loss row)."""
    tmp = tmp_path_factory.mktemp("short")
    for name, extra in (("good", []), ("lossless", ["~callbacks.final_step"])):
        proc = runs.cli(
            *TINY_RUN,
            "logger=csv",
            "trainer.max_steps=3",
            "trainer.max_epochs=-1",
            "trainer.enable_progress_bar=false",
            "~callbacks.reconstruction",
            *extra,
            f"hydra.run.dir={tmp}/outputs/{name}",
            cwd=tmp,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "outputs"


def test_short_run_logs_its_last_step(short_runs):
    """A run shorter than trainer.log_every_n_steps still writes its last optimizer step
    (Lightning's step 2, the third) to metrics.csv, once, with the per-tap losses, lr and
    device-hours; without callbacks.final_step it writes no loss at all."""
    rows = read_rows(short_runs / "good" / "csv" / "metrics.csv")
    losses = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in losses] == ["2"]
    (last,) = losses
    taps = [float(last[f"train/loss_block{i}"]) for i in (1, 3, 5, 7)]
    assert float(last["train/loss"]) == pytest.approx(sum(taps), rel=1e-6)
    assert float(last["lr"]) > 0 and float(last[DEVICE_HOURS]) > 0
    assert float(last["perf/images_seen"]) == 3 * 8
    lossless = read_rows(short_runs / "lossless" / "csv" / "metrics.csv")
    assert lossless and not any("train/loss" in r for r in lossless)


def test_report_skips_a_run_without_loss_with_a_note(short_runs, tmp_path):
    """`python -m lmim.report outputs/ --group pretrain` on a folder holding a run without
    train/loss reports the other run and says in one line which run it skipped and why."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmim.report",
            str(short_runs),
            "--group",
            "pretrain",
            "--out",
            str(tmp_path / "rep"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("lmim.report:")]
    lossless = str((short_runs / "lossless" / "csv" / "metrics.csv").resolve())
    assert notes == [
        f"lmim.report: note: skipped {lossless}: no train/loss logged (a run shorter than "
        "trainer.log_every_n_steps, trained without callbacks.final_step)"
    ]
    md = (tmp_path / "rep" / "budget.md").read_text()
    assert "Runs: 1 (groups: pretrain)." in md
    assert "| localmim | vit_test-localmim-hog-localmim-3steps | 3steps | 3 | 24 |" in md
    assert f"Skipped (no loss to draw): `{lossless}`" in md
    # every run without a loss: the one-line error, exit 2
    proc = subprocess.run(
        [sys.executable, "-m", "lmim.report", str(short_runs / "lossless")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("lmim.report: error: no train/loss")


def test_report_accuracy_panel_and_errors(tmp_path, capsys):
    """Runs logging an accuracy get an accuracy panel after the loss panels (accuracy against
    device-hours, the budgets of a method joined by one line at their total cost); runs of two
    targets get a loss panel each; inputs without runs stop with one clear line."""
    import matplotlib.pyplot as plt

    from lmim.report import figure

    def run(method: str, target: str, hours: float, acc: float) -> Run:
        rows = [
            {DEVICE_HOURS: hours * t, "train/loss": 1.0 - 0.5 * t, "trainer/global_step": 10 * t}
            for t in (0.25, 0.5, 1.0)
        ]
        rows.append({DEVICE_HOURS: hours, "eval/top1": acc})
        labels = {"method": method, "model": "vit_b", "target": target}
        return Run(f"{method}-{hours}", labels, "g", rows, "x")

    runs = [
        run("localmim", "hog", 70, 83.3),
        run("localmim", "hog", 1120, 84.0),
        run("mae", "pixel", 1760, 83.6),
    ]
    fig = figure(runs, "eval/top1")
    assert panels(fig) == [
        ("pre-training loss, target hog", "train/loss (hog target)", {"localmim": [3, 3]}),
        ("pre-training loss, target pixel", "train/loss (pixel target)", {"mae": [3]}),
        ("accuracy against cost", "eval/top1", {"localmim": [2], "mae": [1]}),
    ]
    localmim_acc = fig.axes[2].get_lines()[0]
    assert list(localmim_acc.get_xdata()) == [70, 1120]
    assert list(localmim_acc.get_ydata()) == [83.3, 84.0]
    plt.close(fig)
    png = plot(runs, tmp_path / "acc.png", "eval/top1")
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[1] == 3 * 6 * 120  # the three panels, saved
    assert main([str(tmp_path / "nothing-here")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no run below"):
        load_runs([str(tmp_path / "empty")])


# ---- throughput comparison and the Slurm launcher ------------------------------------------


def test_throughput_compare_times_both_methods(capsys):
    """benchmarks/throughput.py --compare localmim,mae times both for one model and prints the
    ratio of their step times next to the FLOP ratio."""
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks/throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(
        [
            "--model",
            "vit_test",
            "--img-size",
            "64",
            "--compare",
            "localmim,mae",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--batch",
            "2",
        ]
    )
    assert [r["method"] for r in rows] == ["localmim", "mae"]
    assert [r["target"] for r in rows] == ["HOG", "NormalizedPixels"]
    for row in rows:  # the FLOPs of each method's model, counted the way MFU counts them
        net = create_pretrainer("vit_test", method=row["method"], img_size=64)
        assert row["GFLOP/img"] == pytest.approx(count_flops_per_image(net, 2, (3, 64, 64)) / 1e9)
        assert row["img/s"] == pytest.approx(2 * 1000 / row["ms/step"])
    assert rows[0]["GFLOP/img"] < rows[1]["GFLOP/img"]
    a, b = rows
    ratio = f"{a['ms/step'] / b['ms/step']:.3f}"
    flops = f"{a['GFLOP/img'] / b['GFLOP/img']:.3f}"
    out = capsys.readouterr().out
    assert f"localmim/mae per step: {ratio} (FLOPs per image: " in out and f"= {flops})" in out


def test_slurm_launcher_config(make_cfg):
    """hydra/launcher=slurm is hydra-submitit-launcher's Slurm launcher sized from the trainer:
    one task per GPU on trainer.num_nodes nodes."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = make_cfg(["hydra/launcher=slurm", "experiment=vit_b_100ep", "method=mae"])
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    p = launcher.params
    assert (p["nodes"], p["gpus_per_node"], p["tasks_per_node"]) == (1, 8, 8)
    assert p["name"] == "vit_b_100ep" and p["timeout_min"] > 0
