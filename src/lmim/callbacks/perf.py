"""Device-hour accounting: wall-clock x devices, images, throughput, loader wait, memory and MFU.

Budgets are compared on one x-axis, ``perf/device_hours``: the wall-clock of the training job
(from Lightning's ``setup`` to the end of ``fit``) times the number of devices, so a run on 64
GPUs for an hour and one on 8 GPUs for 8 hours spend the same budget.
"""

from __future__ import annotations

import logging
import re
import resource
import sys
import time
from collections import deque
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from lmim.callbacks.final_step import logs_this_batch
from lmim.report import DEVICE_HOURS

log = logging.getLogger("lmim")


# Dense (no structured sparsity) peak TFLOP/s of one device, from NVIDIA's datasheets, for the
# precision the matmuls run in: "bf16" (bf16/fp16 tensor cores with fp32 accumulation), "tf32" and
# "fp32". Matched in order against the lower-cased device name; callbacks.perf.peak_tflops
# overrides the table (CPUs, other accelerators, clocks below the datasheet's).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"b200", {"bf16": 2250.0, "tf32": 1100.0, "fp32": 75.0}),
    (r"gh200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"h200 nvl", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"h200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"h100 nvl", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"h100 (pcie|.*hbm2e)", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"h100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"a100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"l40s", {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"l40\b", {"bf16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    (r"\bl4\b", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\ba10\b", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"a6000", {"bf16": 154.8, "tf32": 77.4, "fp32": 38.7}),
    (r"rtx 4090", {"bf16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"rtx 3090", {"bf16": 35.6, "tf32": 35.6, "fp32": 35.6}),
    # No bf16 or TF32 units: "bf16" is the fp16 tensor-core peak.
    (r"v100.*pcie", {"bf16": 112.0, "fp32": 14.0}),
    (r"v100", {"bf16": 125.0, "fp32": 15.7}),
    (r"\bt4\b", {"bf16": 65.0, "fp32": 8.1}),
]


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's dense peak TFLOP/s of a device at a Lightning precision, None if unknown.

    Args:
        device_name: e.g. ``torch.cuda.get_device_name()``, "NVIDIA H100 80GB HBM3".
        precision: Lightning's precision string ("bf16-mixed", "16-mixed", "32-true", ...).
            32-bit uses the TF32 peak when float32 matmuls may use TF32
            (``torch.get_float32_matmul_precision() != "highest"``).
    """
    precision = str(precision)
    if precision.startswith(("bf16", "16")):
        kind = "bf16"
    elif precision.startswith("32"):
        tf32 = torch.get_float32_matmul_precision() != "highest"
        kind = "tf32" if tf32 else "fp32"
    else:
        return None
    name = device_name.lower()
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, name):
            return peaks.get(kind, peaks.get("fp32"))
    return None


def count_flops_per_image(
    module: torch.nn.Module, batch: int, image_shape: tuple[int, ...]
) -> float:
    """FLOPs of one training forward + backward, per image, counted without running it.

    The module runs once on fake tensors (shapes and devices only, no memory, no random-number
    draws) under :class:`torch.utils.flop_counter.FlopCounterMode`; the backward asks for the
    gradients of the trainable parameters only, as training does. The module's own parameters
    and gradients are left untouched.

    Args:
        module: called as ``module(images)``; returns the loss or an object with ``.loss``.
        batch: images per forward (the per-device batch).
        image_shape: (C, H, W) of one image.

    Returns:
        Matmul/conv/attention FLOPs (2 per multiply-add) per image.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    # Real tensors met in the forward (a teacher target's weights, which are not the module's
    # parameters) are taken as fake ones, so their FLOPs are counted too.
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    named = dict(module.named_parameters())
    state = {n: mode.from_tensor(t) for n, t in [*named.items(), *module.named_buffers()]}
    trainable = [state[n] for n, p in named.items() if p.requires_grad]
    device = next(iter(named.values())).device if named else torch.device("cpu")
    with mode:
        images = torch.empty(batch, *image_shape, device=device)
        with FlopCounterMode(display=False) as counter:
            out = functional_call(module, state, (images,))
            loss = out.loss if hasattr(out, "loss") else out
            torch.autograd.grad(loss, trainable, allow_unused=True)
    return counter.get_total_flops() / batch


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


def _host(metrics: dict[str, float]) -> dict[str, torch.Tensor]:
    """float64 CPU tensors: Lightning keeps a logged value on its tensor's device, so logging
    them needs no copy to the GPU (a blocking copy would wait for the queued GPU work every
    step), and float64 keeps image counts exact past 2^24."""
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()}


def _host_peak_memory_gb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


class PerfMonitor(L.Callback):
    """Device-hour accounting and throughput, logged with the training metrics.

    Logged on the steps Lightning writes (every ``trainer.log_every_n_steps`` and the last; names
    are stable, the report and W&B charts use them), from host clocks and counters only, so the
    accounting adds no host synchronisation to a step:

    * ``perf/device_hours``: wall-clock since ``setup`` x devices (``trainer.world_size``) / 3600,
      cumulative over resumed runs (kept in checkpoints). W&B uses it as the x-axis of every
      metric (``define_metric``); the value at the end of ``fit`` is logged as a last row.
    * ``perf/images_seen``: images over all devices, cumulative (= steps x global batch).
    * ``perf/images_per_sec``, ``perf/images_per_sec_per_device``: over the last ``window``
      batches, loader waits included.
    * ``perf/data_wait_frac``: share of the same window spent between the end of one training
      batch and the start of the next, i.e. waiting for the data loader (plus Lightning's small
      per-step bookkeeping). A slow loader shows up here, not as slow steps.
    * ``perf/mfu``: model FLOPs utilisation, FLOPs per image (counted once at start on one
      forward + backward) x images/s per device / the device's peak; only when the peak is known
      (the :data:`PEAK_TFLOPS` table for GPUs, ``peak_tflops`` otherwise).
    * ``perf/max_memory_gb``: peak allocated device memory on GPUs, the process's peak resident
      memory on CPUs (rank 0).

    Per epoch: ``perf/epoch_device_hours``, ``perf/epoch_images_per_sec``,
    ``perf/epoch_data_wait_frac``. Once, as hyper-parameters: ``perf/gflops_per_image``,
    ``perf/peak_tflops``, ``perf/device``, ``perf/num_devices``.

    Args:
        window: batches over which the rates are averaged.
        peak_tflops: dense peak TFLOP/s of one device at the run's precision; None looks the
            GPU up in :data:`PEAK_TFLOPS` (no MFU on CPUs or unknown devices).
        count_flops: count FLOPs per image at start (needed for MFU).
        wandb_x_axis: make ``perf/device_hours`` the W&B step metric of every logged metric.
    """

    def __init__(
        self,
        window: int = 20,
        peak_tflops: float | None = None,
        count_flops: bool = True,
        wandb_x_axis: bool = True,
    ) -> None:
        self.window = max(1, int(window))
        self.peak_tflops_override = peak_tflops
        self.count_flops = count_flops
        self.wandb_x_axis = wandb_x_axis
        self.images_seen = 0
        self.flops_per_image: float | None = None
        self.peak_tflops: float | None = None
        self.device_name = ""
        self.summary: dict[str, float] = {}
        self._hours_before = 0.0  # device-hours of earlier fits of a resumed run
        self._t0: float | None = None
        self._world = 1
        self._wait = 0.0
        self._last_end: float | None = None
        self._marks: deque[tuple[float, int, float]] = deque(maxlen=self.window + 1)
        self._epoch: dict[str, float] = {}
        self._defined: set[str] = set()
        self._num_keys = 0
        self._logged_step = -1

    # ---- accounting --------------------------------------------------------------------------

    @property
    def device_hours(self) -> float:
        """Device-hours spent so far, earlier fits of a resumed run included."""
        if self._t0 is None:
            return self._hours_before
        return self._hours_before + (time.perf_counter() - self._t0) * self._world / 3600.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._t0 = time.perf_counter()
        self._world = max(1, int(trainer.world_size))
        if self.count_flops:
            self.flops_per_image = self._count_flops(trainer, pl_module)
        if self.wandb_x_axis:
            self._define_wandb_metrics(trainer, ["train/loss", "lr", *self._perf_names()])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.device_name = torch.cuda.get_device_name(device)
        else:
            self.device_name = device.type
        self.peak_tflops = self.peak_tflops_override
        if self.peak_tflops is None and device.type == "cuda":
            self.peak_tflops = peak_tflops(self.device_name, trainer.precision)
            if self.peak_tflops is None:
                log.warning(
                    "perf: no peak FLOP/s known for %s at precision %s, so no perf/mfu; set "
                    "callbacks.perf.peak_tflops=<dense TFLOP/s of one device>",
                    self.device_name,
                    trainer.precision,
                )
        info: dict[str, Any] = {"perf/device": self.device_name, "perf/num_devices": self._world}
        if self.flops_per_image is not None:
            info["perf/gflops_per_image"] = self.flops_per_image / 1e9
        if self.peak_tflops is not None:
            info["perf/peak_tflops"] = float(self.peak_tflops)
        for logger in trainer.loggers:
            logger.log_hyperparams(info)
        now = time.perf_counter()
        self._marks.clear()
        self._marks.append((now, self.images_seen, self._wait))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = time.perf_counter()
        self._last_end = now
        self._epoch = {"t0": now, "wait": self._wait, "images": self.images_seen}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._last_end is not None:
            self._wait += time.perf_counter() - self._last_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images_seen += _batch_size(batch) * self._world
        now = time.perf_counter()
        self._last_end = now
        self._marks.append((now, self.images_seen, self._wait))
        if logs_this_batch(trainer, batch_idx):
            self.log_step(trainer, pl_module)

    def log_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the step metrics (on the batches Lightning writes; a callback that stops
        training after this one ran calls it too). Host values only: no synchronisation."""
        if self._logged_step == trainer.global_step:
            return
        self._logged_step = trainer.global_step
        (t0, n0, w0), (t1, n1, w1) = self._marks[0], self._marks[-1]
        metrics = {DEVICE_HOURS: self.device_hours, "perf/images_seen": float(self.images_seen)}
        if t1 > t0:
            rate = (n1 - n0) / (t1 - t0)
            metrics["perf/images_per_sec"] = rate
            metrics["perf/images_per_sec_per_device"] = rate / self._world
            metrics["perf/data_wait_frac"] = (w1 - w0) / (t1 - t0)
            if self.flops_per_image and self.peak_tflops:
                per_device = rate / self._world
                metrics["perf/mfu"] = self.flops_per_image * per_device / (self.peak_tflops * 1e12)
        metrics["perf/max_memory_gb"] = self._peak_memory_gb(pl_module.device)
        pl_module.log_dict(_host(metrics), on_step=True, on_epoch=False)
        if self.wandb_x_axis and len(trainer.callback_metrics) != self._num_keys:
            # Keys the module logs (per-tap losses, evaluation, ...) appear as training goes.
            self._num_keys = len(trainer.callback_metrics)
            self._define_wandb_metrics(trainer, list(trainer.callback_metrics))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._epoch:
            return
        now = time.perf_counter()
        seconds = max(now - self._epoch["t0"], 1e-9)
        images = self.images_seen - self._epoch["images"]
        metrics = {
            "perf/epoch_device_hours": seconds * self._world / 3600.0,
            "perf/epoch_images_per_sec": images / seconds,
            "perf/epoch_data_wait_frac": (self._wait - self._epoch["wait"]) / seconds,
        }
        pl_module.log_dict(_host(metrics), on_step=False, on_epoch=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.summary = {
            DEVICE_HOURS: self.device_hours,
            "perf/images_seen": float(self.images_seen),
            "perf/data_wait_hours": self._wait * self._world / 3600.0,
        }
        self._hours_before, self._t0 = self.summary[DEVICE_HOURS], None
        # The last row: what the whole fit cost, last checkpoint and pictures included.
        for logger in trainer.loggers:
            logger.log_metrics(self.summary, step=trainer.global_step)
            logger.save()

    def state_dict(self) -> dict:
        return {"images_seen": self.images_seen, "device_hours": self.device_hours}

    def load_state_dict(self, state_dict: dict) -> None:
        self.images_seen = int(state_dict.get("images_seen", 0))
        hours = float(state_dict.get("device_hours", 0.0))
        # Restored after setup started the clock: the restored hours replace the earlier fits'.
        self._hours_before = hours

    # ---- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _perf_names() -> list[str]:
        return [
            "perf/images_seen",
            "perf/images_per_sec",
            "perf/images_per_sec_per_device",
            "perf/data_wait_frac",
            "perf/mfu",
            "perf/max_memory_gb",
            "perf/epoch_device_hours",
            "perf/epoch_images_per_sec",
            "perf/epoch_data_wait_frac",
        ]

    def _count_flops(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float | None:
        dm = trainer.datamodule
        size = getattr(dm, "img_size", None)
        encoder = getattr(getattr(pl_module, "net", None), "encoder", None)
        if size is None:
            size = getattr(encoder, "img_size", None)
        if size is None:
            log.warning("perf: no image size on the DataModule or encoder; no FLOP count, no MFU")
            return None
        hw = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
        proj = getattr(getattr(encoder, "patch_embed", None), "proj", None)
        chans = int(getattr(proj, "in_channels", 3))
        try:
            return count_flops_per_image(pl_module, int(getattr(dm, "batch_size", 1)), (chans, *hw))
        except Exception as err:  # an op without a fake-tensor kernel: report, keep training
            log.warning("perf: could not count FLOPs (%s); no perf/mfu", err)
            return None

    @staticmethod
    def _peak_memory_gb(device: torch.device) -> float:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**30
        return _host_peak_memory_gb()

    @rank_zero_only
    def _define_wandb_metrics(self, trainer: L.Trainer, names: list[str]) -> None:
        """Exact W&B metric definitions with ``perf/device_hours`` as their step metric; exact
        names take precedence over Lightning's ``*`` -> ``trainer/global_step`` glob."""
        new = [n for n in names if n not in self._defined and n not in (DEVICE_HOURS, "epoch")]
        if not new:
            return
        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            run = logger.experiment
            if DEVICE_HOURS not in self._defined:
                run.define_metric(DEVICE_HOURS, summary="max")
                for glob in ("train/*", "eval/*", "val/*"):
                    run.define_metric(glob, step_metric=DEVICE_HOURS, step_sync=True)
            for name in new:
                run.define_metric(name, step_metric=DEVICE_HOURS, step_sync=True)
        self._defined.update([DEVICE_HOURS, *new])
